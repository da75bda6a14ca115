"""The front end's own ceiling: `ptp.serve`'s HTTP, tokenizing, detokenizing and SSE, with the engine
replaced by echo replicas that answer every request at once (each step: one token for every open
sample, taken from its prompt), so the cost of the front end is seen apart from the GPU.

    python bench/frontend.py --num-requests 2000 --concurrency 64 --output-len 64 --dp-size 1

Prints requests/s and streamed tokens/s. The load generator shares the machine with the server:
on a small machine it is part of what is measured.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import httpx  # noqa: E402

from common import print_table, write_json  # noqa: E402


class EchoEngine:
    """What run_replica needs of an Engine, answering every open sample with one token per step."""

    class _Alloc:
        num_blocks, num_free = 1000, 1000

    class _Sched:
        def __init__(self):
            self.running, self.waiting, self.num_preemptions = [], [], 0
            self.prefix_query_tokens = self.prefix_hit_tokens = 0
            self.allocator = EchoEngine._Alloc()

    class _Config:
        vocab_size = 49152

    def __init__(self):
        self.config, self.scheduler = self._Config(), self._Sched()
        self.max_model_len, self.kv_capacity_tokens, self.spawned, self.num_finished = 8192, 1 << 20, None, 0
        self.open: dict[tuple[str, int], list] = {}

    def add_request(self, prompt_ids, params, request_id):
        for i in range(params.n):
            self.open[(request_id, i)] = [list(prompt_ids), params.max_tokens or 16, 0]

    def abort(self, request_id, index=None):
        for key in [k for k in self.open if k[0] == request_id and index in (None, k[1])]:
            del self.open[key]

    def has_unfinished(self):
        return bool(self.open)

    def step(self):
        from ptp.outputs import SeqUpdate

        updates = []
        for (rid, i), state in list(self.open.items()):
            prompt, limit, done = state
            state[2] += 1
            finish = "length" if state[2] >= limit else None
            updates.append(SeqUpdate(rid, i, "", [prompt[done % len(prompt)]], None, finish))
            if finish:
                del self.open[(rid, i)]
                if not any(k[0] == rid for k in self.open):
                    self.num_finished += 1
        self.scheduler.running = list(self.open)
        return updates

    def shutdown(self):
        pass


def echo_replica(index: int, addresses) -> None:
    from ptp.replica import ReplicaSockets, run_replica

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sockets = ReplicaSockets(index, addresses)
    status = run_replica(EchoEngine(), index, sockets, [os.getpid()])
    sockets.close()
    os._exit(status)


def front_end(port: int, dp: int, addresses) -> None:
    from ptp.args import EngineArgs
    from ptp.log import setup_logging
    from ptp.serve import parse, run_frontend

    setup_logging()
    ns = parse(["--port", str(port), "--device", "cpu", "--dp-size", str(dp)])
    os._exit(run_frontend(ns, EngineArgs.from_cli(ns), spawn=False, addresses=addresses))


async def load(url: str, n: int, concurrency: int, output_len: int, stream: bool) -> dict:
    sem = asyncio.Semaphore(concurrency)
    tokens, errors = 0, 0
    prompt = "The quick brown fox jumps over the lazy dog. " * 8

    async def one(client, i):
        nonlocal tokens, errors
        body = {"model": "SmolLM2-135M-Instruct", "prompt": f"{i} {prompt}", "max_tokens": output_len,
                "stream": stream, "ignore_eos": True}
        async with sem:
            if not stream:
                r = await client.post("/v1/completions", json=body)
                if r.status_code != 200:
                    errors += 1
                    return
                tokens += r.json()["usage"]["completion_tokens"]
                return
            async with client.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    errors += 1
                    return
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        tokens += bool(json.loads(line[6:])["choices"])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(n)))
        seconds = time.perf_counter() - start
    return {"requests": n, "errors": errors, "seconds": seconds, "req_s": n / seconds, "tok_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dp-size", type=int, default=1)
    parser.add_argument("--port", type=int, default=30123)
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    from ptp import ipc

    addresses = ipc.new_addresses()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=echo_replica, args=(r, addresses)) for r in range(ns.dp_size)]
    front = ctx.Process(target=front_end, args=(ns.port, ns.dp_size, addresses))
    for p in [front, *procs]:
        p.start()
    url = f"http://127.0.0.1:{ns.port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline or not front.is_alive():
            sys.exit("the front end did not start")
        time.sleep(0.3)
    rows = []
    for stream in (True, False):
        row = asyncio.run(load(url, ns.num_requests, ns.concurrency, ns.output_len, stream))
        rows.append({"mode": "stream" if stream else "whole", "dp": ns.dp_size, "concurrency": ns.concurrency,
                     "output_len": ns.output_len, **row})
    os.kill(front.pid, signal.SIGTERM)
    front.join(30)
    for p in procs:
        p.join(10)
    print_table(rows, ["mode", "dp", "concurrency", "output_len", "requests", "errors", "seconds", "req_s", "tok_s"])
    print(f"echo replicas (no model); {os.cpu_count()} CPUs shared by the load generator and the server")
    write_json(ns.json, rows)


if __name__ == "__main__":
    main()
