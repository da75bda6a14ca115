"""Load a running server with streaming completions at several request rates, in the manner of
SGLang's bench_serving: throughput, time to first token and inter-token latency (p50, p99).

    python -m ptp.serve --model bench/configs/llama-3.1-8b --load-format dummy --tp 2 &
    python bench/serving.py --url http://127.0.0.1:30000 --request-rates 1,4,16,inf --num-prompts 128

With --shared-prefix C,T,S the load is C chat conversations of T turns over one S-token system
prompt (bench/workloads.py; user messages of --input-len tokens, earlier answers of --output-len):
the rate paces the conversations' starts, each sends its turns one after another, and TTFT is also
given for the first turns and the later ones (whose history a prefix cache holds) apart.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import httpx

from common import print_table, random_prompts, write_json
from workloads import shared_prefix


async def one(client, model, prompt, max_tokens, result):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start = time.perf_counter()
    stamps = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            result["errors"] += 1
            return
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                if json.loads(line[6:])["choices"]:
                    stamps.append(time.perf_counter())
    if not stamps:
        result["errors"] += 1
        return
    result["ttft"].append(stamps[0] - start)
    result["itl"].extend(b - a for a, b in zip(stamps, stamps[1:]))
    result["tokens"] += len(stamps)


async def conversation(client, model, prompts, max_tokens, result):
    """The prompts one after another (turns of one conversation); TTFT of the first and later turns apart."""
    for turn, prompt in enumerate(prompts):
        before = len(result["ttft"])
        await one(client, model, prompt, max_tokens, result)
        if len(result["ttft"]) > before:
            result["ttft_first" if turn == 0 else "ttft_later"].append(result["ttft"][-1])


async def run_rate(url, model, conversations, max_tokens, rate, seed):
    """conversations: lists of prompts, each list sent in turn; the rate paces the lists' starts."""
    rng = random.Random(seed)
    result = {"ttft": [], "ttft_first": [], "ttft_later": [], "itl": [], "tokens": 0, "errors": 0}
    limits = httpx.Limits(max_connections=len(conversations), max_keepalive_connections=len(conversations))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        tasks = []
        for prompts in conversations:
            tasks.append(asyncio.create_task(conversation(client, model, prompts, max_tokens, result)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - start
    q = lambda xs, f: statistics.quantiles(xs, n=100)[f - 1] * 1e3 if len(xs) >= 2 else None  # noqa: E731
    requests = sum(map(len, conversations))
    return {
        "rate": rate, "requests": requests, "errors": result["errors"], "seconds": seconds,
        "req_s": requests / seconds, "output_tok_s": result["tokens"] / seconds,
        "ttft_p50_ms": q(result["ttft"], 50), "ttft_p99_ms": q(result["ttft"], 99),
        "ttft_first_turn_p50_ms": q(result["ttft_first"], 50), "ttft_later_turns_p50_ms": q(result["ttft_later"], 50),
        "itl_p50_ms": q(result["itl"], 50), "itl_p99_ms": q(result["itl"], 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--request-rates", default="1,4,16,inf", help="requests per second (inf: all at once)")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32000, help="token ids are drawn below this")
    parser.add_argument("--shared-prefix", default=None, metavar="C,T,S",
                        help="C conversations of T turns over an S-token system prompt, instead of random prompts")
    parser.add_argument("--max-ttft-p99-ms", type=float, default=1000.0,
                        help="report the highest measured rate whose TTFT p99 stays within this")
    parser.add_argument("--json", default=None)
    parser.add_argument("--label", default="")
    ns = parser.parse_args()
    model = httpx.get(ns.url + "/v1/models").json()["data"][0]["id"]
    rows = []
    for i, rate in enumerate(float(r) for r in ns.request_rates.split(",")):
        if ns.shared_prefix:
            c, t, system = map(int, ns.shared_prefix.split(","))
            # a new system prompt per rate: no rate finds the previous one's blocks cached
            load = shared_prefix(c, t, system, ns.input_len, ns.output_len, ns.vocab, seed=i)
        else:
            load = [[p] for p in random_prompts(ns.num_prompts, ns.input_len, ns.vocab, seed=i)]
        row = asyncio.run(run_rate(ns.url, model, load, ns.output_len, rate, seed=i))
        row["label"] = ns.label
        row["workload"] = f"shared-prefix {ns.shared_prefix}" if ns.shared_prefix else "random"
        rows.append(row)
    columns = ["label", "rate", "requests", "errors", "seconds", "req_s", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms"]
    if ns.shared_prefix:
        columns += ["ttft_first_turn_p50_ms", "ttft_later_turns_p50_ms"]
    print_table(rows, columns + ["itl_p50_ms", "itl_p99_ms"])
    if ns.shared_prefix:
        print(f"conversations, turns, system prompt tokens: {ns.shared_prefix}; user messages of {ns.input_len} "
              f"tokens, answers of {ns.output_len}")
    else:
        print(f"{ns.num_prompts} requests per rate, {ns.input_len} prompt tokens, {ns.output_len} output tokens each")
    within = [r for r in rows if r["ttft_p99_ms"] is not None and r["ttft_p99_ms"] <= ns.max_ttft_p99_ms
              and not r["errors"]]
    if within:
        best = max(within, key=lambda r: r["req_s"])
        print(f"highest rate served with TTFT p99 <= {ns.max_ttft_p99_ms:.0f} ms: {best['rate']} requests/s offered, "
              f"{best['req_s']:.2f} served")
    write_json(ns.json, rows)


if __name__ == "__main__":
    main()
