"""schemathesis against the server's own OpenAPI schema: generated requests, valid and invalid, get the
status, content type and body the schema promises, none a 5xx, and the server answers correctly after.

Every check schemathesis has runs on every response (`--checks all`): not_a_server_error,
status_code_conformance, content_type_conformance, response_schema_conformance, response_headers_conformance,
negative_data_rejection (invalid data gets a 4xx) and positive_data_acceptance (valid data gets a 2xx).
The schema states each field's own rules exactly; rules between fields and counted in tokens cannot be
written in JSON Schema (ptp.openapi lists them, and the server answers 400 when one is broken), so the
valid cases are brought within them by `within_rules` below, which follows that list; invalid cases are
sent as generated. `within_rules` also keeps each request small (max_tokens <= 3, n <= 2, short texts) so
that the run stays short on CPU.
"""
import httpx
import pytest

import ptp
from helpers import make_checkpoint
from test_server import MODEL, Server

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402 (after the import check)
from schemathesis.core.failures import FailureGroup  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

pytestmark = pytest.mark.slow
POSITIVE_PER_OPERATION = 300  # completions and chat: >= 500 requests that reach the engine in all
NEGATIVE_PER_OPERATION = 100
MAX_TOKENS, MAX_N, MAX_TEXT = 3, 2, 16


@pytest.fixture(scope="module")
def folder(ckpt_root):
    return make_checkpoint(ckpt_root, "qwen2", seed=11, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder, "--tool-call-parser", "hermes")
    yield s
    assert s.stop() == 0, s.proc.stdout.read()[-4000:]


def _short(text):
    return text[:MAX_TEXT] if isinstance(text, str) else text


def within_rules(body: dict) -> dict:
    """A valid body made to keep the rules between fields that the schema cannot state, and kept small."""
    body = dict(body)
    for key in ("max_tokens", "max_completion_tokens"):
        if key in body or key == "max_tokens":
            body[key] = min(body.get(key) or MAX_TOKENS, MAX_TOKENS)
    if "messages" in body:
        body["max_completion_tokens"] = body["max_tokens"]
    body["min_tokens"] = min(body.get("min_tokens", 0), body["max_tokens"])
    body["n"] = min(body.get("n", 1), MAX_N)
    if body.get("best_of") is not None:
        body["best_of"] = body["n"]
    if not body.get("stream"):
        body.pop("stream_options", None)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = [_short(p) if not isinstance(p, list) else p[:MAX_TEXT] for p in prompt[:MAX_N]]
        prompt = prompt[:MAX_TEXT] if all(isinstance(p, int) for p in prompt) else prompt
    if "prompt" in body:
        body["prompt"] = _short(prompt)
    if "messages" in body:
        body["messages"] = [_short_message(m) for m in body["messages"][:3]]
    body["stop"] = [s[:4] for s in body["stop"]] if isinstance(body.get("stop"), list) else _short(body.get("stop"))
    # one constraint at most, and one that compiles
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        rf = body["response_format"] = {**rf, "json_schema": {**rf["json_schema"], "schema": {"type": "object"}}}
    constrained = isinstance(rf, dict) and rf.get("type") != "text"
    if body.get("guided_regex") is not None:
        if constrained:
            body.pop("guided_regex")
        else:
            body["guided_regex"], constrained = "[a-z]{1,3}", True
    if body.get("guided_choice") is not None and constrained:
        body.pop("guided_choice")
    constrained = constrained or body.get("guided_choice") is not None
    # tools: a named choice among the tools, none forced beside a constraint; parameters that compile
    if body.get("tools"):
        body["tools"] = [{**t, "function": {**t["function"], "parameters": {"type": "object"}}}
                         for t in body["tools"]]
    choice = body.get("tool_choice")
    if choice not in (None, "none") and not body.get("tools"):
        body.pop("tool_choice")
    elif isinstance(choice, dict):
        body["tool_choice"] = {"type": "function", "function": {"name": body["tools"][0]["function"]["name"]}}
    if constrained and body.get("tool_choice") not in (None, "none", "auto"):
        body["tool_choice"] = "auto"
    if body.get("top_logprobs") is not None and "messages" in body:
        body["logprobs"] = True
    return body


def _short_message(m: dict) -> dict:
    m = dict(m)
    content = m.get("content")
    m["content"] = [{**p, "text": _short(p["text"])} for p in content[:2]] if isinstance(content, list) else \
        _short(content)
    if m.get("tool_calls"):
        m["tool_calls"] = m["tool_calls"][:2]
    return m


def _run(operation, url: str, mode: GenerationMode, examples: int, counts: dict, failures: dict) -> None:
    """Send `examples` generated cases; count responses by status class, keep the first case of each failure
    (all cases are sent, as with --continue-on-failure)."""
    strategy = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:
        strategy = strategy.map(_repair)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(case=strategy)
    def one(case):
        try:
            response = case.call_and_validate(base_url=url, timeout=60)
        except (AssertionError, FailureGroup) as e:
            failures.setdefault(str(e).strip().splitlines()[0], f"{e}\n{case.as_curl_command()}")
            return
        counts[response.status_code // 100] = counts.get(response.status_code // 100, 0) + 1

    one()


def _repair(case):
    if isinstance(case.body, dict):
        case.body = within_rules(case.body)
    return case


def test_generated_requests_get_what_the_schema_promises(server, folder):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    before = server.metric("ptp:request_success_total")
    counts, failures = {}, {}
    operations = {op.ok().label: op.ok() for op in schema.get_all_operations()}
    for label in ("POST /v1/completions", "POST /v1/chat/completions"):
        _run(operations[label], server.url, GenerationMode.POSITIVE, POSITIVE_PER_OPERATION, counts, failures)
        _run(operations[label], server.url, GenerationMode.NEGATIVE, NEGATIVE_PER_OPERATION, counts, failures)
    for label in ("GET /v1/models", "GET /health", "GET /metrics"):
        _run(operations[label], server.url, GenerationMode.POSITIVE, 1, counts, failures)
    reached = server.metric("ptp:request_success_total") - before
    assert not failures, "\n\n".join(failures.values())
    assert reached >= 500 and counts.get(5, 0) == 0, (reached, counts)
    # still serving, and right
    llm_text = ptp.LLM(str(folder), dtype="float32", device="cpu").generate(
        "Paris is", ptp.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].text
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Paris is", "max_tokens": 8,
                                                          "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == llm_text


def test_overflowing_sampling_values_leave_the_engine_running(server):
    """A temperature or repetition penalty so small that the logits overflow samples the best tokens; it
    used to make the draw fail for the whole batch and stop the engine."""
    for extreme in ({"temperature": 5e-324}, {"repetition_penalty": 5e-302, "temperature": 1.0}):
        r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Paris is", "max_tokens": 3,
                                                              **extreme}, timeout=60)
        assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/health").status_code == 200
