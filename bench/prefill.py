"""Time to first token of one prompt: eager prefill against prefill compiled with dynamic shapes.

    python bench/prefill.py --model llama-3.1-8b --load-format dummy --input-lens 128,512,2048

Times `LLM.generate` of one token (the prefill step and its sampling) per prompt length: eagerly, then
through the runner's compiled prefill (`--torch-compile-prefill on`: one decoder layer compiled with
dynamic shapes, reused by every layer), then (where CUDA graphs are on) one whole prompt replayed
from the CUDA graph of its length bucket (`PrefillGraphs`) — after a first call, whose time (a
compile, or a recompile) is reported too. Greedy tokens are compared with the eager ones.
"""
from __future__ import annotations

import statistics
import time

import torch

from common import build_llm, engine_parser, print_table, random_prompts, write_json


def main() -> None:
    from ptp.log import setup_logging

    setup_logging()
    parser = engine_parser(__doc__)
    parser.add_argument("--input-lens", default="128,512,2048")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true",
                        help="also print where the host and the GPU spend one compiled prefill of the shortest length")
    ns = parser.parse_args()
    import ptp

    # every prompt is timed several times: with the prefix cache, all but the first would find their
    # blocks cached and compute only the last few tokens
    ns.disable_radix_cache = True
    llm, _ = build_llm(ns)
    runner = llm.engine.runner
    graphs = runner.prefill  # one whole prompt through a CUDA graph per length bucket (None: not built)
    runner.prefill = runner.run_layer = None  # eager first, whatever the flags say
    vocab = llm.engine.config.vocab_size
    one = ptp.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    lengths = [int(n) for n in ns.input_lens.split(",")]
    prompts = {n: random_prompts(1, n, vocab, seed=n)[0] for n in lengths}

    def ttft_ms(prompt) -> tuple[float, list[int]]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = llm.generate([prompt], one, use_tqdm=False)[0].token_ids
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3, out

    rows, eager_tokens = [], {}
    for n in lengths:
        ttft_ms(prompts[n])  # warm up
        times = [ttft_ms(prompts[n]) for _ in range(ns.repeat)]
        eager_tokens[n] = times[0][1]
        rows.append({"prefill": "eager", "input_len": n, "ttft_ms": statistics.median(t for t, _ in times)})
    runner.compile_prefill()
    modes = [("compiled (dynamic)", None)] + ([("compiled + CUDA graph", graphs)] if graphs is not None else [])
    for mode, prefill in modes:
        runner.prefill = prefill
        for n in lengths:
            first, tokens = ttft_ms(prompts[n])
            times = [ttft_ms(prompts[n]) for _ in range(ns.repeat)]
            rows.append({"prefill": mode, "input_len": n, "ttft_ms": statistics.median(t for t, _ in times),
                         "first_call_ms": first, "same_token": tokens == eager_tokens[n],
                         "graph": prefill is not None and prefill.takes_length(n)})
    print_table(rows, ["prefill", "input_len", "ttft_ms", "first_call_ms", "same_token", "graph"])
    if ns.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ttft_ms(prompts[lengths[0]])
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    write_json(ns.json, rows)
    llm.shutdown()


if __name__ == "__main__":
    main()
