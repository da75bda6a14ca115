"""Soak a server: many requests from concurrent clients, streaming and not, some clients leaving
mid-stream, with a KV cache small enough that requests are preempted. Checks that every completed
greedy request has the text the same request got alone, that no KV block is in use at the end, and
that the server's memory (RSS of its processes) did not grow; prints a table and the command.

    python bench/soak.py --model llama-3.1-8b --load-format dummy --duration 600 --request-rate 32
    python bench/soak.py --url http://127.0.0.1:30000 --server-pid 1234 --num-requests 2000

Without --url the script starts `python -m ptp.serve` itself with --model and the engine flags given
after `--` (e.g. `-- --tp 2 --num-kv-blocks 64`). Prompts are random token ids (no tokenizer needed,
so dummy weights serve); the references are each distinct prompt sent alone, one after another, which
also warms the server up; then a concurrent burst warms up batching, and the memory baseline is taken.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx

from common import print_table, random_prompts, resolve_config_path


def server_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def metric(url: str, name: str, label: str = "") -> float:
    """The sum of a Prometheus metric's series (over replicas), of those whose labels contain `label`."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(v) for labels, v in re.findall(rf"^{re.escape(name)}(?:{{([^}}]*)}})? (\S+)$", text, re.M)
               if label in labels)


class Load:
    """The requests: distinct prompts (token ids), each sent many times, greedy with a fixed length."""

    def __init__(self, model: str, distinct: int, input_len: int, output_len: int, vocab: int, seed: int = 0):
        self.model, self.output_len = model, output_len
        self.prompts = random_prompts(distinct, input_len, vocab, seed=seed, jitter=0.5)
        self.references: list[str | None] = [None] * distinct

    def body(self, k: int, stream: bool) -> dict:
        return {"model": self.model, "prompt": self.prompts[k], "max_tokens": self.output_len, "temperature": 0,
                "ignore_eos": True, "stream": stream}


async def send(client: httpx.AsyncClient, load: Load, k: int, stream: bool, leave: bool) -> tuple[str, str | None]:
    """One request: ("completed", text), ("disconnected", None) or ("error", why)."""
    try:
        if not stream:
            r = await client.post("/v1/completions", json=load.body(k, False))
            if r.status_code != 200:
                return "error", f"{r.status_code} {r.text[:200]}"
            return "completed", r.json()["choices"][0]["text"]
        text = ""
        async with client.stream("POST", "/v1/completions", json=load.body(k, True)) as r:
            if r.status_code != 200:
                return "error", f"{r.status_code} {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "completed", text
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return "error", str(chunk["error"])
                text += "".join(c["text"] for c in chunk["choices"])
                if leave:  # the client goes away after its first chunk
                    return "disconnected", None
        return "error", "the stream ended without [DONE]"
    except httpx.HTTPError as e:
        return "error", f"{type(e).__name__}: {e}"


async def references(url: str, load: Load) -> None:
    """Each distinct prompt alone, one after another."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for k in range(len(load.prompts)):
            status, text = await send(client, load, k, stream=False, leave=False)
            if status != "completed":
                raise RuntimeError(f"the reference request {k} failed: {text}")
            load.references[k] = text


async def soak(url: str, load: Load, *, num_requests: int | None, duration: float | None, concurrency: int,
               rate: float, stream_fraction: float, disconnect_fraction: float, seed: int = 0) -> dict:
    """Send requests (num_requests of them, or for `duration` seconds) at `rate` per second (inf: as fast as
    `concurrency` clients go); each streams with probability stream_fraction and a fraction
    disconnect_fraction of all requests (streaming ones) leave mid-stream."""
    rng = random.Random(seed)
    leave_given_stream = min(1.0, disconnect_fraction / max(stream_fraction, 1e-9))
    out = {"requests": 0, "completed": 0, "disconnected": 0, "errors": 0, "mismatches": 0, "tokens": 0}
    examples: list[str] = []
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def one(client, k, stream, leave):
        async with gate:
            status, text = await send(client, load, k, stream, leave)
        out[{"completed": "completed", "disconnected": "disconnected", "error": "errors"}[status]] += 1
        if status == "completed":
            out["tokens"] += load.output_len
            if load.references[k] is not None and text != load.references[k]:
                out["mismatches"] += 1
                examples.append(f"prompt {k}: {text!r} != alone {load.references[k]!r}")
        elif status == "error":
            examples.append(text)

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        tasks = []
        while (num_requests is None or len(tasks) < num_requests) and (
                duration is None or time.perf_counter() - start < duration):
            stream = rng.random() < stream_fraction
            leave = stream and rng.random() < leave_given_stream
            tasks.append(asyncio.create_task(one(client, rng.randrange(len(load.prompts)), stream, leave)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
            elif gate.locked():
                await asyncio.sleep(0)
        await asyncio.gather(*tasks)
    out["requests"] = len(tasks)
    out["seconds"] = time.perf_counter() - start
    out["tokens_per_s"] = out["tokens"] / out["seconds"]
    out["examples"] = examples[:5]
    return out


def settle(url: str, timeout: float = 60.0) -> None:
    """Wait until the server has no request running or waiting (aborts of departed clients included)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metric(url, "ptp:num_requests_running") + metric(url, "ptp:num_requests_waiting") == 0:
            return
        time.sleep(0.2)


