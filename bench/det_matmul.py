"""The batch-invariant matmul (kernels/batch_invariant.py) per 8B projection: is a row's result the same
at one row as inside a batch, and what does each tile cost against cuBLAS?

    python bench/det_matmul.py                     # one H200: every 8B shape, about a minute
    TRITON_INTERPRET=1 python bench/det_matmul.py --tiny   # CPU: one tiny shape, checks the script runs

(a) bitwise: random bf16 inputs (float32 on CPU); each sampled row of M = 2, 7, 64, 333, 2048, 8192 rows, computed with
    each candidate tile, against the same row computed alone (M = 1) with the decode tile that
    config_for picks at one row (and, in the last column, alone with a 64-row tile:
    wgmma's least). The "fixed" candidate is that decode tile at every M (the rule
    TILE_FOLLOWS_ROWS = False); "rows" is config_for's choice per M under TILE_FOLLOWS_ROWS = True;
    the others share the decode tile's BLOCK_K and differ in rows, columns, warps or stages (16-row
    tiles compile to mma.sync on Hopper, 64 rows and more to wgmma). A tile marked "same" may serve
    any row count beside the decode tile; "DIFFERS" names the first M whose rows changed;
    rel_err_vs_fp32 is the rows alone against a float32 product (largest error / largest entry).
(b) time: microseconds per call at M = 1, 8, 64, 256, 2048, 8192, in a CUDA graph with the weights
    rotated through copies that exceed L2 (as in a decode step), for cuBLAS (torch.matmul), the two
    rules, the fastest candidate that (a) found the same and the fastest candidate of all (every
    candidate's time is in the --json output); GB/s of weights read at M <= 64,
    TFLOP/s above. Then one 8B step's projections (32 layers + lm_head) per M for each.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

from common import print_table, write_json

import ptp.kernels.batch_invariant as bi  # noqa: E402  (common puts src on the path)
from ptp.kernels.batch_invariant import Tile, config_for, matmul  # noqa: E402

SHAPES = {  # Llama-3.1-8B at tp=1: (N, K), and how often one decode step runs each
    "qkv": (6144, 4096, 32), "o": (4096, 4096, 32), "gate_up": (28672, 4096, 32), "down": (4096, 14336, 32),
    "lm_head": (128256, 4096, 1),
}
TINY = {"tiny": (80, 192, 1)}
BITWISE_ROWS = (2, 7, 64, 333, 2048, 8192)
TIMED_ROWS = (1, 8, 64, 256, 2048, 8192)
LM_HEAD_ROWS = 2048  # the lm_head sees one row per sequence, never a whole prefill


def rule_tile(n: int, k: int, m: int, follows_rows: bool) -> Tile:
    """config_for under one rule or the other, whatever the module's switch says."""
    saved, bi.TILE_FOLLOWS_ROWS = bi.TILE_FOLLOWS_ROWS, follows_rows
    try:
        return config_for(n, k, m)
    finally:
        bi.TILE_FOLLOWS_ROWS = saved


def candidates(n: int, k: int) -> dict[str, Tile]:
    """Tiles to compare with the decode tile ("fixed"), all with its BLOCK_K (the K order a row's bits
    need); "rows" (config_for per M under TILE_FOLLOWS_ROWS = True) is checked beside them."""
    d = rule_tile(n, k, 1, False)
    bn, bk = d.block_n, d.block_k
    out = {"fixed": d, "16xN*2": Tile(16, min(2 * bn, 128), bk, 4, d.stages), "16xN s4": d._replace(stages=4),
           "32xN": Tile(32, bn, bk, 4, 6), "64xN": Tile(64, bn, bk, 4, 6), "64x64": Tile(64, 64, bk, 4, 5),
           "128x128": Tile(128, 128, bk, 8, 4), "128x256": Tile(128, 256, bk, 8, 3),
           "256x128": Tile(256, 128, bk, 8, 3)}
    return {name: bi._fit(t, 2) for name, t in out.items()}


