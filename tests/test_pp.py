"""Pipeline parallelism on CPU (gloo, several processes): pp=2, pp=3 (uneven) and pp=2 × tp=2 equal tp=1."""
import os
import signal
import threading
import time

import pytest

import ptp
from helpers import make_checkpoint, ptp_logits, rel_err, tokenizer

pytestmark = pytest.mark.slow
PROMPT = "Pipeline stages pass hidden states"
GREEDY32 = ptp.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
LAYERS = 4  # so that three stages can be uneven (1, 2, 1)
BATCH = ["Paris is", "The quick brown fox jumps over the lazy dog and", "def add(a, b):", "1234567890 + 42"]
BATCH_GREEDY = ptp.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# small chunks and a KV cache too small for the whole batch: chunked prefill and preemption
SQUEEZED = {"chunked_prefill_size": 8, "num_kv_blocks": 24, "block_size": 4}


@pytest.fixture(scope="module")
def reference(ckpt_root):
    """Per (architecture, tied embeddings): checkpoint, tp=1 greedy tokens and logits along them, and the
    tp=1 tokens of a squeezed batch."""
    cache = {}

    def get(arch, tied=False):
        if (arch, tied) not in cache:
            folder = make_checkpoint(ckpt_root, arch, seed=5, num_hidden_layers=LAYERS, tie_word_embeddings=tied)
            prompt = tokenizer().encode(PROMPT)
            with ptp.LLM(str(folder), dtype="float32", device="cpu", **SQUEEZED) as llm:
                tokens = llm.generate([prompt], GREEDY32)[0].token_ids
                batch = [o.token_ids for o in llm.generate(BATCH, BATCH_GREEDY)]
                assert llm.engine.scheduler.num_preemptions > 0
                cache[arch, tied] = (folder, tokens, ptp_logits(llm, prompt, tokens), batch)
        return cache[arch, tied]
    return get


def _check_equal(llm, ref):
    folder, tokens, logits, batch = ref
    prompt = tokenizer().encode(PROMPT)
    errors = [rel_err(g, r) for g, r in zip(ptp_logits(llm, prompt, tokens), logits)]
    assert max(errors) <= 1e-4, errors
    assert llm.generate([prompt], GREEDY32)[0].token_ids == tokens
    assert [o.token_ids for o in llm.generate(BATCH, BATCH_GREEDY)] == batch
    assert llm.engine.scheduler.num_preemptions > 0


# qwen2 and qwen3 run through pipeline stages in test_pp3_uneven_equals_tp1 (qwen2, tied) and
# test_pp2_tp2_equals_tp1 (qwen3): here the two architectures that have no other pp=2 test against tp=1 logits.
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_pp2_equals_tp1(reference, arch):
    ref = reference(arch)
    with ptp.LLM(str(ref[0]), dtype="float32", device="cpu", pp_size=2, **SQUEEZED) as llm:
        _check_equal(llm, ref)


@pytest.mark.parametrize("arch, tied", [("llama", False), ("qwen2", True)], ids=["llama", "qwen2-tied"])
def test_pp3_uneven_equals_tp1(reference, arch, tied):
    """Stages of 1, 2 and 1 layers; with tied embeddings the last stage loads lm_head from the embedding."""
    ref = reference(arch, tied)
    with ptp.LLM(str(ref[0]), dtype="float32", device="cpu", pp_size=3, pp_layer_partition="1,2,1",
                 **SQUEEZED) as llm:
        assert llm.engine.runner.stage.layers == range(0, 1)
        _check_equal(llm, ref)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pp2_tp2_equals_tp1(reference, arch):
    ref = reference(arch)
    with ptp.LLM(str(ref[0]), dtype="float32", device="cpu", pp_size=2, tp=2, **SQUEEZED) as llm:
        _check_equal(llm, ref)
        if arch == "llama":
            _check_bytes_per_rank(llm, tp=2, pp=2)


def _check_bytes_per_rank(llm, tp, pp):
    """Each rank holds about 1/(tp·pp) of the layers' sharded weights and of the KV cache, measured on
    every rank; the embedding sits on the first stage only, lm_head and the final norm on the last."""
    c = llm.engine.config
    h, hd, f, v = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size
    layers = c.num_layers // pp
    layer_sharded = layers * (2 * c.num_heads * hd * h + 3 * h * f) / tp
    layer_rest = layers * (2 * h * hd * c.num_kv_heads / tp + 2 * h)  # KV heads split (2 of them), norms
    qk_bias = 0 if not c.qkv_bias else 0
    vocab = v * h / tp
    runner = llm.engine.runner
    assert len(runner.rank_weight_bytes) == tp * pp
    for rank, got in enumerate(runner.rank_weight_bytes):
        stage = rank // tp
        want = (layer_sharded + layer_rest + vocab + (h if stage == pp - 1 else 0) + qk_bias) * 4
        assert abs(got - want) <= 0.02 * want, (rank, got, want)
    blocks = runner.num_blocks + 1
    whole = c.num_layers * 2 * blocks * runner.kv_cache.block_size * c.num_kv_heads * hd * 4  # tp=1, pp=1
    assert runner.rank_kv_bytes == [whole / (tp * pp)] * (tp * pp)


