"""Custom operators of the model's hot path, registered with torch.library so that torch.compile
traces them as opaque calls and CUDA graphs capture them."""
from __future__ import annotations

import json
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

# Set PTP_DISABLE_SKINNY_GEMM=1 to send every projection to cuBLAS (for A/B measurements).
SKINNY = os.environ.get("PTP_DISABLE_SKINNY_GEMM", "0") != "1"
SKINNY_MAX_ROWS = 1  # bench/gemm.py on an H200: at 2 and 4 rows cuBLAS won every 8B projection
# Under the Triton interpreter (tests on CPU) the kernel runs on CPU tensors too.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


log = logging.getLogger("ptp")
_CHOICE: dict[str, dict] = {}  # shape key -> {"skinny": faster?, "skinny_us", "torch_us"}


@torch.library.custom_op("ptp::skinny_linear", mutates_args=())
def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool = False) -> torch.Tensor:
    """x @ weight.T + bias for a few rows (gated: silu(gate) * up of x = [gate | up] first): ptp's
    skinny kernel (kernels/skinny_gemm.py) or torch (cuBLAS), whichever measured faster for this shape
    on this GPU (on its first call, before any capture)."""
    from ptp.kernels.skinny_gemm import skinny_linear as kernel

    if _prefer_skinny(x, weight, bias, gated):
        return kernel(x, weight, bias, gated=gated)
    return _torch_linear(x, weight, bias, gated)


@skinny_linear.register_fake
def _(x, weight, bias, gated=False):
    return x.new_empty(x.shape[0], weight.shape[0])


def _torch_linear(x, weight, bias, gated: bool):
    if gated:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    return F.linear(x, weight, bias)


def _prefer_skinny(x, weight, bias, gated: bool) -> bool:
    """Whether the skinny kernel is faster than torch's path for this shape: measured once per GPU
    model and torch version, then kept in the machine cache (warm starts skip it, and every run of
    a machine makes the same choice)."""
    if not x.is_cuda:
        return True  # the Triton interpreter (tests): always the kernel
    key = (f"{tuple(x.shape)}x{tuple(weight.shape)} {str(x.dtype).removeprefix('torch.')}"
           f"{' bias' if bias is not None else ''}{' gated' if gated else ''}")
    if not _CHOICE:
        _CHOICE.update(_load_choices())
    entry = _CHOICE.get(key)
    if entry is not None:
        return entry["skinny"]
    if torch.cuda.is_current_stream_capturing():
        return False  # cannot measure inside a capture; warm-up runs come first, so this is rare
    from ptp.kernels.skinny_gemm import skinny_linear as kernel
    from ptp.parallel.comm import time_in_graph

    # the first call of the kernel (outside the graph) autotunes it
    skinny = time_in_graph(lambda: kernel(x, weight, bias, gated=gated), 10)
    cublas = time_in_graph(lambda: _torch_linear(x, weight, bias, gated), 10)
    _CHOICE[key] = {"skinny": skinny < cublas, "skinny_us": round(skinny, 2), "torch_us": round(cublas, 2)}
    log.debug("%s: skinny kernel %.1f us, torch %.1f us", key, skinny, cublas)
    _save_choices()
    return skinny < cublas


def _load_choices() -> dict:
    from ptp.parallel.comm import machine_cache_file

    path = machine_cache_file("skinny-gemm")
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def _save_choices() -> None:
    from ptp.parallel.comm import machine_cache_file

    path = machine_cache_file("skinny-gemm")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_CHOICE, indent=1))
        os.replace(tmp, path)  # ranks of one machine may write at once: each write is whole
    except OSError as e:
        log.warning("could not cache the skinny-GEMM choices in %s: %s", path, e)


def _skinny_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    rows = x.shape[0] if x.dim() == 2 else None
    return (SKINNY and type(rows) is int and rows <= SKINNY_MAX_ROWS and (x.is_cuda or INTERPRET)
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and weight.dtype == x.dtype
            and weight.stride(-1) == 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that a CUDA input with a static, small row count goes to the skinny kernel.

    Under torch.compile a dynamic batch size is a symbol, not an int: those graphs keep cuBLAS.
    """
    if _skinny_ok(x, weight):
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up @ weight.T for x = [gate | up]: SwiGLU's down projection, the activation fused
    into the skinny kernel when that path is taken."""
    if _skinny_ok(x, weight):
        return skinny_linear(x, weight, bias, gated=True)
    return _torch_linear(x, weight, bias, gated=True)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same tensor-parallel plans) whose forward goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def gated(self, x: torch.Tensor) -> torch.Tensor:
        """This layer applied to silu(gate) * up, for x = [gate | up]."""
        return gated_linear(x, self.weight, self.bias)
