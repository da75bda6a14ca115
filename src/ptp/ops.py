"""Custom operators of the model's hot path, registered with torch.library so that torch.compile
traces them as opaque calls and CUDA graphs capture them."""
from __future__ import annotations

import functools
import itertools
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from ptp.kernels import pdl_for
from ptp.parallel.comm import load_machine_cache, save_machine_cache

# Set PTP_DISABLE_SKINNY_GEMM=1 to send every projection to cuBLAS (for A/B measurements).
SKINNY = os.environ.get("PTP_DISABLE_SKINNY_GEMM", "0") != "1"
SKINNY_MAX_ROWS = 1  # at 2 and 4 rows cuBLAS is the faster for every 8B projection (bench/gemm.py)
# Under the Triton interpreter (tests on CPU) the kernel runs on CPU tensors too.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


log = logging.getLogger("ptp")
# --enable-deterministic-inference (set by the runner; one mode per process): projections through the
# batch-invariant matmul, RMSNorm through ptp's one-row-per-program kernel. A plain dict: torch.compile
# reads it as a constant (and guards on it).
DETERMINISTIC = {"on": False}
_CHOICE: dict[str, dict] = {}  # shape key -> {"config": tile or None (torch), "skinny_us", "torch_us", ...}


@torch.library.custom_op("ptp::skinny_linear", mutates_args=())
def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for a few rows: ptp's
    skinny kernel (kernels/skinny_gemm.py) with the tile that measured fastest for this shape on this
    GPU, or torch (cuBLAS) where that was faster still (measured on the first call, before any capture)."""
    from ptp.kernels.skinny_gemm import skinny_linear as kernel

    if not x.is_cuda:  # the Triton interpreter (tests): always the kernel, with its small default tile
        return kernel(x, weight, bias)
    config = _skinny_config(x, weight, bias)
    if config is None:
        return F.linear(x, weight, bias)
    bn, bk, warps, stages = config
    return kernel(x, weight, bias, bn, bk, num_warps=warps, num_stages=stages)


@skinny_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _skinny_config(x, weight, bias) -> tuple | None:
    """The skinny kernel's tile for this shape, or None where torch's path is faster: measured once
    per GPU model and torch version, then kept in the machine cache (warm starts skip it, and every
    run of a machine makes the same choice)."""
    key = (f"{tuple(x.shape)}x{tuple(weight.shape)} {str(x.dtype).removeprefix('torch.')}"
           f"{' bias' if bias is not None else ''}{' pdl' if pdl_for(x) else ''}")
    if not _CHOICE:
        _CHOICE.update(load_machine_cache("skinny-gemm"))
    entry = _CHOICE.get(key)
    if not _valid_choice(entry, x.shape[0]):  # not measured yet, or by another version of ptp
        if torch.cuda.is_current_stream_capturing():
            return None  # cannot measure inside a capture; warm-up runs come first, so this is rare
        entry = _CHOICE[key] = tune_skinny(x, weight, bias)
        log.debug("%s: %s", key, entry)
        save_machine_cache("skinny-gemm", _CHOICE)
    return tuple(entry["config"]) if entry["config"] else None


@functools.lru_cache(maxsize=None)
def _offered(rows: int) -> tuple[str, ...]:
    """The tiles timed for `rows` rows, as a cached choice records them (looked up on every call)."""
    from ptp.kernels.skinny_gemm import configs_for

    return tuple("x".join(map(str, c)) for c in configs_for(rows))


def _valid_choice(entry, rows: int) -> bool:
    """A cached choice this version can use: {"config": None or [BLOCK_N, BLOCK_K, warps, stages],
    "offered": the tiles timed, ...}, made among the tiles this version offers."""
    if not isinstance(entry, dict) or "config" not in entry or tuple(entry.get("offered") or ()) != _offered(rows):
        return False
    config = entry["config"]
    return config is None or (isinstance(config, list) and len(config) == 4
                              and all(isinstance(v, int) and v > 0 for v in config))


def tune_skinny(x, weight, bias) -> dict:
    """Time every tile of the skinny kernel and torch's path for this shape as a decode step runs
    them: in a CUDA graph, each call reading another copy of the weights (more copies than fit in
    L2). Returns {"config": the fastest tile or None for torch, "skinny_us", "torch_us", "tiles"}."""
    from ptp.kernels.skinny_gemm import configs_for
    from ptp.kernels.skinny_gemm import skinny_linear as kernel

    copies = copies_beyond_l2(weight)
    tiles = {}
    for bn, bk, warps, stages in configs_for(x.shape[0]):
        def run(w, bn=bn, bk=bk, warps=warps, stages=stages):
            return kernel(x, w, bias, bn, bk, num_warps=warps, num_stages=stages)
        try:
            run(weight)  # compiles it, outside the graph
            tiles[(bn, bk, warps, stages)] = time_rotating(run, copies)
        except Exception as e:  # noqa: BLE001  a tile this GPU cannot run (shared memory) is skipped
            log.debug("skinny tile %s failed: %s", (bn, bk, warps, stages), e)
    torch_us = time_rotating(lambda w: F.linear(x, w, bias), copies)
    del copies
    best = min(tiles, key=tiles.get) if tiles else None
    skinny_us = tiles[best] if best else float("inf")
    return {"config": list(best) if best and skinny_us < torch_us else None, "skinny_us": round(skinny_us, 2),
            "skinny_tile": list(best) if best else None, "torch_us": round(torch_us, 2),
            "tiles": {"x".join(map(str, t)): round(us, 2) for t, us in tiles.items()}, "offered": list(_offered(x.shape[0]))}


def copies_beyond_l2(weight: torch.Tensor) -> list[torch.Tensor]:
    """weight and enough clones of it that reading them in turn exceeds the L2 cache three times."""
    l2 = getattr(torch.cuda.get_device_properties(weight.device), "L2_cache_size", 50 << 20)
    nbytes = weight.numel() * weight.element_size()
    return [weight] + [weight.clone() for _ in range(max(1, min(8, -(-3 * l2 // nbytes))) - 1)]


def time_rotating(fn, weights: list[torch.Tensor], calls: int = 24) -> float:
    """Mean microseconds of fn(w) in a CUDA graph, w taken from `weights` in turn."""
    from ptp.parallel.comm import time_in_graph

    turn = itertools.count()
    return time_in_graph(lambda: fn(weights[next(turn) % len(weights)]), calls)


def _skinny_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.shape[0] if x.dim() == 2 else None
    return (SKINNY and type(rows) is int and rows <= SKINNY_MAX_ROWS and (x.is_cuda or INTERPRET)
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and weight.dtype == x.dtype
            and weight.stride(-1) == 1)


def set_deterministic(on: bool) -> None:
    DETERMINISTIC["on"] = bool(on)


@torch.library.custom_op("ptp::batch_invariant_linear", mutates_args=())
def batch_invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias where each row's bits depend on that row alone, whatever the row count.

    CUDA: kernels/batch_invariant.py's matmul, its tile from config_for (BLOCK_K by the weight's shape
    alone, so every row's K products are summed in one order), no split-K, no autotuner. CPU, the
    Triton interpreter included: the BLAS matmul with the rows padded to a multiple of 8 and at
    least 16; with fewer rows (1-7, 9-11, measured on MKL) it takes kernels that sum in another order.
    (The interpreter's tl.dot is numpy's BLAS, whose result for a row depends on the row's place in
    the tile: the kernel's own test keeps rows in place, tests/test_deterministic.py.)"""
    if x.is_cuda:
        from ptp.kernels.batch_invariant import matmul

        return matmul(x, weight, bias)
    rows = x.shape[0]
    padded = max(16, -(-rows // 8) * 8)
    if padded != rows:
        x = torch.cat([x, x.new_zeros(padded - rows, x.shape[1])])
    return F.linear(x, weight, bias)[:rows]


@batch_invariant_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("ptp::log_softmax_rows", mutates_args=())
def log_softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax over the last dimension of [rows, V], one row at a time on the GPU
    (kernels/batch_invariant.py); torch's on CPU (its per-row loop is the same for every row)."""
    if x.is_cuda or INTERPRET:
        from ptp.kernels.batch_invariant import log_softmax

        return log_softmax(x)
    return torch.log_softmax(x.float(), dim=-1)


@log_softmax_rows.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.float32)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that a CUDA input with a static, small row count goes to the skinny kernel,
    and in deterministic mode every input goes to the batch-invariant matmul (no skinny autotuner).

    Under torch.compile a dynamic batch size is a symbol, not an int: those graphs keep cuBLAS.
    """
    if DETERMINISTIC["on"]:
        if x.dim() != 2:
            return batch_invariant_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], -1)
        return batch_invariant_linear(x, weight, bias)
    if _skinny_ok(x, weight):
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


@torch.library.custom_op("ptp::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) in one Triton kernel (kernels/rms_norm.py)."""
    from ptp.kernels.rms_norm import add_rms_norm as kernel

    return kernel(x, residual, weight, eps)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)), torch.empty_like(x)


@torch.library.custom_op("ptp::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) * weight in one Triton kernel (kernels/rms_norm.py)."""
    from ptp.kernels.rms_norm import add_rms_norm as kernel

    return kernel(x, None, weight, eps)[0]


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def norm_kernel_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether an RMSNorm goes to ptp's kernel: where the projections after it take the skinny path
    and kernels are chained by programmatic dependent launch (the Triton interpreter: tests).
    Elsewhere inductor's fused kernel is as good. In deterministic mode every 2-D input on CUDA (or
    in the interpreter): the kernel is one row per program, so a row's bits do not depend on the
    batch, and no inductor reduction (whose split may follow the batch size) is left to choose."""
    if DETERMINISTIC["on"]:
        return x.dim() == 2 and (x.is_cuda or INTERPRET) and x.dtype == weight.dtype
    return _skinny_ok(x, weight) and (INTERPRET or pdl_for(x))


class Linear(nn.Linear):
    """nn.Linear (same parameters, same tensor-parallel plans) whose forward goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
