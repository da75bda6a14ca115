"""Batch-invariant kernels for --enable-deterministic-inference: each row's result is computed the
same way whatever the number of rows, so a request's numbers do not depend on its batch.

A library GEMM picks its tiles, and often splits the K dimension across programs, by the shape
of the call: row 0 of a [1, K] @ [K, N] product and row 0 of a [64, K] @ [K, N] product then sum
their K products in different orders and differ in the last bits. Here:

- `matmul`: the tile comes from `config_for(N, K, M)`, whose BLOCK_K is chosen by the weight's shape
  (N, K) alone; one program walks the whole K dimension in BLOCK_K chunks, in order, into one
  float32 accumulator (no split-K). The rest of the tile (rows, columns, warps, stages) follows M
  for speed: on an H200 (Triton 3.6) every tile from 16x16 to 256x128 with the same BLOCK_K gave the
  same bits for a row, alone or among 2-8192 rows, mma.sync (16- and 32-row tiles) and wgmma (64+)
  alike (bench/det_matmul.py checks this per GPU; PTP_DET_TILE_FOLLOWS_ROWS=0 fixes the whole tile
  by the weight's shape where it would not hold).
- `log_softmax`: one program per row, the vocabulary walked in fixed-size chunks in order.

RMSNorm is one row per program already (kernels/rms_norm.py) and decode attention has a fixed
split size mode (kernels/paged_attention.py).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ptp.kernels import pdl_for


class Tile(NamedTuple):
    """A launch of `_matmul`: rows x columns x K-chunk per program, warps, pipeline stages."""
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}x{self.block_k} w{self.warps} s{self.stages}"


# Whether BLOCK_M, BLOCK_N, warps and stages follow the row count M (BLOCK_K and the K order never
# do). A row's bits are fixed by the order in which its K products are summed: the BLOCK_K chunks,
# walked in order, and inside each chunk the tensor-core instructions' own sums, which
# bench/det_matmul.py found equal for every tile on an H200. Off (PTP_DET_TILE_FOLLOWS_ROWS=0), the
# whole tile is the weight shape's decode tile: batch-invariant whatever the instructions do, and
# slow for prefill.
TILE_FOLLOWS_ROWS = os.environ.get("PTP_DET_TILE_FOLLOWS_ROWS", "1") == "1"
BLOCK_K = 64  # the large tile's natural K-chunk on Hopper; at one row: 128 contiguous bytes per weight row
NARROW = 8192  # output columns up to which a few rows stream the weights in 32-column programs
SMEM_BUDGET = 200 * 1024  # bytes of shared memory one program's pipeline may take (227 KB on Hopper)


def config_for(n: int, k: int, m: int, element_size: int = 2) -> Tile:
    """The tile of an [m, k] @ [n, k].T product. BLOCK_K depends on (n, k) alone, always; the rest
    does too unless TILE_FOLLOWS_ROWS. element_size (bytes of x and weight) only caps the stages so
    the pipeline fits in shared memory; it is the weight's, so it does not follow m either."""
    block_k = min(BLOCK_K, max(16, triton.next_power_of_2(k)))
    narrow = n <= NARROW
    # A few rows (decode): stream the weights. Up to NARROW columns, 32-column programs with a deep
    # pipeline (4096 columns: 128 programs, each a long K walk), beyond it 64x64 tiles (28672
    # columns: 448 programs). Fastest of the tiles timed by bench/det_matmul.py on an H200 (the
    # 8B shapes, within 0-20% of cuBLAS at one row).
    tile = Tile(16, 32, block_k, 4, 8) if narrow else Tile(64, 64, block_k, 4, 5)
    if TILE_FOLLOWS_ROWS and m > 16:
        if m <= 128:  # a batch of decodes: still streaming the weights, through wgmma
            tile = Tile(64, 32, block_k, 4, 6) if narrow else Tile(64, 64, block_k, 4, 5)
        elif m <= 512 and narrow:
            tile = Tile(64, 64, block_k, 4, 5)
        else:  # prefill: the large tile, compute bound
            tile = Tile(256, 128, block_k, 8, 3)
    return _fit(tile, element_size)


def _fit(tile: Tile, element_size: int) -> Tile:
    """The tile with as many of its stages as fit in SMEM_BUDGET (at least 1)."""
    per_stage = (tile.block_m + tile.block_n) * tile.block_k * element_size
    return tile._replace(stages=max(1, min(tile.stages, SMEM_BUDGET // per_stage)))


@triton.jit(do_not_specialize=["M"])  # one compiled kernel per tile, whatever the row count
def _matmul(X, W, B, Y, M, N, K, s_xm, s_wn, s_ym,
            HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr, USE_PDL: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Y[m, n] = sum_k X[m, k] W[n, k] (+ B[n]), K walked in BLOCK_K chunks in order, float32 sums.

    Programs are numbered so that GROUP_M row tiles in turn sweep the column tiles (the weights they
    share stay in L2); which program computes a tile does not change how it is computed."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * tiles_n
    first_m = (pid // group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % rows_in_group
    pid_n = (pid % group) // rows_in_group
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None].to(tl.int64) * s_xm + rk[None, :]
    w_ptrs = W + rn[None, :].to(tl.int64) * s_wn + rk[:, None]
    m_ok = rm < M
    n_ok = rn < N
    if USE_PDL:  # x comes from the kernel before (kernels/__init__.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs + k0, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs + k0, mask=n_ok[None, :], other=0.0)
        else:  # the last chunk padded with zeros: adding 0 * 0 leaves the sum's bits as they were
            k_ok = (k0 + rk) < K
            x = tl.load(x_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None].to(tl.int64) * s_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           tile: Tile | None = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T (+ bias) -> [M, N] in x's dtype; row m's bits depend on row m alone.

    The tile is config_for(N, K, M) unless given (bench/det_matmul.py compares candidates)."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"matmul: x has {k} columns but the weight {tuple(weight.shape)} expects {weight.shape[1]}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    tile = tile or config_for(n, k, m, weight.element_size())
    use_pdl = pdl_for(x)
    grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n),)
    _matmul[grid](x, weight, bias if bias is not None else y, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
                  HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, EVEN_K=k % tile.block_k == 0,
                  USE_PDL=use_pdl, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=8,
                  num_warps=tile.warps, num_stages=tile.stages, launch_pdl=use_pdl)
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