def sample_rows(m: int, rng: random.Random) -> list[int]:
    return sorted({0, 1, m // 2, m - 1, *(rng.randrange(m) for _ in range(4))} & set(range(m)))


def bitwise(name: str, n: int, k: int, rows: list[int], device: str, dtype: torch.dtype) -> list[dict]:
    """Per candidate: do sampled rows inside each M equal the row alone? (One result per tile.)"""
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(n, k, generator=g).to(device, dtype)
    x = torch.randn(max(rows), k, generator=g).to(device, dtype)
    rng = random.Random(1)
    picked = {m: sample_rows(m, rng) for m in rows}
    decode = rule_tile(n, k, 1, False)
    wide = Tile(64, decode.block_n, decode.block_k, 4, 6)  # the least wgmma tile on Hopper
    every = sorted(set().union(*picked.values()))
    alone = {t: {i: matmul(x[i: i + 1], w, tile=t)[0] for i in every} for t in (decode, wide)}
    want = x[every].float() @ w.float().T
    error = (torch.stack([alone[decode][i] for i in every]).float() - want).abs().max().item() / want.abs().max().item()
    out = []
    for cname, tile in {"rows": None, **candidates(n, k)}.items():
        verdict = {decode: "same", wide: "same"}
        worst = 0.0
        for m in rows:
            y = matmul(x[:m], w, tile=tile or rule_tile(n, k, m, True))
            for ref, rows_alone in alone.items():
                diffs = [(y[i].float() - rows_alone[i].float()).abs().max().item() for i in picked[m]
                         if not torch.equal(y[i], rows_alone[i])]
                if diffs and verdict[ref] == "same":
                    verdict[ref] = f"DIFFERS at M={m}"
                if ref == decode:
                    worst = max([worst, *diffs])
            del y
        out.append({"shape": name, "N": n, "K": k, "candidate": cname, "tile": str(tile or "config_for per M"),
                    "rows_equal_alone": verdict[decode], "max_abs_diff": worst,
                    "vs_64_row_alone": verdict[wide], "rel_err_vs_fp32": error})
    return out


def timer(device: str):
    """us per call of fn(w) over the weights in turn: a CUDA graph on the GPU, wall clock on CPU."""
    if device == "cuda":
        from ptp.ops import time_rotating

        return lambda fn, ws, calls: time_rotating(fn, ws, calls)

    def cpu(fn, ws, calls):
        fn(ws[0])
        start = time.perf_counter()
        for i in range(calls):
            fn(ws[i % len(ws)])
        return (time.perf_counter() - start) / calls * 1e6
    return cpu


def timings(name: str, n: int, k: int, rows: list[int], same: set[str], device: str, dtype: torch.dtype) -> list[dict]:
    from ptp.ops import copies_beyond_l2

    w = torch.randn(n, k, device=device, dtype=dtype)
    ws = copies_beyond_l2(w) if device == "cuda" else [w]
    tiles = candidates(n, k)
    time_us = timer(device)
    out = []
    for m in rows:
        x = torch.randn(m, k, device=device, dtype=dtype)
        calls = (24 if m <= 256 else 4) if device == "cuda" else 2
        t = {"cuBLAS": time_us(lambda w: torch.matmul(x, w.T), ws, calls)}
        picks = {"fixed": rule_tile(n, k, m, False), "rows": rule_tile(n, k, m, True)}
        picks.update({c: tile for c, tile in tiles.items() if c != "fixed"})
        for c, tile in picks.items():
            t[c] = time_us(lambda w: matmul(x, w, tile=tile), ws, calls)
        safe = {c: us for c, us in t.items() if c == "fixed" or c in same and c != "rows"}
        best = min(safe, key=safe.get)
        every = {c: us for c, us in t.items() if c not in ("cuBLAS", "rows")}
        fastest = min(every, key=every.get)
        weight_gb = n * k * w.element_size() / 1e9
        rate = (lambda us: weight_gb / us * 1e6) if m <= 64 else (lambda us: 2 * m * n * k / us / 1e6)
        out.append({"shape": name, "M": m, "cuBLAS_us": t["cuBLAS"], "fixed_us": t["fixed"],
                    "fixed_tile": str(picks["fixed"]),
                    "rows_us": t["rows"], "rows_tile": str(picks["rows"]), "best_same_us": t[best],
                    "best_same_tile": str(picks[best]), "unit": "GB/s" if m <= 64 else "TFLOP/s",
                    "cuBLAS_rate": rate(t["cuBLAS"]), "fixed_rate": rate(t["fixed"]), "rows_rate": rate(t["rows"]),
                    "best_same_rate": rate(t[best]), "fastest_us": t[fastest], "fastest_tile": str(picks[fastest]),
                    "tiles_us": {str(picks[c]): us for c, us in every.items()}, "per_step": SHAPES.get(name, TINY.get(name, (0, 0, 1)))[2]})
        del x
    del ws, w
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="one tiny shape (CPU under TRITON_INTERPRET=1)")
    parser.add_argument("--shapes", default=None, help="comma-separated subset of " + ",".join(SHAPES))
    parser.add_argument("--skip-time", action="store_true", help="the bitwise check only")
    parser.add_argument("--json", default=None)
    ns = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("det_matmul.py: no CUDA device; on CPU run it under TRITON_INTERPRET=1 with --tiny")
    shapes = TINY if ns.tiny or device == "cpu" else {s: SHAPES[s] for s in (ns.shapes or ",".join(SHAPES)).split(",")}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter's tl.dot gets bf16 wrong
    bit_rows = (2, 7, 33) if device == "cpu" else BITWISE_ROWS
    time_rows = (1, 8, 40) if device == "cpu" else TIMED_ROWS
    started = time.perf_counter()
    checks, times = [], []
    for name, (n, k, _) in shapes.items():
        limit = LM_HEAD_ROWS if name == "lm_head" else max(bit_rows)
        checks += bitwise(name, n, k, [m for m in bit_rows if m <= limit], device, dtype)
    print_table(checks, ["shape", "N", "K", "candidate", "tile", "rows_equal_alone", "max_abs_diff", "vs_64_row_alone",
                         "rel_err_vs_fp32"])
    if not ns.skip_time:
        for name, (n, k, _) in shapes.items():
            same = {c["candidate"] for c in checks if c["shape"] == name and c["rows_equal_alone"] == "same"}
            limit = LM_HEAD_ROWS if name == "lm_head" else max(time_rows)
            times += timings(name, n, k, [m for m in time_rows if m <= limit], same, device, dtype)
        print()
        print_table(times, ["shape", "M", "cuBLAS_us", "fixed_us", "rows_us", "best_same_us", "best_same_tile", "unit",
                            "cuBLAS_rate", "fixed_rate", "rows_rate", "best_same_rate", "fastest_us", "fastest_tile"])
        print()
        for m in time_rows:
            at = [t for t in times if t["M"] == m]
            if len(at) == len(shapes):
                total = {c: sum(t[c + "_us"] * t["per_step"] for t in at) / 1e3
                         for c in ("cuBLAS", "fixed", "rows", "best_same")}
                print(f"M={m}: one step's projections (ms): cuBLAS {total['cuBLAS']:.3f}, "
                      f"fixed rule {total['fixed']:.3f}, "
                      f"rows rule {total['rows']:.3f}, fastest bitwise-safe tile per shape {total['best_same']:.3f}")
    ok = all(c["rows_equal_alone"] == "same" for c in checks if c["candidate"] == "rows")
    wgmma_ok = all(c["vs_64_row_alone"] == "same" for c in checks if c["tile"].split("x")[0] in ("64", "128", "256"))
    print(f"\nTILE_FOLLOWS_ROWS = True keeps every sampled row equal to the row alone on every shape here: {ok}; "
          f"every tile of 64 rows or more equals the 64-row tile's row alone: {wgmma_ok} (if only the second, the "
          f"decode tiles must be 64 rows too). Now: TILE_FOLLOWS_ROWS = {bi.TILE_FOLLOWS_ROWS}.")
    if device == "cpu":
        print("(In the interpreter tl.dot is numpy's BLAS, which may sum a row by its place in the tile: the "
              "bitwise table speaks for the GPU only.)")
    print(f"{time.perf_counter() - started:.0f} s on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}")
    print("command: " + ("TRITON_INTERPRET=1 " if device == "cpu" else "") + "python " + " ".join(sys.argv))
    write_json(ns.json, checks + times)


if __name__ == "__main__":
    main()
