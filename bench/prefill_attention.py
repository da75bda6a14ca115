"""Prefill attention of steps of several rows: the paged prefill kernel (kernels/paged_prefill.py,
PTP_PAGED_PREFILL=1) and, on the GPU, flash attention over the packed rows (torch.nn.attention.varlen,
the default there) against the general path (every row's blocks gathered into a padded copy, SDPA
with a boolean mask), one layer, the cache write of the step's k, v included.

    python bench/prefill_attention.py                  # on a GPU: an 8B model's layer (32 heads, 8 KV, dim 128), bf16
    TRITON_INTERPRET=1 python bench/prefill_attention.py --tiny   # on CPU: tiny shapes, checks that it runs

Cases: `cached`: 64 rows of 128 new tokens each after a 2,048-token cached prefix (conversations
that share a prefix-cached history); `batched`: 16 prompts of 256-512 tokens from position 0.
Columns: microseconds per layer, the peak memory a call allocates beyond its output (MB), and the
largest difference between the two outputs.

    python bench/prefill_attention.py --fresh 32       # prompts from position 0, a new mix every call

--fresh N: N steps of ~8,192 prompt tokens from position 0 in a new mix every call (prompts of 26-486
tokens, as an offline run of chat-sized prompts meets them), one layer each, wall time per call with
the host's share (a kernel library that plans per shape pays that on the host), through each way
prompts from position 0 can attend: the general path (padded copy of the cache, boolean mask),
causal SDPA over the prompts padded to the longest (SDPA's own choice of kernel, and flash attention
only), and flash attention over the packed prompts (torch.nn.attention.varlen).
"""
from __future__ import annotations

import argparse
import dataclasses
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
    from ptp.attention.torch_sdpa import TorchAttention, varlen_fits
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
    general = dataclasses.replace(meta, causal=False, k_slots=None)  # the padded copy and the mask
    padded = TorchAttention(cache, None)
    os.environ["PTP_PAGED_PREFILL"] = "1"
    paged = TritonAttention(cache, None)
    runs = {"padded SDPA": lambda: padded.forward(general, 0, q, k, v),
            "paged kernel": lambda: paged.forward(general, 0, q, k, v)}
    if (meta.causal or meta.k_slots is not None) and varlen_fits(q):  # what the GPU takes by default
        runs["packed varlen"] = lambda: padded.forward(meta, 0, q, k, v)
    want = runs["padded SDPA"]().float()
    row = dict(case=name, rows=len(starts), new_tokens=tokens, context=max(s + n for s, n in zip(starts, lens)))
    for label, fn in runs.items():
        row[f"{label} us"] = timed_us(fn, ns.iters, device)
        row[f"{label} MB"] = extra_mb(fn, q.numel() * q.element_size(), device)
        if label != "padded SDPA":
            row[f"{label} max diff"] = (fn().float() - want).abs().max().item()
    row["speedup"] = row["padded SDPA us"] / row["paged kernel us"]
    return row


def fresh_mixes(ns, device) -> list[dict]:
    import contextlib
    import random

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ptp.attention import torch_sdpa
    from ptp.attention.meta import PrefillMeta
    from ptp.attention.torch_sdpa import TorchAttention
    from ptp.kv_cache import KVCache

    bs, kv, heads, dim, dtype = ns.block_size, ns.kv_heads, ns.heads, ns.head_dim, torch.bfloat16
    cache = KVCache(1, 8192 // bs + 64, bs, kv, dim, dtype, device)
    backend = TorchAttention(cache, None)
    fits = torch_sdpa.varlen_fits

    def mix(seed: int):
        rng = random.Random(seed)
        lens, total = [], 0
        while total < 8192 - 26:
            lens.append(min(rng.randint(26, 486), 8192 - total))
            total += lens[-1]
        tables, at = [], 0
        for n in lens:
            tables.append(list(range(at, at + -(-n // bs))))
            at += len(tables[-1])
        slots = torch.tensor([t[p // bs] * bs + p % bs for t, n in zip(tables, lens) for p in range(n)], device=device)
        meta = PrefillMeta.build([0] * len(lens), lens, tables, slots, bs, None, device)
        q, k, v = (torch.randn(total, h, dim, device=device, dtype=dtype) for h in (heads, kv, kv))
        return meta, q, k, v

    ways = {"general (mask)": (False, False, None), "padded causal SDPA": (True, False, None),
            "padded causal flash": (True, False, SDPBackend.FLASH_ATTENTION), "packed varlen": (True, True, None)}
    rows = []
    for label, (causal, packed, kernel) in ways.items():
        if packed and not fits(torch.empty(1, 1, dim, device=device, dtype=dtype)):
            continue
        torch_sdpa.varlen_fits = lambda q, packed=packed: packed
        steps = [mix(seed) for seed in range(ns.fresh + 1)]
        walls = []
        for i, (meta, q, k, v) in enumerate(steps):
            meta.causal = causal
            with sdpa_kernel([kernel]) if kernel is not None else contextlib.nullcontext():
                torch.cuda.synchronize()
                begin = time.perf_counter()
                backend.forward(meta, 0, q, k, v)
                launched = time.perf_counter()
                torch.cuda.synchronize()
                if i:  # the first builds what every later call uses
                    walls.append(((time.perf_counter() - begin) * 1e3, (launched - begin) * 1e3))
        rows.append({"way": label, "steps": len(walls), "ms_per_call": sum(w for w, _ in walls) / len(walls),
                     "host_ms_per_call": sum(h for _, h in walls) / len(walls)})
    torch_sdpa.varlen_fits = fits
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes in float32 (CPU, under TRITON_INTERPRET=1)")
    parser.add_argument("--fresh", type=int, default=0, help="time N steps of new mixes of prompts from position 0 "
                        "(see above; CUDA)")
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if ns.fresh:
        if device.type != "cuda":
            raise SystemExit("--fresh times CUDA kernels: run it on a GPU")
        rows = fresh_mixes(ns, device)
        print_table(rows, list(rows[0]))
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; one layer of {ns.heads} heads, "
              f"{ns.kv_heads} KV heads, head_dim {ns.head_dim}, bf16; wall ms per call incl. the cache write")
        write_json(ns.json, rows)
        return
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
    columns = ["case", "rows", "new_tokens", "context", "padded SDPA us", "paged kernel us", "packed varlen us",
               "speedup", "padded SDPA MB", "paged kernel MB", "packed varlen MB", "paged kernel max diff",
               "packed varlen max diff"]
    print_table(rows, [c for c in columns if any(c in r for r in rows)])
    write_json(ns.json, rows)


if __name__ == "__main__":
    main()
