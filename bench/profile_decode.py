"""Where the GPU time of one decode step goes: every kernel of a decode-graph replay, by name.

    python bench/profile_decode.py --model llama-3.1-8b --load-format dummy --max-model-len 4096 --batch-sizes 1

Runs torch.profiler over replays of the captured decode graph (context ~256 tokens) and prints,
per kernel name, launches and microseconds per step, then totals by kind of kernel.
"""
from __future__ import annotations

import collections
import re

import torch

from common import build_llm, engine_parser, random_prompts

KINDS = [("matmul", r"gemv|gemm|nvjet|cutlass|sm90_|sm80_|_skinny_mm|splitK|ampere"), ("attention", r"_decode_"),
         ("all-reduce", r"nccl|all_reduce|allreduce|one_shot|two_shot"), ("compiled (inductor)", r"^triton_"),
         ("other", r".")]


def main() -> None:
    parser = engine_parser(__doc__)
    parser.add_argument("--batch-sizes", default="1")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--top", type=int, default=30)
    ns = parser.parse_args()
    import ptp
    from torch.profiler import ProfilerActivity, profile

    llm, _ = build_llm(ns)
    runner = llm.engine.runner
    vocab = runner.config.vocab_size
    for bs in [int(b) for b in ns.batch_sizes.split(",")]:
        # fill the staging buffers with a real step of this batch size, then replay its graph alone
        llm.generate(random_prompts(bs, ns.context, vocab), ptp.SamplingParams(max_tokens=4, ignore_eos=True),
                     use_tqdm=False)
        decode = runner.decode
        graph = decode.graphs[bs][0]
        reps = 20
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                graph.replay()
            torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        wall = start.elapsed_time(end) * 1e3 / reps
        stats = collections.defaultdict(lambda: [0, 0.0])
        for e in prof.key_averages():
            t = getattr(e, "device_time_total", None)
            t = e.cuda_time_total if t is None else t
            if t <= 0 or e.key.startswith(("cudaGraph", "Memcpy", "Memset")) and "Kernel" not in e.key:
                continue
            stats[e.key][0] += e.count
            stats[e.key][1] += t
        total = sum(t for _, t in stats.values()) / reps
        print(f"\n== batch {bs}: graph replay {wall:.1f} us per step; kernels add up to {total:.1f} us "
              f"({len(stats)} kernel names, {sum(c for c, _ in stats.values()) / reps:.0f} launches per step)")
        print(f"{'us/step':>9} {'launches':>8} {'us each':>8}  kernel")
        for name, (count, t) in sorted(stats.items(), key=lambda kv: -kv[1][1])[: ns.top]:
            print(f"{t / reps:9.1f} {count / reps:8.1f} {t / count:8.2f}  {name[:110]}")
        by_kind = collections.defaultdict(lambda: [0.0, 0.0])
        for name, (count, t) in stats.items():
            kind = next(k for k, pattern in KINDS if re.search(pattern, name))
            by_kind[kind][0] += count / reps
            by_kind[kind][1] += t / reps
        print("by kind: " + "; ".join(f"{k} {t:.0f} us in {c:.0f} launches" for k, (c, t) in
                                      sorted(by_kind.items(), key=lambda kv: -kv[1][1])))
    llm.shutdown()


if __name__ == "__main__":
    main()
