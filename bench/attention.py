"""Paged decode attention alone: microseconds and % of memory bandwidth on the KV bytes read, per backend.

    python bench/attention.py [--backends triton,torch,flex]
    python bench/attention.py --backends triton --contexts 256,384,512 --batches 512,1024 --groups 4 \
        --tiles 64:4:3,64:4:2,64:8:3,32:4:3,128:8:2      # the kernel's chunk, warps and stages

triton and torch are timed as a decode step runs them, replayed in a CUDA graph; flex as ptp runs
it, eagerly (its BlockMask built once per step, outside the timing), each call's launch included.
"""
from __future__ import annotations

import argparse

import torch

from common import bandwidth, decode_case, eager_us, print_table, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", default="512,4096,32768")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--groups", default="1,4,8", help="query heads per KV head")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--backends", default="triton,torch,flex")
    parser.add_argument("--waves", default="2", help="triton: splits that fill the GPU this many times over "
                        "(ptp uses 2); a list times each")
    parser.add_argument("--tiles", default=None, help="triton: also time the kernel with these "
                        "TOKENS:WARPS:STAGES (chunk of context tokens per loop step, warps, pipeline stages), "
                        "comma-separated, at the splits ptp chooses")
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    backends = ns.backends.split(",")
    from ptp.attention.triton_backend import choose_splits, paged_decode
    from ptp.kernels.paged_attention import paged_decode as kernel
    from ptp.attention.torch_sdpa import TorchAttention
    from ptp.attention.flex_backend import FlexAttention
    from ptp.attention.meta import DecodeMeta
    from ptp.parallel.comm import time_in_graph

    device = torch.device("cuda")
    bw = bandwidth(torch.cuda.get_device_name())
    rows = []
    block = 16
    for ctx in [int(c) for c in ns.contexts.split(",")]:
        for bs in [int(b) for b in ns.batches.split(",")]:
            kv_bytes = 2 * bs * ctx * ns.kv_heads * ns.head_dim * 2
            if kv_bytes > 40e9:
                continue
            cache, new, scratch, tables, lens = decode_case(bs, ctx, ctx, ns.kv_heads, ns.head_dim, block)

            class Cache:  # what a backend reads of ptp's KV cache
                block_size = block
                data = cache

                def layer(self, i):
                    return self.data[0], self.data[1]
            k_cache, v_cache = cache[0], cache[1]
            meta = DecodeMeta(scratch, tables, lens)
            k = torch.zeros(bs, ns.kv_heads, ns.head_dim, device=device, dtype=torch.bfloat16)
            for group in [int(g) for g in ns.groups.split(",")]:
                q = torch.randn(bs, ns.kv_heads * group, ns.head_dim, device=device, dtype=torch.bfloat16)
                timings = {}
                if "triton" in backends:
                    waves = [int(w) for w in ns.waves.split(",")]
                    for w in waves:
                        splits = choose_splits(bs, ns.kv_heads, ctx, device, waves=w)
                        name = "triton" if len(waves) == 1 else f"triton waves={w} splits={splits}"
                        timings[name] = time_in_graph(lambda: paged_decode(
                            q, new, new, scratch, k_cache, v_cache, tables, lens, ns.head_dim ** -0.5,
                            splits=splits), 20)
                    for spec in (ns.tiles.split(",") if ns.tiles else []):
                        tokens, warps, stages = (int(x) for x in spec.split(":"))
                        splits = choose_splits(bs, ns.kv_heads, ctx, device)
                        timings[f"triton {spec}"] = time_in_graph(lambda: kernel(
                            q, new, new, scratch, k_cache, v_cache, tables, lens, ns.head_dim ** -0.5, splits,
                            tokens_per_step=tokens, num_warps=warps, num_stages=stages), 20)
                if kv_bytes * 2 < 8e9:  # the torch and flex backends gather a copy of the context first
                    if "torch" in backends:
                        torch_backend = TorchAttention(Cache(), None)
                        timings["torch"] = time_in_graph(lambda: torch_backend.forward(meta, 0, q, k, k), 5)
                    if "flex" in backends:
                        flex = FlexAttention(Cache(), None)
                        flex.begin_step()
                        timings["flex"] = eager_us(lambda: flex.forward(meta, 0, q, k, k), 10, warmup=3)
                for name, us in timings.items():
                    rows.append({"backend": name, "context": ctx, "batch": bs, "gqa": group, "us": us,
                                 "GB/s": kv_bytes / us / 1e3,
                                 "pct_bw": 100 * kv_bytes / us / 1e-6 / bw if bw else None})
            cache = k_cache = v_cache = Cache = torch_backend = flex = None  # free it for the next context
    print_table(rows, ["backend", "context", "batch", "gqa", "us", "GB/s", "pct_bw"])
    print(f"{torch.cuda.get_device_name()}; KV bytes read = 2 x batch x context x {ns.kv_heads} KV heads x "
          f"{ns.head_dim} x 2 B; % of {bw / 1e12 if bw else '?'} TB/s")
    write_json(ns.json, rows)


if __name__ == "__main__":
    main()
