"""Continuous batching, chunked prefill, preemption, sampling and bad input, on a tiny model."""
import pytest

import ptp
from helpers import make_checkpoint, tokenizer

PROMPTS = [
    "Paris",
    "The quick brown fox jumps over the lazy dog. Tensor parallelism splits",
    "def add(a, b):",
    "Héllo wörld, naïve café — 日本語 and emoji 🚀 too. 1234567890 + 42",
]
GREEDY = ptp.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(ckpt_root):
    return make_checkpoint(ckpt_root, "llama", seed=1)


@pytest.fixture(scope="module")
def alone(folder):
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu")
    return [llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


@pytest.mark.parametrize("kwargs", [
    {},
    {"chunked_prefill_size": 7},
    {"num_kv_blocks": 16, "block_size": 4},  # 64 slots: one long prompt fits, the batch needs 160
    # the same through the compiled decode path, whose padded rows write into a scratch block
    {"num_kv_blocks": 16, "block_size": 4, "torch_compile": "on", "cuda_graph_max_bs": 8},
], ids=["batched", "chunked-prefill", "preemption", "preemption-compiled"])
def test_batch_equals_each_prompt_alone(folder, alone, kwargs):
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", **kwargs)
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == alone
    if "num_kv_blocks" in kwargs:
        assert llm.engine.scheduler.num_preemptions > 0
    allocator = llm.engine.scheduler.allocator
    assert allocator.num_free == allocator.num_blocks == llm.engine.runner.num_blocks
    assert llm.engine.runner.num_blocks not in allocator.free  # the scratch block is never handed out


@pytest.mark.parametrize("mix", [False, True], ids=["prefill-or-decode", "mixed-chunk"])
def test_steps_mix_prompt_chunks_and_decodes_only_when_asked(folder, alone, mix):
    """By default a step is a prefill step or a decode step (decode steps can replay graphs);
    --enable-mixed-chunk lets chunks share steps with decodes. The tokens are the same."""
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", chunked_prefill_size=7, enable_mixed_chunk=mix)
    scheduler = llm.engine.scheduler
    schedule, kinds = scheduler.schedule, []

    def spy():
        step = schedule()
        if step is not None:
            seqs, batch = step
            kinds.append({"chunk" if len(t) > 1 else "decode" for s, t in zip(seqs, batch.token_ids)
                          if len(t) > 1 or s.num_computed > len(s.prompt_ids)})
        return step
    scheduler.schedule = spy
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == alone
    mixed_steps = sum(k == {"chunk", "decode"} for k in kinds)
    assert (mixed_steps > 0) if mix else (mixed_steps == 0), kinds
    assert any(k == {"decode"} for k in kinds) and any(k == {"chunk"} for k in kinds)



@pytest.mark.parametrize("limit", [8, 0], ids=["limited", "no-limit"])
def test_prefill_while_decoding_comes_in_short_steps_between_decode_steps(folder, alone, limit):
    """With --max-prefill-tokens-while-decoding, prompts that arrive while others decode are
    prefilled at most `limit` tokens a step, and every such step is followed by a decode step."""
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", max_prefill_tokens_while_decoding=limit)
    engine, scheduler = llm.engine, llm.engine.scheduler
    schedule, steps = scheduler.schedule, []

    def spy():
        decoding = sum(len(s) - s.num_computed <= 1 for s in scheduler.running)
        step = schedule()
        if step is not None:
            seqs, batch = step
            steps.append((decoding, sum(len(t) for t in batch.token_ids), all(len(t) == 1 for t in batch.token_ids)))
        return step
    scheduler.schedule = spy
    ids = [engine.add_request(PROMPTS[0], GREEDY)]
    tokens: dict[str, list[int]] = {}
    for _ in range(3):  # the first prompt decodes when the others arrive
        for u in engine.step():
            tokens.setdefault(u.request_id, []).extend(u.token_ids)
    ids += [engine.add_request(p, GREEDY) for p in PROMPTS[1:]]
    while engine.has_unfinished():
        for u in engine.step():
            tokens.setdefault(u.request_id, []).extend(u.token_ids)
    assert [tokens[i] for i in ids] == alone
    prefill_while_decoding = [(n, i) for i, (decoding, n, decode) in enumerate(steps) if decoding and not decode]
    assert prefill_while_decoding, steps
    if limit:
        assert all(n <= limit for n, _ in prefill_while_decoding), steps
        assert all(steps[i + 1][2] for _, i in prefill_while_decoding if i + 1 < len(steps)), steps
    else:
        assert max(n for n, _ in prefill_while_decoding) > 8, steps

def test_sampling_seed_topk_and_stop(folder, alone):
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu")
    seeded = ptp.SamplingParams(temperature=1.0, top_p=0.9, min_p=0.01, seed=7, max_tokens=20, ignore_eos=True)
    a, b = (llm.generate(PROMPTS[1], seeded)[0].token_ids for _ in range(2))
    assert a == b
    c = llm.generate(PROMPTS[1], ptp.SamplingParams(temperature=1.0, seed=8, max_tokens=20, ignore_eos=True))[0]
    assert c.token_ids != a
    top1 = llm.generate(PROMPTS, ptp.SamplingParams(temperature=1.3, top_k=1, max_tokens=24, ignore_eos=True))
    assert [o.token_ids for o in top1] == alone

    full = llm.generate(PROMPTS[1], GREEDY)[0].text
    stop = full[5:8]
    cut = llm.generate(PROMPTS[1], ptp.SamplingParams(temperature=0, max_tokens=24, stop=[stop], ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    assert stop not in cut.text

    many = llm.generate(PROMPTS[0], ptp.SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True))
    assert len(many[0].outputs) == 3 and len({tuple(o.token_ids) for o in many[0].outputs}) > 1


def test_logprobs_penalties_and_eos(folder):
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu")
    out = llm.generate(PROMPTS[0], ptp.SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        assert next(iter(entry)) == token and len(entry) <= 4
        assert entry[token] == max(entry.values())  # greedy picks the most likely
    plain = llm.generate(PROMPTS[2], GREEDY)[0].token_ids
    penal = llm.generate(PROMPTS[2], ptp.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                                        repetition_penalty=2.0, frequency_penalty=1.5))[0].token_ids
    assert penal != plain
    assert len(set(penal)) >= len(set(plain))
    # A stop token id ends the request with finish_reason "stop", at most at the first occurrence.
    first = plain[3]
    stopped = llm.generate(PROMPTS[2], ptp.SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[first]))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == first and len(stopped.token_ids) <= 4


def _mixed_run(folder, **kwargs):
    """A mix that crosses the overlapped (plain greedy) and the synchronous path in one batch."""
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", **kwargs)
    greedy_text = llm.generate(PROMPTS[1], GREEDY)[0].text
    params = [
        GREEDY,
        ptp.SamplingParams(temperature=0, max_tokens=24, stop=[greedy_text[6:9]], ignore_eos=True),  # stops early
        ptp.SamplingParams(temperature=0.8, seed=3, max_tokens=12, ignore_eos=True),
        ptp.SamplingParams(temperature=0, max_tokens=9, min_tokens=4, ignore_eos=False),
        ptp.SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),  # runs to the context limit
        ptp.SamplingParams(temperature=0, max_tokens=7, n=2, ignore_eos=True),
    ]
    prompts = PROMPTS + PROMPTS[:2]
    outs = llm.generate(prompts, params)
    got = [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outs]
    # the engine goes on after an abort of a request whose step is in flight
    rid = llm.engine.add_request(PROMPTS[0], GREEDY)
    llm.engine.step()
    llm.engine.step()
    llm.engine.abort(rid)
    after = llm.generate(PROMPTS[2], GREEDY)[0].token_ids
    allocator = llm.engine.scheduler.allocator
    return got, after, llm.engine.num_overlapped, allocator.num_free == allocator.num_blocks


