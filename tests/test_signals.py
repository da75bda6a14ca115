"""Stopping the server: SIGTERM and Ctrl-C drain, a second Ctrl-C exits at once, SIGKILL leaves no
process behind, a client that leaves is noticed, a stopped rank under torchrun is named."""
import json
import os
import signal
import socket
import subprocess
import threading
import time

import httpx
import pytest

from helpers import make_checkpoint
from test_server import MODEL, Server, _same_text_as_llm, alive, descendants, llm_texts

pytestmark = pytest.mark.slow
LONG = 3000  # tokens: a generation that lasts seconds on the tiny model
DRAINED = 200  # tokens: a stream that outlasts the checks made while it drains (a second at least), not much more


@pytest.fixture(scope="module")
def folder(ckpt_root):
    """The tiny model with a context long enough for generations of several seconds."""
    return make_checkpoint(ckpt_root, "qwen2", seed=11, max_position_embeddings=4096)


KV = ("--num-kv-blocks", "260", "--block-size", "16")


def stream_lines(url: str, max_tokens: int, out: list, started: threading.Event) -> None:
    """A streamed completion; every `data:` line goes to `out`."""
    body = {"model": MODEL, "prompt": "Paris", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            out.append(r.status_code)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(line[6:])
                    started.set()
    except httpx.HTTPError as e:
        out.append(e)
    started.set()


def finish_of(lines: list) -> tuple[list[str], dict | None]:
    """(finish reasons seen, usage) of a streamed completion's lines."""
    chunks = [json.loads(x) for x in lines[1:] if isinstance(x, str) and x != "[DONE]"]
    reasons = [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]]
    return reasons, next((ch["usage"] for ch in chunks if ch.get("usage")), None)


def gone(pids, seconds: float) -> list[int]:
    """The pids still alive after up to `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


def port_free(port: int) -> bool:
    """Whether a new server could listen on the port, as a restarted ptp.serve would: with SO_REUSEADDR,
    as uvicorn binds. A connection that the server closed itself stays in TIME_WAIT for a minute after
    the process is gone, and fails a plain bind; a socket still listening fails this one too."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def sigterm_during_a_stream(s: Server, target: int, max_tokens: int) -> tuple[list, int, str]:
    """Start a stream, send SIGTERM to `target` once it runs; returns (its lines, exit code, output)."""
    tree = descendants(s.proc.pid)
    lines, started = [], threading.Event()
    client = threading.Thread(target=stream_lines, args=(s.url, max_tokens, lines, started))
    client.start()
    try:
        assert started.wait(60)
        os.kill(target, signal.SIGTERM)
        time.sleep(0.5)  # while it drains: new requests are refused with 503
        late = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert late.status_code == 503 and late.json()["error"]["type"] == "service_unavailable", late.text
        client.join(60)
        code = s.proc.wait(60)
        left = gone(tree, 10)
    finally:
        kill_all([s.proc.pid, *descendants(s.proc.pid)])
    output = s.proc.stdout.read()
    assert not left, f"processes of the server still alive: {left}\n{output[-3000:]}"
    assert port_free(s.port)
    return lines, code, output


def test_sigterm_lets_a_stream_finish_then_every_process_exits_0(folder):
    s = Server(folder, "--tp", "2", *KV)
    lines, code, output = sigterm_during_a_stream(s, s.proc.pid, DRAINED)
    assert lines[0] == 200 and lines[-1] == "[DONE]", lines[-3:]
    reasons, usage = finish_of(lines)
    assert reasons == ["length"] and usage["completion_tokens"] == DRAINED, (reasons, usage)
    assert code == 0, output[-3000:]
    assert "draining 1 request(s) for up to 25 s (--graceful-timeout)" in output
    assert "Traceback" not in output and "Task was destroyed" not in output, output[-3000:]


def test_openai_client_under_torchrun_tp2_then_sigterm_to_torchrun_lets_a_stream_finish(folder):
    s = Server(folder, *KV, torchrun=2)
    try:
        _same_text_as_llm(s, llm_texts(folder))
    except BaseException:
        kill_all([s.proc.pid, *descendants(s.proc.pid)])
        raise
    lines, code, output = sigterm_during_a_stream(s, s.proc.pid, DRAINED)
    assert lines[0] == 200 and lines[-1] == "[DONE]", lines[-3:]
    reasons, usage = finish_of(lines)
    assert reasons == ["length"] and usage["completion_tokens"] == DRAINED, (reasons, usage)
    assert "draining 1 request(s)" in output
    # torchrun itself ends with its SignalException's traceback; no rank failed and no ptp code raised
    assert "exitcode" not in output and "/ptp/" not in output, output[-3000:]


