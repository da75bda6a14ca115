"""Two "nodes" on one machine: separate launches with --nnodes 2 --node-rank 0|1 --dist-init-addr 127.0.0.1:PORT."""
import os
import subprocess
import sys
import time

import pytest

import ptp
from helpers import make_checkpoint

pytestmark = pytest.mark.slow
PROMPT = "Paris is the capital of"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def folder(ckpt_root):
    return make_checkpoint(ckpt_root, "llama", seed=7)


@pytest.fixture(scope="module")
def tp1_text(folder):
    with ptp.LLM(str(folder), dtype="float32", device="cpu") as llm:
        return llm.generate([PROMPT], ptp.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))[0].text


def _free_port() -> int:
    from ptp.ranks import free_port
    return free_port()


def launch(module, folder, node, port, *flags):
    args = [sys.executable, "-m", module, "--model", str(folder), "--device", "cpu", "--nnodes", "2",
            "--node-rank", str(node), "--dist-init-addr", f"127.0.0.1:{port}", *flags]
    if module == "ptp.generate":
        args += ["--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS), "--ignore-eos"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("flags", [("--tp", "2"), ("--tp", "2", "--pp-size", "2")],
                         ids=["tp2-one-rank-per-node", "pp2-across-nodes-tp2-inside"])
def test_two_nodes_generate_tp1_tokens(folder, tp1_text, flags):
    port = _free_port()
    nodes = [launch("ptp.generate", folder, n, port, "--dtype", "float32", *flags) for n in (0, 1)]
    outs = [p.communicate(timeout=240) for p in nodes]
    for n, (p, (out, err)) in enumerate(zip(nodes, outs)):
        assert p.returncode == 0, f"node {n}: {err[-3000:]}"
    assert f"> {PROMPT}\n{tp1_text}\n" in outs[0][0]
    assert "follow node 0, which schedules and serves" in outs[1][1]


def test_node1_without_node0_ends_within_its_timeout(folder):
    port = _free_port()
    start = time.time()
    p = launch("ptp.generate", folder, 1, port, "--tp", "2", "--dist-timeout", "4")
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert time.time() - start < 4 + 30  # the timeout, plus starting python and torch
    assert "rank 1 could not join a group of 2 ranks within 4 s" in err, err[-3000:]
    assert f"could not reach the meeting point 127.0.0.1:{port}" in err
    assert "not joined: node 0" in err and "firewall" in err


def test_node0_names_the_ranks_that_did_not_join(folder):
    port = _free_port()
    p = launch("ptp.generate", folder, 0, port, "--tp", "2", "--pp-size", "2", "--dist-timeout", "4")
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "Joined: node 0 (ranks 0, 1); not joined: node 1 (ranks 2, 3)" in err, err[-3000:]


def test_nodes_whose_flags_disagree_are_refused(folder):
    port = _free_port()
    nodes = [launch("ptp.generate", folder, 0, port, "--tp", "2", "--dtype", "float32"),
             launch("ptp.generate", folder, 1, port, "--tp", "2", "--dtype", "bfloat16")]
    outs = [p.communicate(timeout=120) for p in nodes]
    for p, (out, err) in zip(nodes, outs):
        assert p.returncode != 0
        assert "node 1 (rank 1) was started with --dtype bfloat16 but node 0 (rank 0) with --dtype float32" in err, \
            err[-3000:]


class _LateStore:
    """A meeting store in which the peer's flags and count are already there, but whose first look for
    the peer's flags misses them: the peer wrote them between that look and the count."""

    def __init__(self, *args, **kwargs):
        self.data, self.looks = {}, 0

    def set(self, key, value):
        self.data[key] = value

    def get(self, key):
        return self.data[key].encode() if isinstance(self.data[key], str) else self.data[key]

    def check(self, keys):
        self.looks += 1
        return self.looks > 1 and all(k in self.data for k in keys)

    def add(self, key, n):
        self.data[key] = self.data.get(key, 0) + n
        return self.data[key]


def test_a_peer_that_joins_between_two_looks_is_still_compared(monkeypatch):
    """Node 0 must compare the flags of a peer that counted itself just after node 0 looked for its
    flags: going on without comparing left node 0 waiting for a peer that refused to start."""
    import json

    from ptp.errors import ConfigError
    from ptp.parallel import mesh

    store = _LateStore()
    join = mesh.Join("tcp://127.0.0.1:1", rank=0, world=2, per_node=1, timeout_s=5)
    store.set(join._key(1), json.dumps({"--dtype": "bfloat16"}))
    store.add(join.prefix + "joined", 1)
    monkeypatch.setattr(mesh.dist, "TCPStore", lambda *a, **k: store)
    with pytest.raises(ConfigError, match="node 1 \\(rank 1\\) was started with --dtype bfloat16 but node 0"):
        join.meet({"--dtype": "float32"})


def test_two_nodes_serve_an_openai_request(folder, tp1_text):
    """Node 0 serves; node 1 runs the second pipeline stage and serves nothing."""
    import httpx

    port, http = _free_port(), _free_port()
    flags = ("--dtype", "float32", "--pp-size", "2", "--served-model-name", "tiny")
    node1 = launch("ptp.serve", folder, 1, port, *flags)
    node0 = launch("ptp.serve", folder, 0, port, "--port", str(http), *flags)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert node0.poll() is None and node1.poll() is None
            try:
                if httpx.get(f"http://127.0.0.1:{http}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        reply = httpx.post(f"http://127.0.0.1:{http}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == tp1_text
    finally:
        node0.terminate()
        node0.wait(60)
        node1.wait(60)  # ends when node 0 shuts down