@pytest.mark.parametrize("kwargs", [{}, {"num_kv_blocks": 16, "block_size": 4}], ids=["plain", "preemption"])
def test_overlapped_steps_equal_synchronous_steps(folder, kwargs):
    """Greedy decode steps queued ahead of their tokens give exactly the synchronous results, also
    when sequences stop on a string, reach their length or the context limit mid-flight, are
    preempted or aborted."""
    kwargs = dict(kwargs, max_model_len=64)
    want, want_after, none, _ = _mixed_run(folder, disable_overlap_schedule=True, **kwargs)
    got, got_after, overlapped, all_free = _mixed_run(folder, **kwargs)
    assert none == 0 and overlapped > 20
    assert got == want and got_after == want_after
    assert all_free
    assert [r for o in got for _, _, r in o] == [r for o in want for _, _, r in o]


@pytest.mark.parametrize("bad", [
    dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-3), dict(min_p=2),
    dict(max_tokens=0), dict(n=0), dict(repetition_penalty=0), dict(presence_penalty=3),
    dict(frequency_penalty=-2.5), dict(logprobs=50), dict(stop=[""]), dict(min_tokens=5, max_tokens=2),
])
def test_bad_sampling_params_are_refused(bad):
    name = next(iter(bad))
    with pytest.raises(ptp.ConfigError, match=name):
        ptp.SamplingParams(**bad)


