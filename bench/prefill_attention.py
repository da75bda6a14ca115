"""Prefill attention of steps that are not one whole prompt from position 0: the paged prefill kernel
(kernels/paged_prefill.py, PTP_PAGED_PREFILL=1) against the default path (every row's blocks gathered
into a padded copy, SDPA with a boolean mask), one layer, the cache write of the step's k, v included.

    python bench/prefill_attention.py                  # on a GPU: an 8B model's layer (32 heads, 8 KV, dim 128), bf16
    TRITON_INTERPRET=1 python bench/prefill_attention.py --tiny   # on CPU: tiny shapes, checks that it runs

Cases: `cached`: 64 rows of 128 new tokens each after a 2,048-token cached prefix (conversations
that share a prefix-cached history); `batched`: 16 prompts of 256-512 tokens from position 0.
Columns: microseconds per layer, the peak memory a call allocates beyond its output (MB), and the
largest difference between the two outputs.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from common import eager_us, print_table, write_json


def timed_us(fn, iters: int, device: torch.device) -> float:
    """Mean microseconds of fn() over iters calls after one warm call (CUDA events on a GPU)."""
    if device.type == "cuda":
        return eager_us(fn, iters)
    fn()
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - begin) * 1e6 / iters


def extra_mb(fn, out_bytes: int, device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before - out_bytes) / 1e6


def case(name, starts, lens, ns, device, dtype):
    from ptp.attention.meta import PrefillMeta
    from ptp.attention.torch_sdpa import TorchAttention
    from ptp.attention.triton_backend import TritonAttention
    from ptp.kv_cache import KVCache

    bs, kv, heads, dim = ns.block_size, ns.kv_heads, ns.heads, ns.head_dim
    need = [-(-(s + n) // bs) for s, n in zip(starts, lens)]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(sum(need) + 1, generator=g).tolist()  # scattered blocks
    tables, at = [], 0
    for n in need:
        tables.append(perm[at: at + n])
        at += n
    cache = KVCache(1, sum(need) + 1, bs, kv, dim, dtype, device)
    cache.data.normal_()
    slots = torch.tensor([tables[b][p // bs] * bs + p % bs for b, (s, n) in enumerate(zip(starts, lens))
                          for p in range(s, s + n)], device=device)
    tokens = sum(lens)
    q = torch.randn(tokens, heads, dim, device=device, dtype=dtype)
    k = torch.randn(tokens, kv, dim, device=device, dtype=dtype)
    v = torch.randn(tokens, kv, dim, device=device, dtype=dtype)
    meta = PrefillMeta.build(starts, lens, tables, slots, bs, None, device)
    padded = TorchAttention(cache, None)
    os.environ["PTP_PAGED_PREFILL"] = "1"
    paged = TritonAttention(cache, None)
    runs = {"padded SDPA": lambda: padded.forward(meta, 0, q, k, v), "paged kernel": lambda: paged.forward(meta, 0, q, k, v)}
    want = runs["padded SDPA"]().float()
    err = (runs["paged kernel"]().float() - want).abs().max().item()
    row = dict(case=name, rows=len(starts), new_tokens=tokens, context=max(s + n for s, n in zip(starts, lens)))
    for label, fn in runs.items():
        row[f"{label} us"] = timed_us(fn, ns.iters, device)
        row[f"{label} MB"] = extra_mb(fn, q.numel() * q.element_size(), device)
    row["speedup"] = row["padded SDPA us"] / row["paged kernel us"]
    row["max diff"] = err
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes in float32 (CPU, under TRITON_INTERPRET=1)")
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no CUDA GPU here: run on a GPU, or on CPU with TRITON_INTERPRET=1 and --tiny")
    g = torch.Generator().manual_seed(1)
    if ns.tiny:
        ns.heads, ns.kv_heads, ns.head_dim, ns.iters = 4, 1, 32, 1
        cases = [("cached", [40, 40], [8, 8]), ("batched", [0, 0, 0], [12, 20, 16])]
        dtype = torch.float32
    else:
        batched = torch.randint(256, 513, (16,), generator=g).tolist()
        cases = [("cached", [2048] * 64, [128] * 64), ("batched", [0] * 16, batched)]
        dtype = torch.bfloat16
    rows = [case(name, starts, lens, ns, device, dtype) for name, starts, lens in cases]
    print_table(rows, ["case", "rows", "new_tokens", "context", "padded SDPA us", "paged kernel us", "speedup",
                       "padded SDPA MB", "paged kernel MB", "max diff"])
    write_json(ns.json, rows)


if __name__ == "__main__":
    main()
