"""Tensor parallelism on CPU (gloo, several processes): tp=N equals tp=1."""
import os
import re
import signal
import threading
import time

import pytest

import ptp
from helpers import ARCHS, make_checkpoint, ptp_logits, rel_err, tokenizer

pytestmark = pytest.mark.slow
PROMPT = "Tensor parallelism splits every layer"
GREEDY32 = ptp.SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(ckpt_root):
    """Per architecture: checkpoint, tp=1 greedy tokens and tp=1 logits along them."""
    out = {}
    prompt = tokenizer().encode(PROMPT)
    for arch in ARCHS:
        folder = make_checkpoint(ckpt_root, arch, seed=3)
        llm = ptp.LLM(str(folder), dtype="float32", device="cpu")
        tokens = llm.generate([prompt], GREEDY32)[0].token_ids
        out[arch] = (folder, tokens, ptp_logits(llm, prompt, tokens))
    return out


# tp=4 for every architecture: uneven vocabulary shards and KV heads held by two ranks each. tp=2 for mistral
# only: the other architectures run at tp=2 in test_other_paths_at_tp2, the overlap test and test_pp's pp2-tp2.
@pytest.mark.parametrize("arch, tp", [(arch, 4) for arch in ARCHS] + [("mistral", 2)],
                         ids=[f"{arch}-4" for arch in ARCHS] + ["mistral-2"])
def test_tp_equals_tp1(reference, arch, tp):
    folder, tokens, logits = reference[arch]
    prompt = tokenizer().encode(PROMPT)
    with ptp.LLM(str(folder), dtype="float32", device="cpu", tp=tp) as llm:
        got = ptp_logits(llm, prompt, tokens)
        errors = [rel_err(g, r) for g, r in zip(got, logits)]
        assert max(errors) <= 1e-4, errors
        assert llm.generate([prompt], GREEDY32)[0].token_ids == tokens
        if arch == "llama" and tp == 4:
            _check_parameter_bytes(llm, tp)


def test_tp8_with_kv_heads_replicated_four_times(ckpt_root):
    """Eight gloo ranks on a model with 8 heads and 2 KV heads (each KV head held by four ranks): logits and
    6 greedy tokens equal tp=1 (each step of eight processes is slow on a small CPU), and each rank holds
    about 1/8 of the sharded weights."""
    folder = make_checkpoint(ckpt_root, "llama", seed=8, num_attention_heads=8)
    prompt = tokenizer().encode(PROMPT)
    greedy = ptp.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu")
    tokens = llm.generate([prompt], greedy)[0].token_ids
    logits = ptp_logits(llm, prompt, tokens)
    with ptp.LLM(str(folder), dtype="float32", device="cpu", tp=8) as llm8:
        errors = [rel_err(g, r) for g, r in zip(ptp_logits(llm8, prompt, tokens), logits)]
        assert max(errors) <= 1e-4, errors
        assert llm8.generate([prompt], greedy)[0].token_ids == tokens
        _check_parameter_bytes(llm8, 8)


@pytest.mark.parametrize("arch, kwargs", [
    ("llama", {"attention_backend": "flex"}),
    # prefill through the one compiled decoder layer (DTensor-sharded weights, the all-reduce op)
    ("qwen2", {"torch_compile_prefill": "on"}),
], ids=["flex-backend", "compiled-prefill"])
def test_other_paths_at_tp2(reference, arch, kwargs):
    folder, tokens, logits = reference[arch]
    prompt = tokenizer().encode(PROMPT)
    with ptp.LLM(str(folder), dtype="float32", device="cpu", tp=2, **kwargs) as llm:
        errors = [rel_err(g, r) for g, r in zip(ptp_logits(llm, prompt, tokens), logits)]
        assert max(errors) <= 1e-4, errors
        assert llm.generate([prompt], GREEDY32)[0].token_ids == tokens


