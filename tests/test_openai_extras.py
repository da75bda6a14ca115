"""Prompt logprobs (ptp.LLM and the completions `echo`), checked against Hugging Face transformers."""
from __future__ import annotations

import pytest
import torch

import ptp
from helpers import hf_model, make_checkpoint, tokenizer


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these tools: {{ tools | tojson }}\nCall one as "
    "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def folder(ckpt_root):
    """A tiny llama whose chat template renders tools (Qwen's <tool_call> convention)."""
    from transformers import AutoTokenizer

    path = make_checkpoint(ckpt_root, "llama", seed=3, max_position_embeddings=1024)  # room for the tools
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TOOLS_TEMPLATE
    tok.save_pretrained(path)
    return path


@torch.no_grad()
def hf_prompt_logprobs(model, prompt: list[int]) -> list[float]:
    logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    return [float(logp[i - 1, prompt[i]]) for i in range(1, len(prompt))]


PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France, and Berlin",
           "def add(a, b):\n    return a + b\n" * 3]


@pytest.mark.parametrize("kwargs", [{}, {"chunked_prefill_size": 7, "block_size": 4}])
def test_prompt_logprobs_equal_transformers(folder, kwargs):
    """Every prompt token's logprob (None for the first), also with prompts split into chunks and a
    prefix cache that holds the same prompt (a request asking for prompt logprobs takes no cached blocks)."""
    model = hf_model(folder)
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", **kwargs)
    llm.generate(PROMPTS, ptp.SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)  # fills the cache
    outs = llm.generate(PROMPTS, ptp.SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2), use_tqdm=False)
    for out in outs:
        ids = out.prompt_token_ids
        lps = out.prompt_logprobs
        assert len(lps) == len(ids) and lps[0] is None
        want = hf_prompt_logprobs(model, ids)
        got = [lps[i][ids[i]] for i in range(1, len(ids))]
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
        assert all(len(e) >= 2 for e in lps[1:])  # the token's own and the top 2 (which may include it)
    plain = llm.generate(PROMPTS[:1], ptp.SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    assert plain[0].prompt_logprobs is None
    llm.shutdown()


# --- lm-evaluation-harness as a real client ------------------------------------------------------------

QUESTIONS = [
    {"question": "Paris is the capital of", "choices": [" France", " Germany", " the lazy dog"], "answer": 0},
    {"question": "The quick brown fox jumps over", "choices": [" the lazy dog.", " Berlin", " 42"], "answer": 0},
    {"question": "def add(a, b):\n   ", "choices": [" return a + b", " return a - b"], "answer": 0},
    {"question": "Tensor parallelism splits every layer across", "choices": [" several GPUs.", " one café"],
     "answer": 0},
]
MC_TASK = """task: ptp_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


GEN_TASK = """task: ptp_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n", "."]
  do_sample: false
  temperature: 0
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


TASKS = ["ptp_tiny_mc", "ptp_tiny_gen"]


def _lm_eval(model: str, model_args: str, tasks_dir) -> dict:
    """lm-evaluation-harness's per-document responses of each task in tasks_dir, by task and document id
    (the tasks in one evaluation: lm-eval and the model start once)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    # only the tasks of tasks_dir are indexed: lm-eval's thousands of built-in task files are not read
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, task_manager=manager,
                                  log_samples=True, batch_size=1)
    return {task: {s["doc_id"]: s["resps"] for s in out["samples"][task]} for task in TASKS}


def _write_task(tmp_path, template: str, name: str) -> None:
    import json

    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / f"{name}.yaml").write_text(template.format(data=data))


@pytest.fixture(scope="module")
def server(folder):
    from test_server import Server

    s = Server(folder, "--block-size", "4")
    yield s
    assert s.stop() == 0


@pytest.mark.slow
def test_lm_eval_local_completions_as_its_hf_backend(folder, server, tmp_path):
    """lm-eval's `local-completions` (token ids) against the ptp server, and lm-eval's own Hugging Face
    backend on the same checkpoint: a multiple-choice task (echo + logprobs) gets the same per-choice
    log-likelihoods and greedy flags; a generate_until task (greedy, stopped at a newline or a period,
    a few tokens at most) gets the same texts."""
    pytest.importorskip("lm_eval")
    from test_server import MODEL

    _write_task(tmp_path, MC_TASK, "mc")
    _write_task(tmp_path, GEN_TASK, "gen")
    want = _lm_eval("hf", f"pretrained={folder},dtype=float32,device=cpu", tmp_path)
    got = _lm_eval("local-completions", f"model={MODEL},base_url={server.url}/v1/completions,"
                   f"tokenizer_backend=huggingface,tokenizer={folder},tokenized_requests=True,"
                   "num_concurrent=1,max_retries=1", tmp_path)
    mc, want_mc = got["ptp_tiny_mc"], want["ptp_tiny_mc"]
    assert sorted(mc) == sorted(want_mc) == list(range(len(QUESTIONS)))
    for doc in want_mc:
        assert len(mc[doc]) == len(want_mc[doc]) == len(QUESTIONS[doc]["choices"])
        for (g,), (w,) in zip(mc[doc], want_mc[doc]):
            assert abs(float(g[0]) - float(w[0])) <= 1e-3, (doc, g, w)
            assert bool(g[1]) == bool(w[1])
    gen, want_gen = got["ptp_tiny_gen"], want["ptp_tiny_gen"]
    assert sorted(gen) == sorted(want_gen) == list(range(len(QUESTIONS)))
    assert gen == want_gen
    assert any(text for ((text,),) in want_gen.values())  # something was generated to compare


# --- structured outputs ----------------------------------------------------------------------------------

SCHEMA = {  # short keys and values: a random model's outputs stay a few dozen tokens long
    "type": "object",
    "properties": {
        "n": {"type": "string", "maxLength": 3},
        "k": {"enum": ["cat", "dog", "fox"]},
        "s": {"type": "integer", "minimum": 0, "maximum": 99},
        "t": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 2},
        "o": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "b": {"type": "boolean"}},
              "required": ["a", "b"], "additionalProperties": False},
    },
    "required": ["n", "k", "s", "t", "o"],
    "additionalProperties": False,
}


def test_json_schema_outputs_always_validate(folder):
    """200 samples at temperature 1 from a random model, batched with unconstrained requests: every
    constrained one is JSON that validates against the schema (nested object, enum, bounded array)."""
    import json

    import jsonschema

    from ptp.structured import grammar_for

    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", seed=1)
    schema = ptp.SamplingParams(temperature=1.0, max_tokens=100, grammar=grammar_for(json_schema=SCHEMA))
    free = ptp.SamplingParams(temperature=1.0, max_tokens=8)
    prompts = [f"Describe animal number {i}:" for i in range(200)]
    outs = llm.generate(prompts + prompts[:8], [schema] * 200 + [free] * 8, use_tqdm=False)
    for out in outs[:200]:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outs[:200]}) > 100  # sampled, not one fixed answer
    assert not all(o.text.startswith("{") for o in outs[200:])  # the others are not constrained
    llm.shutdown()


def test_regex_and_choice(folder):
    from ptp.structured import grammar_for

    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", seed=2)
    regex = ptp.SamplingParams(temperature=1.0, max_tokens=20, n=8, grammar=grammar_for(regex=r"[0-9]{3}-[a-z]{2}"))
    choice = ptp.SamplingParams(temperature=1.0, max_tokens=20, n=8, grammar=grammar_for(choice=["yes", "no way"]))
    import re
    a, b = llm.generate(["Code:", "Answer:"], [regex, choice], use_tqdm=False)
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", o.text) for o in a.outputs), [o.text for o in a.outputs]
    assert all(o.text in ("yes", "no way") for o in b.outputs), [o.text for o in b.outputs]
    llm.shutdown()


@pytest.mark.parametrize("kwargs, message", [
    (dict(json_schema={"type": "strin"}), "strin"),
    (dict(json_schema={"$ref": "#/definitions/missing"}), "missing"),
    (dict(regex="a(b"), "unclosed group"),
])
def test_a_constraint_that_cannot_compile_is_named(kwargs, message):
    from ptp.errors import ConfigError
    from ptp.structured import grammar_for

    with pytest.raises(ConfigError, match=message):
        grammar_for(**kwargs)


@pytest.mark.slow
def test_server_structured_outputs_and_echo(server):
    """The openai client: response_format json_schema / json_object, guided_choice; a schema that cannot
    compile gets a 400 naming the problem; echo streams the prompt first."""
    import json

    import httpx
    import jsonschema
    import openai

    from test_server import MODEL

    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "animal", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "An animal?"}],
                                       response_format=fmt, temperature=1.0, max_tokens=100, n=4, seed=5)
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON?"}],
                                            response_format={"type": "json_object"}, max_tokens=100, stream=True)
    chunks = [ch.choices[0] for ch in stream if ch.choices]
    text, finish = "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason
    assert text.startswith("{") and (finish == "length" or isinstance(json.loads(text), dict)), text
    r = client.completions.create(model=MODEL, prompt="Pick:", max_tokens=10, temperature=1.0, n=6,
                                  extra_body={"guided_choice": ["red", "green"]})
    assert {c.text for c in r.choices} <= {"red", "green"}
    with pytest.raises(openai.BadRequestError, match="strin"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "bad", "schema": {"type": "strin"}}})
    body = {"model": MODEL, "prompt": "Paris is", "max_tokens": 2, "echo": True, "logprobs": 1, "temperature": 0}
    plain = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert plain["text"].startswith("Paris is") and plain["logprobs"]["token_logprobs"][0] is None
    events = [json.loads(line[6:]) for line in httpx.post(server.url + "/v1/completions", json={**body, "stream": True},
                                                          timeout=60).text.splitlines()
              if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == plain["text"]
    assert sum((e["choices"][0]["logprobs"]["token_logprobs"] for e in events), []) == \
        plain["logprobs"]["token_logprobs"]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 8},
                                                "unit": {"enum": ["C", "F"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
    "additionalProperties": False}}}


@pytest.mark.slow
def test_tool_calls_through_the_openai_client(server):
    """tool_choice required / named give typed tool_calls whose arguments validate, streaming and not;
    auto with a model that calls nothing gives content; the template saw the tools."""
    import json

    import jsonschema

    from test_server import MODEL

    client = server.client()
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    r = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=120, temperature=1.0, n=4, seed=1)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, TIME], tool_choice=named,
                                       max_tokens=60, temperature=1.0)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments)["tz"] in ("UTC", "CET")
    # streamed at argument level; accumulated as the openai documentation shows, equal to the same request unstreamed
    kwargs = dict(model=MODEL, messages=ask, tools=[WEATHER, TIME], tool_choice="required", max_tokens=200, seed=3)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    stream = client.chat.completions.create(**kwargs, stream=True)
    final_tool_calls, fragments, last = {}, 0, None
    for chunk in stream:
        for tool_call in chunk.choices[0].delta.tool_calls or []:
            index = tool_call.index
            if index not in final_tool_calls:
                final_tool_calls[index] = tool_call
                assert tool_call.id.startswith("call_") and tool_call.function.arguments == ""
            else:
                assert tool_call.id is None and tool_call.function.name is None
                fragments += 1
            final_tool_calls[index].function.arguments += tool_call.function.arguments
        last = chunk.choices[0].finish_reason
    assert last == "tool_calls" and sorted(final_tool_calls) == list(range(len(whole)))
    assert fragments > 2 * len(whole)  # the arguments came in pieces
    for k, call in enumerate(whole):
        got = final_tool_calls[k].function
        assert (got.name, got.arguments) == (call.function.name, call.function.arguments)
        jsonschema.validate(json.loads(got.arguments), schemas[got.name])
    r = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    without = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens > without.usage.prompt_tokens + 20  # the tools were rendered
    import openai
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], max_tokens=8,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


@pytest.mark.slow
def test_prompt_logprobs_and_a_schema_under_tp2(folder):
    """Every rank computes the prompt rows' logits (the step carries which) and the constrained rows
    are masked on rank 0 alone: tp=2 gives the prompt logprobs of transformers and valid JSON."""
    import json

    import jsonschema

    from ptp.structured import grammar_for

    model = hf_model(folder)
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", tp=2, chunked_prefill_size=9)
    a, b = llm.generate(PROMPTS[:2], [ptp.SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0),
                                      ptp.SamplingParams(max_tokens=100, temperature=1.0,
                                                         grammar=grammar_for(json_schema=SCHEMA))], use_tqdm=False)
    want = hf_prompt_logprobs(model, a.prompt_token_ids)
    got = [a.prompt_logprobs[i][t] for i, t in enumerate(a.prompt_token_ids) if i]
    assert max(abs(x - y) for x, y in zip(got, want)) < 1e-4
    jsonschema.validate(json.loads(b.text), SCHEMA)
    llm.shutdown()
