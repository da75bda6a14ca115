"""Batch-invariant kernels for --enable-deterministic-inference: each row's result is computed the
same way whatever the number of rows, so a request's numbers do not depend on its batch.

A library GEMM picks its tiles, and often splits the K dimension across programs, by the shape
of the call: row 0 of a [1, K] @ [K, N] product and row 0 of a [64, K] @ [K, N] product then sum
their K products in different orders and differ in the last bits. Here:

- `matmul`: one tile configuration for every row count (only the weight's shape could choose,
  and it does not), the whole K dimension walked by one program in a fixed order, no split-K.
- `log_softmax`: one program per row, the vocabulary walked in fixed-size chunks in order.

RMSNorm is one row per program already (kernels/rms_norm.py) and decode attention has a fixed
split size mode (kernels/paged_attention.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# The one tile of `matmul`: rows x columns x K-chunk, warps, pipeline stages. Small tiles keep a
# batch-1 step's grid wide enough to stream the weights (N / 64 programs), and tensor cores
# still serve large row counts.
BLOCK_M, BLOCK_N, BLOCK_K, WARPS, STAGES = 64, 64, 64, 4, 3


@triton.jit
def _matmul(X, W, B, Y, M, N, K, s_xm, s_wn, s_ym,
            HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[m, n] = sum_k X[m, k] W[n, k] (+ B[n]), K walked in BLOCK_K chunks in order, float32 sums."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None].to(tl.int64) * s_xm + rk[None, :]
    w_ptrs = W + rn[None, :].to(tl.int64) * s_wn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        x = tl.load(x_ptrs + k0, mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_ok[:, None] & (rn < N)[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None].to(tl.int64) * s_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=(rm < M)[:, None] & (rn < N)[None, :])


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias) -> [M, N] in x's dtype; row m's bits depend on row m alone."""
    m, k = x.shape
    n = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _matmul[grid](x, weight, bias if bias is not None else y, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
                  HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
                  BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=WARPS, num_stages=STAGES)
    return y


@triton.jit
def _log_softmax(X, Y, V, s_x, s_y, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, V, BLOCK):  # per lane: a running max and sum of exp, chunks in order
        x = tl.load(X + row * s_x + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_use) + tl.exp(x - m_use)
        m = m_new
    top = tl.max(m, 0)
    total = tl.sum(tl.where(m == float("-inf"), 0.0, s * tl.exp(m - top)), 0)
    shift = top + tl.log(total)
    for v0 in range(0, V, BLOCK):
        x = tl.load(X + row * s_x + v0 + offs, mask=v0 + offs < V, other=0.0).to(tl.float32)
        tl.store(Y + row * s_y + v0 + offs, x - shift, mask=v0 + offs < V)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the last dimension of [rows, V], one program per row."""
    rows, vocab = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(rows, vocab, dtype=torch.float32, device=x.device)
    if rows:
        _log_softmax[(rows,)](x, y, vocab, x.stride(0), y.stride(0), BLOCK=1024, num_warps=4)
    return y
