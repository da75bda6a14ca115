"""Data parallelism: --dp-size replicas behind one front end, each in processes of its own."""
import asyncio
import os
import signal
import subprocess
import time

import httpx
import pytest

import ptp
from helpers import make_checkpoint
from test_server import MODEL, QUESTION, Server, _alive, descendants, spawned_ranks

pytestmark = pytest.mark.slow
GREEDY = ptp.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = [f"Request {i}: the quick brown fox" + " jumps" * (i % 5) for i in range(16)]


@pytest.fixture(scope="module")
def folder(ckpt_root):
    return make_checkpoint(ckpt_root, "qwen2", seed=11)


@pytest.fixture(scope="module")
def reference(folder):
    """dp=1: the prompts' and the chat questions' greedy texts."""
    llm = ptp.LLM(str(folder), dtype="float32", device="cpu")
    try:
        texts = [o.text for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        chats = [llm.chat(q, GREEDY, use_tqdm=False)[0].text for q in questions()]
    finally:
        llm.shutdown()
    return {"texts": texts, "chats": chats}


def questions():
    return [[{"role": "user", "content": f"Question {i}: " + QUESTION[0]["content"]}] for i in range(8)]


def test_llm_dp2_equals_dp1_in_order(folder, reference):
    with ptp.LLM(str(folder), dtype="float32", device="cpu", dp_size=2) as llm:
        texts = [o.text for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        served = list(llm.replicas.served)
    assert texts == reference["texts"]
    assert served == [8, 8]


async def _chat_all(url: str, stream: bool, count: int = 32) -> list[str]:
    qs = questions()

    async def one(client, i):
        body = {"model": MODEL, "messages": qs[i % len(qs)], "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                "stream": stream}
        if not stream:
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]
        text = ""
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    import json
                    chunk = json.loads(line[6:])
                    text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
        return text

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return await asyncio.gather(*(one(client, i) for i in range(count)))


@pytest.fixture(scope="module")
def dp2xtp2_server(folder):
    """Two replicas of tp=2: the answers test uses it, then the killed-rank test (next in the module) ends
    it (one start-up of five processes for both)."""
    s = Server(folder, "--dp-size", "2", "--tp", "2")
    yield s
    if s.proc.poll() is None:
        s.proc.kill()


@pytest.mark.parametrize("flags", [("--dp-size", "2"), ("--dp-size", "2", "--tp", "2")], ids=["dp2", "dp2xtp2"])
def test_server_dp2_answers_like_dp1_and_uses_both_replicas(folder, reference, flags, request):
    shared = "--tp" in flags
    s = request.getfixturevalue("dp2xtp2_server") if shared else Server(folder, *flags)
    try:
        expected = [reference["chats"][i % 8] for i in range(32)]
        for stream in (False, True):
            assert asyncio.run(_chat_all(s.url, stream)) == expected
        per_replica = [s.metric("ptp:replica_requests_finished", replica=str(r)) for r in range(2)]
        assert all(n > 0 for n in per_replica) and sum(per_replica) >= 64, per_replica
        if not shared:  # SIGTERM leaves no process of the server behind (a replica's followers: test_signals)
            tree = descendants(s.proc.pid)
            assert len(tree) >= 2  # two replicas (and helpers)
            assert s.stop(signal.SIGTERM, timeout=60) == 0
            deadline = time.time() + 10
            while time.time() < deadline and any(_alive(str(p)) for p in tree):
                time.sleep(0.2)
            assert not [p for p in tree if _alive(str(p))]
    finally:
        if not shared and s.proc.poll() is None:
            assert s.stop() == 0


def test_a_killed_rank_in_replica_1_gives_503_and_an_exit_naming_it(dp2xtp2_server):
    s = dp2xtp2_server
    assert s.proc.poll() is None, "the dp2 x tp2 server stopped before this test"
    try:
        replicas = subprocess.run(["pgrep", "-P", str(s.proc.pid)], capture_output=True, text=True).stdout.split()
        ranks = spawned_ranks(s.proc.pid)
        assert len(ranks) == 2
        # the follower of replica 1: the child of the second replica process started
        by_parent = {int(open(f"/proc/{p}/stat").read().split()[3]): p for p in ranks}
        replica_pids = sorted(int(p) for p in replicas if int(p) in by_parent)
        os.kill(by_parent[replica_pids[1]], signal.SIGKILL)
        statuses = set()
        deadline = time.time() + 60
        while s.proc.poll() is None and time.time() < deadline:
            try:
                statuses.add(httpx.post(s.url + "/v1/completions", timeout=30,
                                        json={"model": MODEL, "prompt": "x", "max_tokens": 4}).status_code)
                statuses.add(httpx.get(s.url + "/health", timeout=1).status_code)
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        code = s.proc.wait(10)
        output = s.proc.stdout.read()
        assert code != 0
        assert "replica 1" in output and "rank 1" in output, output[-3000:]
        assert 503 in statuses, f"answers seen: {statuses}; server output:\n{output[-2000:]}"
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_prefix_aware_dispatch_sends_a_shared_prefix_to_one_replica():
    """Unit test of the dispatcher alone: two conversations of six turns, each over its own long prefix."""
    from ptp.args import EngineArgs
    from ptp.frontend import Replicas
    from ptp.sampling import SamplingParams

    sent = []
    for method in ("prefix_aware", "shortest_queue"):
        reps = Replicas(EngineArgs(dp_size=2, load_balance_method=method), None, spawn=False)
        reps._send = lambda r, msg: sent.append((method, r))
        try:
            a, b = list(range(100, 400)), list(range(500, 800))
            for conv in (a, b):
                for turn in range(6):
                    reps.submit(f"{method}-{turn}-{conv[0]}", None, conv + [turn], SamplingParams(max_tokens=1),
                                lambda item: None)
        finally:
            reps.close()
    by_method = {m: [r for mm, r in sent if mm == m] for m in ("prefix_aware", "shortest_queue")}
    aware = by_method["prefix_aware"]
    assert len(set(aware[:6])) == len(set(aware[6:])) == 1 and aware[0] != aware[6], aware
    assert len(set(by_method["shortest_queue"][:6])) == 2  # without it, a conversation's turns spread out