def test_sampled_overlap_at_tp2_equals_synchronous(reference):
    """Tokens drawn on rank 0's device feed the next step on every rank (a broadcast): seeded sampling
    at tp=2 gives the same text with and without overlap."""
    folder = reference["llama"][0]
    params = [ptp.SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_tokens=20, ignore_eos=True) for s in (1, 2)]
    params.append(ptp.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    prompts = ["Paris is", "The quick brown fox", "def add(a, b):"]
    outs = []
    for overlap in (True, False):
        with ptp.LLM(str(folder), dtype="float32", device="cpu", tp=2, disable_overlap_schedule=not overlap) as llm:
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
            assert (llm.engine.num_overlapped > 10) == overlap
    assert outs[0] == outs[1]


def _check_parameter_bytes(llm, tp):
    """Each rank holds about 1/tp of the sharded weights, plus the replicated parts."""
    c = llm.engine.config
    h, hd, f, v = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size
    sharded = v * h * 2 + c.num_layers * (2 * c.num_heads * hd * h + 3 * h * f)
    kv_per_rank = c.num_layers * 2 * h * hd * max(1, c.num_kv_heads // tp)  # 2 KV heads at tp=4: one whole head each
    replicated = (2 * c.num_layers + 1) * h
    expected = (sharded / tp + kv_per_rank + replicated) * 4
    total_tp1 = (sharded + c.num_layers * 2 * h * hd * c.num_kv_heads + replicated) * 4
    per_rank = llm.engine.runner.rank_weight_bytes
    assert len(per_rank) == tp
    for got in per_rank:
        assert abs(got - expected) <= 0.1 * expected, (got, expected)
        assert got < total_tp1 / 2


def test_tp_that_cannot_split_is_refused(reference):
    folder = reference["llama"][0]
    with pytest.raises(ptp.ConfigError, match=r"tp=3 .*4 attention heads.*Valid tp values for it: 1, 2, 4"):
        ptp.LLM(str(folder), device="cpu", tp=3)


def test_a_killed_rank_ends_the_run_naming_it(reference):
    folder = reference["llama"][0]
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", tp=2)
    victim = llm.engine.spawned.procs[0]
    threading.Timer(2.0, os.kill, (victim.pid, signal.SIGKILL)).start()
    start = time.time()
    try:
        with pytest.raises(ptp.RankFailedError, match="rank 1"):
            for _ in range(10_000):
                llm.generate(["Paris"] * 4, ptp.SamplingParams(max_tokens=64, ignore_eos=True), use_tqdm=False)
        assert time.time() - start < 60
    finally:
        # also when the check fails: else rank 0's watchdog, never told that the failure was seen,
        # ends this whole pytest process 20 s later, and the process group blocks the next test
        llm.shutdown()


def test_a_stopped_rank_is_named_and_killed_by_the_watchdog(reference, capfd):
    """A follower stopped with SIGSTOP mid-generation: rank 0 would wait in a collective forever; the
    watchdog names the rank and its step, writes the stacks, kills it, and generate raises."""
    folder = reference["llama"][0]
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu", tp=2, watchdog_timeout=3)
    victim = llm.engine.spawned.procs[0]
    threading.Timer(2.0, os.kill, (victim.pid, signal.SIGSTOP)).start()
    start = time.time()
    try:
        with pytest.raises(ptp.RankFailedError, match=r"rank 1 stopped making progress") as raised:
            for _ in range(10_000):
                llm.generate(["Paris"] * 4, ptp.SamplingParams(max_tokens=64, ignore_eos=True), use_tqdm=False)
        assert time.time() - start < 60
        assert re.search(r"rank 1 \(pid \d+, stopped \(SIGSTOP\)\): step \d+", str(raised.value))
        deadline = time.time() + 30  # polled: the watchdog's thread may reap the process first
        while victim.exitcode is None and time.time() < deadline:
            time.sleep(0.2)
        assert victim.exitcode not in (None, 0)  # killed (or ended by its broken group once continued)
    finally:
        llm.shutdown()
    err = capfd.readouterr().err
    assert "Python stack of rank 0" in err and err.count("Thread 0x") >= 2  # rank 0's and rank 1's stacks


def test_a_rank_that_raises_is_reported(reference):
    """A rank that raises while loading makes rank 0 fail at once with that rank's error message."""
    folder = reference["qwen2"][0]
    start = time.time()
    with pytest.raises(ptp.RankFailedError, match=r"rank 1 failed: ValueError: rank 1 cannot use this seed"):
        ptp.LLM(str(folder), device="cpu", tp=2, load_format="dummy", seed=_SeedThatBreaksOnRank1(0))
    assert time.time() - start < 60


class _SeedThatBreaksOnRank1(int):
    """An int on rank 0; on the spawned rank 1 (after pickling) one that raises when used."""

    def __reduce__(self):
        return (_Broken, (int(self),))


class _Broken(int):
    def __mul__(self, other):
        raise ValueError("rank 1 cannot use this seed")


def test_a_peer_that_never_joins_ends_with_a_clear_message(reference):
    """Rank 0 of a 2-rank torchrun-style world whose rank 1 never starts: a message, not a hang."""
    import socket
    import subprocess
    import sys

    folder = reference["llama"][0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": "lonely"}
    start = time.time()
    out = subprocess.run([sys.executable, "-m", "ptp.generate", "--model", str(folder), "--prompt", "x",
                          "--device", "cpu", "--dist-timeout", "5"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "rank 0 could not join a group of 2 ranks within 5 s" in out.stderr
    assert time.time() - start < 60


def test_a_step_larger_than_one_message(reference):
    """A prefill step of ~2,400 tokens goes to rank 1 in two broadcasts; tokens still equal tp=1."""
    import random

    folder = reference["mistral"][0]
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 380) for _ in range(200)] for _ in range(12)]
    greedy = ptp.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = [o.token_ids for o in ptp.LLM(str(folder), dtype="float32", device="cpu").generate(prompts, greedy)]
    with ptp.LLM(str(folder), dtype="float32", device="cpu", tp=2) as llm:
        assert [o.token_ids for o in llm.generate(prompts, greedy)] == want


TEARDOWN = """
import sys, torch.distributed as dist
from ptp.parallel.mesh import init_distributed, teardown_together
rank, addr = int(sys.argv[1]), sys.argv[2]
d = init_distributed(2, rank, "cpu", addr, 30)
class Runner:
    released = False
    def release(self):
        Runner.released = True
teardown_together(d, Runner())
assert Runner.released and not dist.is_initialized()
print("rank", rank, "done", flush=True)
"""


def test_ranks_tear_the_group_down_together():
    """The shutdown path of CUDA runs (release, barrier, orderly destroy on every rank at once),
    exercised with gloo: both ranks finish it and leave no process group."""
    import subprocess
    import sys

    from ptp.ranks import free_port

    addr = f"tcp://127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", TEARDOWN, str(r), addr], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"rank {r} done" in out, err[-2000:]


NO_MAIN_GUARD = """
import sys
sys.path.insert(0, %r)
import ptp
llm = ptp.LLM(%r, tp=2, dtype="float32", device="cpu")
"""


def test_a_script_without_main_guard_gets_told(reference, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(NO_MAIN_GUARD % (os.path.dirname(__file__), str(reference["llama"][0])))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert 'Build it under `if __name__ == "__main__":`' in out.stderr, out.stderr[-2000:]
    assert "rank 1" in out.stderr