# twice BATCH: with SQUEEZED, chunks of several prompts and preemptions while micro-batches are in flight
WIDE = BATCH + ["Once upon a time there", "import torch as", "The capital of France is", "x = [1, 2, 3]"]


@pytest.fixture(scope="module")
def wide_reference(reference):
    folder = reference("llama")[0]
    with ptp.LLM(str(folder), dtype="float32", device="cpu", **SQUEEZED) as llm:
        return folder, [o.token_ids for o in llm.generate(WIDE, BATCH_GREEDY)]


@pytest.mark.parametrize("pp", [2, 3])
def test_micro_batches_in_flight_equal_tp1(wide_reference, pp):
    """One micro-batch per stage in flight at once (the first stage runs one while later stages run the
    earlier ones), with chunked prefill and preemption: tp=1's greedy tokens."""
    folder, want = wide_reference
    with ptp.LLM(str(folder), dtype="float32", device="cpu", pp_size=pp, **SQUEEZED) as llm:
        assert [o.token_ids for o in llm.generate(WIDE, BATCH_GREEDY)] == want
        engine = llm.engine
        assert engine.scheduler.num_preemptions > 0
        assert engine.steps.most_in_flight == pp
        assert engine.num_pipelined > len(WIDE)  # launched while another micro-batch was in flight


def test_compiled_decode_per_stage(reference):
    """The compiled decode step of a stage after the first takes the hidden state as its input (the
    CUDA-graph path's static buffers, here compiled without graphs)."""
    ref = reference("llama")
    prompt = tokenizer().encode(PROMPT)
    with ptp.LLM(str(ref[0]), dtype="float32", device="cpu", pp_size=2, torch_compile="on",
                 torch_compile_prefill="off", cuda_graph_max_bs=4, **SQUEEZED) as llm:
        assert llm.engine.runner.decode is not None
        assert llm.generate([prompt], GREEDY32)[0].token_ids == ref[1]


def test_sampled_overlap_at_pp2_equals_synchronous(reference):
    """Tokens drawn on the leader's device feed the next step on the first stage: seeded sampling at pp=2
    gives the same tokens with and without overlap, and with two micro-batches in flight (sampled on
    the host as each comes back)."""
    folder = reference("llama")[0]
    params = [ptp.SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_tokens=16, ignore_eos=True) for s in (1, 2)]
    outs = []
    for overlap, micro_batches in ((True, 1), (False, 1), (False, 2)):
        with ptp.LLM(str(folder), dtype="float32", device="cpu", pp_size=2, tp=1, pp_micro_batches=micro_batches,
                     disable_overlap_schedule=not overlap) as llm:
            outs.append([o.outputs[0].token_ids for o in llm.generate(["Paris is", "def add"], params)])
            assert (llm.engine.num_overlapped > 5) == overlap
            assert (llm.engine.num_pipelined > 5) == (micro_batches > 1)
    assert outs[0] == outs[1] == outs[2]


def test_a_rank_killed_in_the_second_stage_ends_the_run_naming_it(reference):
    folder = reference("llama")[0]
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", pp_size=2)
    procs = llm.engine.spawned.procs
    threading.Timer(2.0, os.kill, (procs[0].pid, signal.SIGKILL)).start()
    start = time.time()
    try:
        with pytest.raises(ptp.RankFailedError, match=r"rank 1 \(pipeline stage 1 of 2, tp rank 0\) exited"):
            for _ in range(10_000):
                llm.generate(["Paris"] * 4, ptp.SamplingParams(max_tokens=64, ignore_eos=True), use_tqdm=False)
        assert time.time() - start < 60
    finally:
        llm.shutdown()
    assert all(p.exitcode is not None for p in procs)


def test_bad_layouts_are_refused_naming_the_numbers(reference):
    folder = str(reference("llama")[0])
    with pytest.raises(ptp.ConfigError, match=r"--pp-size 5 is more than the model's 4 layers"):
        ptp.LLM(folder, device="cpu", pp_size=5)
    with pytest.raises(ptp.ConfigError, match=r"1,2 gives 2 stages holding 3 layers, but the model has 4 layers"):
        ptp.LLM(folder, device="cpu", pp_size=2, pp_layer_partition="1,2")
    with pytest.raises(ptp.ConfigError, match=r"must give 3 layer counts"):
        ptp.EngineArgs(pp_size=3, pp_layer_partition="2,2").validate()
    with pytest.raises(ptp.ConfigError, match=r"= 6 ranks cannot be spread evenly over --nnodes 4"):
        ptp.EngineArgs(tp=2, pp_size=3, nnodes=4, dist_init_addr="h:1").validate()
    with pytest.raises(ptp.ConfigError, match=r"--nnodes 2 needs --dist-init-addr"):
        ptp.EngineArgs(tp=2, nnodes=2).validate()
    with pytest.raises(ptp.ConfigError, match=r"--node-rank must be in \[0, 1\]"):
        ptp.EngineArgs(tp=2, nnodes=2, node_rank=2, dist_init_addr="h:1").validate()