def test_too_long_prompts_are_refused_and_engine_goes_on(folder):
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", max_model_len=32)
    with pytest.raises(ptp.ConfigError, match="maximum context length is 32"):
        llm.generate("Paris " * 40, GREEDY)
    with pytest.raises(ptp.ConfigError, match="requested"):
        llm.generate("Paris", ptp.SamplingParams(max_tokens=40))
    assert len(llm.generate("Paris", ptp.SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) == 4
    assert llm.generate("Paris", ptp.SamplingParams(max_tokens=None, ignore_eos=True))[0].finish_reason == "length"


def test_chat_uses_the_template(folder):
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu")
    ids = llm.encode_chat([{"role": "user", "content": "hi"}])
    assert tokenizer().decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert llm.chat([{"role": "user", "content": "hi"}], ptp.SamplingParams(max_tokens=3))[0].finish_reason


def test_unknown_llm_argument_and_bad_flags(folder):
    with pytest.raises(ptp.ConfigError, match="unknown arguments"):
        ptp.LLM(str(folder), tensor_parallel=2)
    with pytest.raises(ptp.ConfigError, match="--dp-size must be >= 1, got 0"):
        ptp.LLM(str(folder), dp_size=0)
    with pytest.raises(ptp.ConfigError, match="'flashinfer' is not available here .ptp does not ship it.; available: torch, flex, auto"):
        ptp.LLM(str(folder), attention_backend="flashinfer", device="cpu")
    with pytest.raises(ptp.ConfigError, match="'triton' is not available here .it needs a CUDA GPU"):
        ptp.LLM(str(folder), attention_backend="triton", device="cpu")


def test_compiled_decode_equals_eager(folder, alone):
    """The compiled decode step (inductor on CPU, dynamic batch size) gives the eager tokens; so does
    the prefill of one whole prompt padded to its graph's length (PrefillGraphs, run without graphs)."""
    import torch

    from ptp.runner import _run_layer

    torch._dynamo.reset()
    # no prefix cache: a repeated prompt would start mid-prompt and take the general path
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", torch_compile="on", cuda_graph_max_bs=8,
                  disable_radix_cache=True)
    runner = llm.engine.runner
    assert runner.decode is not None and runner.prefill is not None
    padded = []
    run = runner.prefill.run
    runner.prefill.run = lambda batch: padded.append(len(batch.token_ids[0])) or run(batch)
    decoded = []  # (rows, storage) of each decode step's logits
    run_decode = runner.decode.run

    def recorded(batch):
        out = run_decode(batch)
        decoded.append((len(out), out.untyped_storage().data_ptr()))
        return out

    runner.decode.run = recorded
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == alone
    assert [o.token_ids for o in llm.generate(PROMPTS[:3], GREEDY)] == alone[:3]  # another batch size
    # every batch size's logits in the one shared buffer (a graph's own output would stay allocated)
    assert {n for n, _ in decoded} >= {len(PROMPTS), 3}, decoded
    assert {p for _, p in decoded} == {runner.decode.logits.untyped_storage().data_ptr()}, decoded
    runner.decode.run = run_decode
    assert not padded  # batches of prompts take the general path
    assert [llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS[:2]] == alone[:2]  # batch 1: its own graph
    assert len(padded) == 2 and all(n not in runner.prefill.buckets for n in padded), padded  # padded, really
    # batches of prompts and the padded whole prompts share one compiled layer (the padded path's
    # placeholder metadata once had an int32 table and aliased tensors: a recompile at the first batch
    # of prompts, which on the GPU stalled a server for a second)
    assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(_run_layer.__code__)) == 1