def test_ctrl_c_twice_exits_at_once_quietly(folder):
    s = Server(folder, *KV)
    tree = descendants(s.proc.pid)
    lines, started = [], threading.Event()
    client = threading.Thread(target=stream_lines, args=(s.url, LONG, lines, started), daemon=True)
    client.start()
    try:
        assert started.wait(60)
        os.kill(s.proc.pid, signal.SIGINT)
        time.sleep(0.5)
        os.kill(s.proc.pid, signal.SIGINT)
        code = s.proc.wait(10)
        left = gone(tree, 10)
    finally:
        kill_all([s.proc.pid, *descendants(s.proc.pid)])
    output = s.proc.stdout.read()
    assert code == 130 and "second Ctrl-C" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not left, f"processes of the server still alive: {left}"


@pytest.mark.parametrize("torchrun", [0, 2], ids=["server", "torchrun2"])
def test_sigkill_of_the_main_process_leaves_no_process_behind(folder, torchrun):
    s = Server(folder, *KV, *(("--tp", "2") if not torchrun else ("--dp-size", "2")), torchrun=torchrun)
    tree = descendants(s.proc.pid)
    assert len(tree) >= (3 if torchrun else 2), tree  # ranks and the front end, or the replica and its rank
    try:
        s.proc.kill()
        s.proc.wait(5)
        left = gone(tree, 10)
    finally:
        kill_all(tree)
    assert not left, f"processes of the server alive 10 s after SIGKILL: {left}"
    assert port_free(s.port)


def test_an_abandoned_request_is_aborted_and_a_stream_at_the_graceful_timeout_ends_with_abort(folder):
    """A non-streaming request whose client left is aborted within a second (seen in /metrics), an abandoned
    stream leaves no pending task behind, and SIGTERM with a stream running past --graceful-timeout ends
    that stream with a finish_reason "abort" chunk and [DONE]."""
    s = Server(folder, *KV, "--graceful-timeout", "1")
    try:
        aborted = s.metric("ptp:request_success_total", finished_reason="abort")
        body = {"model": MODEL, "prompt": "Paris", "max_tokens": LONG, "ignore_eos": True}
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s.url + "/v1/completions", json=body, timeout=1.0)
        left = time.time()
        while time.time() - left < 1.0 and s.metric("ptp:request_success_total", finished_reason="abort") == aborted:
            time.sleep(0.05)
        assert s.metric("ptp:request_success_total", finished_reason="abort") == aborted + 1
        deadline = time.time() + 5  # the replica's next load report says so too
        while time.time() < deadline and s.metric("ptp:num_requests_running") > 0:
            time.sleep(0.1)
        assert s.metric("ptp:num_requests_running") == 0 and s.metric("ptp:kv_cache_usage_perc") == 0
        assert s.metric("ptp:generation_tokens_total") < LONG / 2
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            next(r.iter_lines())
    except BaseException:
        kill_all([s.proc.pid, *descendants(s.proc.pid)])
        raise
    lines, code, output = sigterm_during_a_stream(s, s.proc.pid, LONG)
    assert lines[-1] == "[DONE]", lines[-3:]
    reasons, usage = finish_of(lines)
    assert reasons == ["abort"] and 0 < usage["completion_tokens"] < LONG, (reasons, usage)
    assert "--graceful-timeout (1 s) passed: 1 request(s) aborted" in output
    assert code == 0, output[-3000:]
    assert "Task was destroyed" not in output and "Traceback" not in output, output[-3000:]


def test_a_stopped_rank_under_torchrun_gives_503_and_every_process_exits(folder):
    s = Server(folder, *KV, "--watchdog-timeout", "3", torchrun=2)
    tree = descendants(s.proc.pid)
    follower = next(int(p) for p in subprocess.run(["pgrep", "-P", str(s.proc.pid)], capture_output=True,
                                                   text=True).stdout.split()
                    if b"RANK=1" in open(f"/proc/{p}/environ", "rb").read().split(b"\0"))
    threading.Timer(1.0, os.kill, (follower, signal.SIGSTOP)).start()
    start = time.time()
    try:
        r = httpx.post(s.url + "/v1/completions", timeout=80, json={
            "model": MODEL, "prompt": "x", "max_tokens": LONG, "ignore_eos": True})
        assert r.status_code == 503, r.text
        assert "rank 1 stopped making progress" in r.json()["error"]["message"]
        answered = time.time()
        s.proc.wait(max(1, 90 - (time.time() - start)))
        exited = time.time() - answered
        left = gone(tree, max(1, 90 - (time.time() - start)))
    finally:
        kill_all([s.proc.pid, *tree])
    output = s.proc.stdout.read()
    assert "rank 1 (pid" in output and "Python stack of rank 0" in output, output[-3000:]
    assert not left, f"processes of the server still alive 90 s after the rank stopped: {left}"
    # rank 0 exits on its own: torchrun's kill of a worker that ignores its SIGTERM comes 30 s after it
    assert exited < 20, f"torchrun exited {exited:.0f} s after the 503 (it killed rank 0?)\n{output[-3000:]}"
