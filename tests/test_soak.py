"""Soak: a tp=2 server, 1,000 requests from 32 concurrent clients, streaming and not, a fifth of them
leaving mid-stream, a KV cache small enough that requests are preempted. Every completed request has
the greedy text the same request got alone; no KV block is in use at the end; memory does not grow.
The load is bench/soak.py's (the GPU soak), at tiny size: short prompts, few tokens."""
import sys
from pathlib import Path

import pytest

from helpers import make_checkpoint
from test_server import MODEL, Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import soak  # noqa: E402 (bench/soak.py)

pytestmark = pytest.mark.slow


def test_soak_with_disconnects_and_preemption(ckpt_root):
    folder = make_checkpoint(ckpt_root, "qwen2", seed=11)
    # 32 blocks of 4 tokens: a request holds up to 4 blocks, so 32 clients at once preempt one another
    server = Server(folder, "--tp", "2", "--num-kv-blocks", "32", "--block-size", "4")
    try:
        load = soak.Load(MODEL, distinct=48, input_len=6, output_len=6, vocab=380)
        row = soak.run(server.url, server.proc.pid, load, num_requests=1000, duration=None, concurrency=32,
                       rate=float("inf"), stream_fraction=0.5, disconnect_fraction=0.2, warmup_requests=64)
    finally:
        assert server.stop() == 0, server.proc.stdout.read()[-4000:]
    summary = {k: v for k, v in row.items() if k != "examples"}
    assert row["requests"] == 1000 and row["errors"] == 0, (summary, row["examples"])
    assert 150 <= row["disconnected"] <= 250 and row["completed"] == 1000 - row["disconnected"], summary
    # a client that leaves has its request aborted (unless it had already finished: the last chunk came first)
    assert row["aborted"] >= row["disconnected"] / 2, summary
    assert row["mismatches"] == 0, row["examples"]
    assert row["preemptions"] > 0, summary
    assert row["kv_in_use_at_end"] == 0 and row["running_at_end"] == 0, summary
    assert row["memory_growth"] < 0.10, summary
