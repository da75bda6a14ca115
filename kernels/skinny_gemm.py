"""y = x @ w.T (+ bias) for a handful of rows: the matrix-vector products of a small-batch decode step.

At batch 1 a decode step is one pass over the weights, and the weight matrices are read by
matrix products with one (or a few) rows. Library GEMMs are tuned for big tiles; here the only
thing that matters is streaming `w` at full memory bandwidth. Each program owns BLOCK_N output
columns (rows of `w`) and walks the whole K dimension, BLOCK_K at a time, keeping a
[ROWS, BLOCK_N, BLOCK_K] float32 partial sum in registers that is reduced once at the end. No
split-K, so no atomics and no second pass: the grid is N / BLOCK_N programs, which for every
projection of a 7-8B model (N >= 4096) is hundreds of programs.

The tile is chosen per shape by ops.py, by timing CONFIGS where the kernel will run: inside a CUDA
graph, over weights that are not in L2. (Triton's autotuner times one call at a time, L2 flushed,
launch included, and its picks measured up to 20% slower in a decode step.)
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ptp.kernels import pdl_for

MAX_ROWS = 4  # beyond this, a tensor-core GEMM reads the weights just as well


@triton.jit
def _w_tile(w_ptrs, k0, K, kk, n_ok, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(w_ptrs + k0, mask=n_ok[:, None], other=0.0)
    return tl.load(w_ptrs + k0, mask=n_ok[:, None] & ((k0 + kk) < K)[None, :], other=0.0)


@triton.jit
def _x_tile(x_ptrs, k0, K, kk, EVEN_K: tl.constexpr):
    """[ROWS, BLOCK_K] of the input, in float32."""
    if EVEN_K:
        return tl.load(x_ptrs + k0).to(tl.float32)
    return tl.load(x_ptrs + k0, mask=((k0 + kk) < K)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _skinny_mm(X, W, B, Y, N, K, s_xm, s_wn, s_ym,
               ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
               USE_PDL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[:, n] = X @ W[n].T (+ B[n]) for this program's BLOCK_N columns n."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    r = tl.arange(0, ROWS)
    w_ptrs = W + n[:, None].to(tl.int64) * s_wn + kk[None, :]
    x_ptrs = X + r[:, None] * s_xm + kk[None, :]
    # The first weight tile depends on no earlier kernel: with PDL it is in flight while the
    # kernel before this one finishes (kernels/__init__.py).
    w = _w_tile(w_ptrs, 0, K, kk, n_ok, EVEN_K)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    acc = w.to(tl.float32)[None, :, :] * _x_tile(x_ptrs, 0, K, kk, EVEN_K)[:, None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        acc += (_w_tile(w_ptrs, k0, K, kk, n_ok, EVEN_K).to(tl.float32)[None, :, :]
                * _x_tile(x_ptrs, k0, K, kk, EVEN_K)[:, None, :])
    y = tl.sum(acc, 2)  # [ROWS, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r[:, None] * s_ym + n[None, :], y.to(Y.dtype.element_ty), mask=n_ok[None, :])


# Tiles (BLOCK_N, BLOCK_K, warps, stages) that ops.py times for each projection shape, in a CUDA
# graph over weights that are not in L2 (as in a decode step), against cuBLAS; the fastest is kept.
# Left out, as bench/gemm.py showed: BLOCK_K 128 (up to 2x slower), 3-4 stages (no gain), BLOCK_K
# 2048-4096, which put a program's first 8-32 KB of weights in flight before the PDL wait (never
# the fastest where cuBLAS was slower; docs/benchmarks.md).
CONFIGS = [(2, 1024, 4, 1), (4, 512, 4, 1), (4, 1024, 4, 1), (8, 256, 4, 1), (8, 512, 4, 1), (8, 512, 8, 1),
           (16, 256, 4, 1), (16, 512, 8, 1), (32, 256, 8, 1),
           (4, 512, 4, 2), (8, 256, 4, 2), (8, 512, 8, 2), (16, 256, 8, 2)]
DEFAULT = (8, 512, 4, 1)


def configs_for(m: int) -> list[tuple[int, int, int, int]]:
    """The tiles worth timing for m rows: the register tile (rows x BLOCK_N x BLOCK_K floats, rows
    padded to a power of two as skinny_linear pads them) within 64 per thread."""
    rows = triton.next_power_of_2(m)
    return [c for c in CONFIGS if rows * c[0] * c[1] <= 64 * 32 * c[2]]


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  block_n: int | None = None, block_k: int | None = None,
                  num_warps: int = 4, num_stages: int = 1) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) @ weight[N, K].T (+ bias) -> [M, N] in x's dtype.

    The tile is block_n x block_k with num_warps and num_stages (ops.py picks it per shape by timing
    CONFIGS); without one, DEFAULT (under the interpreter, a small one).
    """
    m = x.shape[0]
    n, k = weight.shape
    assert m <= MAX_ROWS and x.shape[1] == k and weight.stride(1) == 1, (x.shape, weight.shape)
    x = x.contiguous()
    rows = triton.next_power_of_2(m)
    if rows != m:  # pad to a power of two: the kernel reads ROWS rows
        x = torch.cat([x, x.new_zeros(rows - m, x.shape[1])])
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else y
    use_pdl = pdl_for(x)
    common = dict(ROWS=rows, HAS_BIAS=bias is not None, USE_PDL=use_pdl, launch_pdl=use_pdl)
    if block_n is None:
        block_n, block_k = (4, 64) if os.environ.get("TRITON_INTERPRET") == "1" else DEFAULT[:2]
    _skinny_mm[(triton.cdiv(n, block_n),)](x, weight, b, y, n, k, x.stride(0), weight.stride(0), y.stride(0),
                                           EVEN_K=k % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k,
                                           num_warps=num_warps, num_stages=num_stages, **common)
    return y[:m]
