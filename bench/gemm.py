"""The projections of a decode step alone: cuBLAS (F.linear) against ptp's skinny kernel, per row count.

    python bench/gemm.py --rows 1,2,4,8

Each call is replayed 24 times inside one CUDA graph, each call on another copy of the weights
(enough copies to exceed the L2 cache, as in a decode step, where no projection's weights are
still cached); TB/s counts the weight bytes, against the device's copy bandwidth. With PDL (Hopper)
the skinny calls overlap each other's start and end as they do in a decode step.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import bandwidth, print_table, write_json

from ptp.ops import copies_beyond_l2, time_rotating  # noqa: E402  (common puts src on the path)

SHAPES = {  # Llama-3.1-8B at tp=1: (N, K)
    "qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
    "down_proj": (4096, 14336), "lm_head": (128256, 4096),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="1,2,4")
    parser.add_argument("--tp", type=int, default=1, help="divide N (column-parallel) or K (row-parallel) by this")
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    from ptp.ops import tune_skinny

    bw = bandwidth(torch.cuda.get_device_name())
    rows_out, totals = [], {}
    for rows in [int(r) for r in ns.rows.split(",")]:
        for name, (n, k) in SHAPES.items():
            if name in ("o_proj", "down_proj"):
                k //= ns.tp
            else:
                n //= ns.tp
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            if rows <= 4:
                tuned = tune_skinny(x, w, None)
                cublas, skinny, best = tuned["torch_us"], tuned["skinny_us"], tuned["skinny_tile"]
            else:
                copies = copies_beyond_l2(w)
                cublas, skinny, best = time_rotating(lambda w: F.linear(x, w), copies), None, None
                del copies
            gb = w.numel() * 2 / 1e9
            row = {"rows": rows, "proj": name, "N": n, "K": k, "MB": gb * 1e3, "cublas_us": cublas,
                   "cublas_TBps": gb / cublas * 1e3, "skinny_us": skinny,
                   "skinny_TBps": gb / skinny * 1e3 if skinny else None,
                   "ideal_us": gb * 1e9 / bw * 1e6 if bw else None, "tile": "x".join(map(str, best)) if best else ""}
            if rows <= 4:
                row["tiles_us"] = tuned["tiles"]  # every tile timed (JSON only)
            rows_out.append(row)
            t = totals.setdefault(rows, [0.0, 0.0])
            per_layer = 1 if name == "lm_head" else 32
            t[0] += per_layer * cublas
            t[1] += per_layer * min(skinny or cublas, cublas)
    print_table(rows_out, ["rows", "proj", "N", "K", "MB", "cublas_us", "cublas_TBps", "skinny_us", "skinny_TBps",
                           "ideal_us", "tile"])
    for rows, (c, s) in totals.items():
        print(f"rows {rows}: one 8B step's projections (32 layers + lm_head): cuBLAS {c / 1e3:.3f} ms, "
              f"the faster of the two per shape {s / 1e3:.3f} ms")
    write_json(ns.json, rows_out)


if __name__ == "__main__":
    main()
