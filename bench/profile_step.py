"""Where a decode step's GPU time goes: the kernels of a few decode steps at one batch size, by total
time per step (torch.profiler over CUPTI; kernels replayed from CUDA graphs are traced too).

    python bench/profile_step.py --model qwen3-30b-a3b --load-format dummy --max-model-len 4096 --batch-size 1

Prints one row per kernel name (calls and microseconds per step, share of the step), the sum of kernel
time per step, and the wall time per step, so that launch gaps (wall minus kernel time) show too.
"""
from __future__ import annotations

import collections
import time

import torch

from common import build_llm, engine_parser, print_table, random_prompts, write_json


def main() -> None:
    from ptp.log import setup_logging

    setup_logging()
    parser = engine_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="decode steps profiled")
    parser.add_argument("--top", type=int, default=25, help="kernels listed")
    ns = parser.parse_args()
    import ptp
    from torch.profiler import ProfilerActivity, profile

    llm, args = build_llm(ns)
    engine = llm.engine
    prompts = random_prompts(ns.batch_size, ns.input_len, engine.config.vocab_size, seed=3)
    params = ptp.SamplingParams(temperature=0, ignore_eos=True, max_tokens=ns.steps * 4 + 16)
    for p in prompts:
        engine.add_request(p, params)
    while any(len(s.output_ids) < 8 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill and the first decode steps, outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(ns.steps):
            engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / ns.steps
    while engine.has_unfinished():
        engine.step()
    kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0:
            k = kernels[e.name[:90]]
            k[0] += 1
            k[1] += e.device_time
    total = sum(t for _, t in kernels.values()) / ns.steps
    rows = [{"kernel": name, "calls_per_step": calls / ns.steps, "us_per_step": t / ns.steps,
             "share": t / ns.steps / total if total else 0.0}
            for name, (calls, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[: ns.top]]
    if rows:
        print_table(rows, list(rows[0]))
    summary = {"label": ns.label, "batch": ns.batch_size, "kernel_us_per_step": total, "wall_us_per_step": wall * 1e6,
               "kernels_per_step": sum(c for c, _ in kernels.values()) / ns.steps}
    print_table([summary], list(summary))
    write_json(ns.json, [summary] + rows)
    llm.shutdown()


if __name__ == "__main__":
    main()
