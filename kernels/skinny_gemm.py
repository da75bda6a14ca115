"""y = x @ w.T (+ bias) for a handful of rows: the matrix-vector products of a small-batch decode step.

At batch 1 a decode step is one pass over the weights, and the weight matrices are read by
matrix products with one (or a few) rows. Library GEMMs are tuned for big tiles; here the only
thing that matters is streaming `w` at full memory bandwidth. Each program owns BLOCK_N output
columns (rows of `w`) and walks the whole K dimension, BLOCK_K at a time, keeping a
[ROWS, BLOCK_N, BLOCK_K] float32 partial sum in registers that is reduced once at the end. No
split-K, so no atomics and no second pass: the grid is N / BLOCK_N programs, which for every
projection of a 7-8B model (N >= 4096) is hundreds of programs.

The tile shape is autotuned per (N, K, rows) on the first call; calls come from warm-up, before
any CUDA graph is captured.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_ROWS = 4  # beyond this, a tensor-core GEMM reads the weights just as well


@triton.jit
def _skinny_mm(X, W, B, Y, N, K, s_xm, s_wn, s_ym,
               ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    r = tl.arange(0, ROWS)
    w_ptrs = W + n[:, None].to(tl.int64) * s_wn + kk[None, :]
    x_ptrs = X + r[:, None] * s_xm + kk[None, :]
    acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs + k0, mask=n_ok[:, None], other=0.0)
            x = tl.load(x_ptrs + k0)
        else:
            k_ok = (k0 + kk) < K
            w = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptrs + k0, mask=k_ok[None, :], other=0.0)
        if GATED:  # x = silu(gate) * up, gate and up side by side in X, rounded as eager torch rounds
            if EVEN_K:
                up = tl.load(x_ptrs + K + k0)
            else:
                up = tl.load(x_ptrs + K + k0, mask=k_ok[None, :], other=0.0)
            gate = x.to(tl.float32)
            x = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
            x = (x.to(tl.float32) * up.to(tl.float32)).to(up.dtype)
        acc += w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :]
    y = tl.sum(acc, 2)  # [ROWS, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r[:, None] * s_ym + n[None, :], y.to(Y.dtype.element_ty), mask=n_ok[None, :])


def _configs() -> list[triton.Config]:
    # The tiles that won some 8B projection on an H200 (bench/gemm.py), and their neighbours; a single
    # stage: each iteration's load is already large, and pipelining measured no better.
    tiles = [(2, 1024, 4), (4, 512, 4), (4, 1024, 4), (8, 256, 4), (8, 512, 4), (8, 512, 8), (16, 256, 4),
             (16, 512, 8), (32, 256, 8)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=1) for n, k, w in tiles]


def _prune(configs, named_args, **kwargs):
    # keep the register tile (rows x BLOCK_N x BLOCK_K floats) within 64 per thread
    rows = kwargs.get("ROWS", named_args.get("ROWS", 1))
    return [c for c in configs
            if rows * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps] or configs[:1]


def _bench(fn, quantiles=None):
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# Results are cached on disk with Triton's kernels, so a warm start skips the tuning.
_tuned = triton.autotune(configs=_configs(), key=["N", "K", "ROWS", "GATED"], do_bench=_bench, cache_results=True,
                         prune_configs_by={"early_config_prune": _prune})(_skinny_mm)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  block_n: int | None = None, block_k: int | None = None, gated: bool = False) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) @ weight[N, K].T (+ bias) -> [M, N] in x's dtype.

    gated: x is [M, 2K], gate and up side by side, and the product is silu(gate) * up @ weight.T
    (SwiGLU's down projection, without a launch for the activation).
    block_n/block_k fix the tile (tests, the interpreter); otherwise it is autotuned.
    """
    m = x.shape[0]
    n, k = weight.shape
    assert m <= MAX_ROWS and x.shape[1] == (2 * k if gated else k) and weight.stride(1) == 1, (x.shape, weight.shape)
    x = x.contiguous()
    rows = triton.next_power_of_2(m)
    if rows != m:  # pad to a power of two: the kernel reads ROWS rows
        x = torch.cat([x, x.new_zeros(rows - m, x.shape[1])])
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else y
    common = dict(ROWS=rows, HAS_BIAS=bias is not None, GATED=gated)
    if block_n is None and os.environ.get("TRITON_INTERPRET") == "1":
        block_n, block_k = 4, 64
    if block_n is not None:
        _skinny_mm[(triton.cdiv(n, block_n),)](x, weight, b, y, n, k, x.stride(0), weight.stride(0), y.stride(0),
                                               EVEN_K=k % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, **common)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _tuned[grid](x, weight, b, y, n, k, x.stride(0), weight.stride(0), y.stride(0),
                     EVEN_K=k % 1024 == 0, **common)
    return y[:m]