@pytest.mark.parametrize("mix", [False, True], ids=["prefill-or-decode", "mixed-chunk"])
def test_compiled_prefill_equals_eager(folder, alone, mix):
    """--torch-compile-prefill: prefill (and mixed) steps through one compiled decoder layer, reused by
    every layer, gives the eager tokens, and compiles once per kind of step, not per layer or length."""
    import torch

    from ptp.runner import _run_layer

    torch._dynamo.reset()
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", torch_compile="on", cuda_graph_max_bs=8,
                  torch_compile_prefill="on", chunked_prefill_size=7, enable_mixed_chunk=mix)
    if mix:  # a server's warm-up compiles both kinds before it says it is ready
        from ptp.replica import warm_up

        warm_up(llm.engine)
        assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(_run_layer.__code__)) == 2
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == alone
    assert [llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS[1:3]] == alone[1:3]
    # prompt chunks of 2..7 tokens, 1..4 sequences, tables of 1..n blocks: one graph; and with
    # mixing, one for mixed steps (decode steps replay the compiled decode step, not this)
    graphs = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(_run_layer.__code__))
    assert graphs == (2 if mix else 1), graphs


def test_flags_doc_is_current():
    from pathlib import Path

    from ptp.args import flags_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "flags.md"
    assert doc.read_text() == flags_markdown(), "docs/flags.md is stale: run python -m ptp.args > docs/flags.md"


def test_two_pass_argmax_equals_argmax():
    from ptp.sampling import argmax_rows

    import torch
    g = torch.Generator().manual_seed(0)
    for vocab in (50, 4097, 32000, 128256, 151936):
        x = torch.randn(3, vocab, generator=g)
        assert torch.equal(argmax_rows(x), x.argmax(-1))
        x[1, vocab - 1] = 100.0  # the best in the padded last slice
        x[2, 0] = 100.0
        assert torch.equal(argmax_rows(x), x.argmax(-1))


def test_step_batch_round_trips_through_its_wire_format():
    from ptp.step import StepBatch

    batch = StepBatch([[5, 6, 7], [-2], [9]], [0, 40, 3], [[1, 2], [7, 8, 9], [4]], [False, True, True], True)
    back = StepBatch.decode(batch.encode())
    assert back == batch and back.share_tokens and back.token_ids[1] == [-2]  # a placeholder survives
    plain = StepBatch([[1]], [0], [[3]], [True])
    assert StepBatch.decode(plain.encode()) == plain and not plain.share_tokens
    scored = StepBatch([[1, 2], [3]], [0, 5], [[3], [4]], [True, True], all_logits=[True, False])
    assert StepBatch.decode(scored.encode()) == scored
