"""The Triton decode kernel against an earlier version of itself, and its schedules side by side.

    git show <rev>:kernels/paged_attention.py > /tmp/previous.py
    python bench/attention_ab.py --previous /tmp/previous.py

For each shape (context, the longest context the block tables allow, batch, GQA ratio), the time of
one call replayed 20 times in a CUDA graph, as bench/attention.py times it, for: the previous kernel
(if given), this one as ptp runs it ("auto"), and each schedule forced: chunks dealt to the splits
in turn with the first read ahead of the PDL wait ("ahead"), or contiguous ranges; 32- or 64-token
chunks. Every variant's output is checked against the first one's. % of the device's copy bandwidth
(bench/common.py) on the KV bytes read.
"""
from __future__ import annotations

import argparse
import importlib.util

import torch

from common import bandwidth, decode_case  # (common also puts src on the path)

from ptp.attention.triton_backend import choose_splits
from ptp.kernels.paged_attention import paged_decode
from ptp.parallel.comm import time_in_graph

SHAPES = [(384, 4096, 1, 4), (384, 32768, 1, 4), (512, 512, 1, 8), (4096, 4096, 1, 8), (32768, 32768, 1, 1),
          (32768, 32768, 1, 8), (512, 512, 16, 8), (4096, 4096, 16, 4), (4096, 4096, 16, 8), (32768, 32768, 16, 8),
          (512, 512, 64, 8), (4096, 4096, 64, 8), (512, 512, 256, 8), (4096, 4096, 256, 8)]


def load_kernel(path: str):
    spec = importlib.util.spec_from_file_location("previous_paged_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.paged_decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--previous", default=None, help="a file holding an earlier kernels/paged_attention.py")
    parser.add_argument("--shapes", default=None, help="context:max:batch:gqa,... (default: a set of 14)")
    parser.add_argument("--splits", default=None, help="time each of these split counts (default: ptp's choice)")
    ns = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split(":")) for s in ns.shapes.split(",")] if ns.shapes else SHAPES
    variants = [("auto", paged_decode, {}),
                ("ahead t32", paged_decode, dict(prefetch=True, tokens_per_step=32)),
                ("ahead t64", paged_decode, dict(prefetch=True, tokens_per_step=64)),
                ("contig t64", paged_decode, dict(prefetch=False, tokens_per_step=64)),
                ("contig t32", paged_decode, dict(prefetch=False, tokens_per_step=32))]
    if ns.previous:
        variants.insert(0, ("previous", load_kernel(ns.previous), {}))
    dev = torch.device("cuda")
    bw = bandwidth(torch.cuda.get_device_name()) or 4.3e12
    kv_heads, dim = 8, 128
    print("context | max | batch | gqa | splits | " + " | ".join(v[0] for v in variants)
          + f"  (us, % of {bw / 1e12} TB/s)")
    for (ctx, max_len, bs, gqa), splits in [(shape, n) for shape in shapes
                                            for n in (ns.splits.split(",") if ns.splits else [None])]:
        cache, new, spare, tables, lens = decode_case(bs, ctx, max_len, kv_heads, dim)
        q = torch.randn(bs, kv_heads * gqa, dim, device=dev, dtype=torch.bfloat16)
        splits = int(splits) if splits else choose_splits(bs, kv_heads, max_len, dev)
        args = (q, new, new, spare, cache[0], cache[1], tables, lens, dim ** -0.5, splits)
        first = None
        row = []
        for name, fn, kw in variants:
            out = fn(*args, **kw).float()
            first = out if first is None else first
            assert (out - first).abs().max().item() < 2e-2, f"{name} disagrees with {variants[0][0]}"
            row.append(time_in_graph(lambda: fn(*args, **kw), 20))
        kv_bytes = 2 * bs * ctx * kv_heads * dim * 2
        print(f"{ctx} | {max_len} | {bs} | {gqa} | {splits} | "
              + " | ".join(f"{us:.1f} ({100 * kv_bytes / us / 1e-6 / bw:.0f}%)" for us in row))
        del cache


if __name__ == "__main__":
    main()
