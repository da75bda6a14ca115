"""Per-kernel GPU time of decode steps, from torch.profiler: what `bench/profile_decode.py` prints for
one rank's graph replays, and what `PTP_KERNEL_PROFILE=N` prints on every rank of a real run (N decode
steps after 32 warm ones) — at tp > 1 that shows each rank's share, all-reduces included."""
from __future__ import annotations

import collections
import re

KINDS = [("matmul", r"gemv|gemm|nvjet|cutlass|sm90_|sm80_|_skinny_mm|splitK|ampere"), ("attention", r"_decode_"), ("norm", r"_add_rms_norm"),
         ("all-reduce", r"nccl|all_reduce|allreduce|one_shot|two_shot"), ("compiled (inductor)", r"^triton_"),
         ("other", r".")]


def kernel_table(prof, steps: int, top: int = 30) -> str:
    """Kernels of a finished profile by total time: µs and launches per step, then totals by kind."""
    from torch.autograd import DeviceType

    stats = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.key_averages():
        if getattr(e, "device_type", DeviceType.CUDA) != DeviceType.CUDA:  # a host call (traced runs)
            continue
        t = getattr(e, "device_time_total", None)
        t = e.cuda_time_total if t is None else t
        if t <= 0 or e.key.startswith(("cudaGraph", "Memcpy", "Memset")) and "Kernel" not in e.key:
            continue
        stats[e.key][0] += e.count
        stats[e.key][1] += t
    total = sum(t for _, t in stats.values()) / steps
    launches = sum(c for c, _ in stats.values()) / steps
    lines = [f"kernels add up to {total:.1f} us per step ({len(stats)} names, {launches:.0f} launches per step)",
             f"{'us/step':>9} {'launches':>8} {'us each':>8}  kernel"]
    for name, (count, t) in sorted(stats.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{t / steps:9.1f} {count / steps:8.1f} {t / count:8.2f}  {name[:110]}")
    by_kind = collections.defaultdict(lambda: [0.0, 0.0])
    for name, (count, t) in stats.items():
        kind = next(k for k, pattern in KINDS if re.search(pattern, name))
        by_kind[kind][0] += count / steps
        by_kind[kind][1] += t / steps
    lines.append("by kind: " + "; ".join(f"{k} {t:.0f} us in {c:.0f} launches" for k, (c, t) in
                                         sorted(by_kind.items(), key=lambda kv: -kv[1][1])))
    return "\n".join(lines)


class StepProfiler:
    """Profiles `steps` decode steps (or steps of every kind) after `skip` of them, then logs
    kernel_table (one per rank)."""

    def __init__(self, steps: int, rank: int, skip: int = 32, every_kind: bool = False, trace: str | None = None):
        self.steps, self.rank, self.skip, self.every_kind = steps, rank, skip, every_kind
        self.trace = trace
        self.seen = 0
        self.prof = None

    @classmethod
    def from_spec(cls, spec: str, rank: int) -> "StepProfiler":
        """PTP_KERNEL_PROFILE: `N` (N decode steps after 32), `N:all` (N steps of every kind: prefill,
        mixed and decode), `N:all:S` (after S steps) or `N:all:S:FILE` (and the host's calls beside the
        kernels into FILE, a Chrome trace per rank: FILE.rank0.json ...)."""
        parts = spec.split(":", 3)
        try:
            steps = int(parts[0])
            every = len(parts) > 1 and parts[1] == "all"
            skip = int(parts[2]) if len(parts) > 2 else 32
            if len(parts) > 1 and not every:
                raise ValueError(spec)
        except ValueError:
            raise ValueError(f"PTP_KERNEL_PROFILE={spec!r}: expected N, N:all, N:all:S or N:all:S:FILE (N steps "
                             f"profiled, after S of them; a trace into FILE)") from None
        return cls(steps, rank, skip, every, parts[3] if len(parts) > 3 else None)

    def tick(self) -> None:
        """Call before each step it counts (decode steps, or every step)."""
        import logging

        import torch
        from torch.profiler import ProfilerActivity, profile

        self.seen += 1
        if self.seen == self.skip + 1:
            torch.cuda.synchronize()
            cpu = [ProfilerActivity.CPU] if self.trace else []
            self.prof = profile(activities=cpu + [ProfilerActivity.CUDA])
            self.prof.__enter__()
        elif self.seen == self.skip + self.steps + 1 and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            logging.getLogger("ptp").info("rank %d, %d %s steps:\n%s", self.rank, self.steps,
                                          "every kind of" if self.every_kind else "decode",
                                          kernel_table(self.prof, self.steps))
            if self.trace:
                self.prof.export_chrome_trace(f"{self.trace}.rank{self.rank}.json")
            self.prof = None
