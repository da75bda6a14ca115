"""Where the GPU time of one decode step goes: every kernel of a decode-graph replay, by name.

    python bench/profile_decode.py --model llama-3.1-8b --load-format dummy --max-model-len 4096 --batch-sizes 1

Runs torch.profiler over replays of the captured decode graph (context ~256 tokens) and prints,
per kernel name, launches and microseconds per step, then totals by kind of kernel.
"""
from __future__ import annotations

import torch

from common import build_llm, engine_parser, random_prompts

from ptp.profiling import kernel_table  # noqa: E402  (common puts src on the path)


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
        print(f"\n== batch {bs}: graph replay {wall:.1f} us per step; " + kernel_table(prof, reps, ns.top))
    llm.shutdown()


if __name__ == "__main__":
    main()