def run(url: str, pid: int | None, load: Load, *, num_requests: int | None, duration: float | None,
        concurrency: int, rate: float, stream_fraction: float, disconnect_fraction: float,
        warmup_requests: int) -> dict:
    """References, warm-up, memory baseline, the soak, then the state at the end."""
    asyncio.run(references(url, load))
    asyncio.run(soak(url, load, num_requests=warmup_requests, duration=None, concurrency=concurrency,
                     rate=float("inf"), stream_fraction=stream_fraction, disconnect_fraction=disconnect_fraction,
                     seed=1))
    settle(url)
    rss_before = server_rss(pid) if pid else None
    preempted_before = metric(url, "ptp:num_preemptions")
    aborted_before = metric(url, "ptp:request_success_total", 'finished_reason="abort"')
    row = asyncio.run(soak(url, load, num_requests=num_requests, duration=duration, concurrency=concurrency,
                           rate=rate, stream_fraction=stream_fraction, disconnect_fraction=disconnect_fraction))
    settle(url)
    rss_after = server_rss(pid) if pid else None
    row["preemptions"] = metric(url, "ptp:num_preemptions") - preempted_before
    row["aborted"] = metric(url, "ptp:request_success_total", 'finished_reason="abort"') - aborted_before
    row["kv_in_use_at_end"] = metric(url, "ptp:kv_cache_usage_perc")
    row["running_at_end"] = metric(url, "ptp:num_requests_running") + metric(url, "ptp:num_requests_waiting")
    row["rss_after_warmup_mib"] = rss_before / 2**20 if rss_before else None
    row["rss_at_end_mib"] = rss_after / 2**20 if rss_after else None
    row["memory_growth"] = (rss_after - rss_before) / rss_before if rss_before else None
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, engine_flags: list[str], timeout: float = 1200) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "ptp.serve", "--model", model, "--port", str(port), *engine_flags]
    print("starting:", shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the server was not healthy within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (else one is started)")
    parser.add_argument("--server-pid", type=int, default=None, help="with --url: the server's main process, for RSS")
    parser.add_argument("--model", default="llama-3.1-8b", help="a Hub id, a folder, or a bench/configs name")
    parser.add_argument("--load-format", default=None, help="e.g. dummy (passed to the server it starts)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of load (or --num-requests)")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--request-rate", type=float, default=32.0, help="requests per second; inf: no pacing")
    parser.add_argument("--concurrency", type=int, default=32, help="clients at once at most")
    parser.add_argument("--disconnect-fraction", type=float, default=0.2)
    parser.add_argument("--stream-fraction", type=float, default=0.5)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--distinct-prompts", type=int, default=64, help="prompts with a reference each")
    parser.add_argument("--warmup-requests", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000, help="token ids are drawn below this (at most the "
                        "model's vocabulary size)")
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    ns, engine_flags = parser.parse_known_args()
    engine_flags = [f for f in engine_flags if f != "--"]
    if ns.duration is None and ns.num_requests is None:
        parser.error("give --duration or --num-requests")
    proc = None
    url, pid = ns.url, ns.server_pid
    if url is None:
        flags = engine_flags + (["--load-format", ns.load_format] if ns.load_format else [])
        proc, url = start_server(resolve_config_path(ns.model), flags)
        pid = proc.pid
    try:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        load = Load(model, ns.distinct_prompts, ns.input_len, ns.output_len, ns.vocab)
        row = run(url, pid, load, num_requests=ns.num_requests, duration=ns.duration, concurrency=ns.concurrency,
                  rate=ns.request_rate, stream_fraction=ns.stream_fraction,
                  disconnect_fraction=ns.disconnect_fraction, warmup_requests=ns.warmup_requests)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(120)
    for line in row.pop("examples"):
        print("  ", line)
    print_table([row], ["requests", "completed", "disconnected", "aborted", "errors", "mismatches", "preemptions",
                        "kv_in_use_at_end", "rss_after_warmup_mib", "rss_at_end_mib", "memory_growth",
                        "tokens_per_s", "seconds"])
    print("command: python " + shlex.join(sys.argv))
    if ns.json:
        with open(ns.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
