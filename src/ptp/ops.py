"""Custom operators of the model's hot path, registered with torch.library so that torch.compile
traces them as opaque calls and CUDA graphs capture them."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# Set PTP_DISABLE_SKINNY_GEMM=1 to send every projection to cuBLAS (for A/B measurements).
SKINNY = os.environ.get("PTP_DISABLE_SKINNY_GEMM", "0") != "1"
SKINNY_MAX_ROWS = 1  # rows that go to the skinny kernel; bench/gemm.py measured where it wins
# Under the Triton interpreter (tests on CPU) the kernel runs on CPU tensors too.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@torch.library.custom_op("ptp::skinny_linear", mutates_args=())
def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias for a few rows, streaming the weight at memory bandwidth (kernels/skinny_gemm.py)."""
    from ptp.kernels.skinny_gemm import skinny_linear as kernel

    return kernel(x, weight, bias)


@skinny_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except that a CUDA input with a static, small row count goes to the skinny kernel.

    Under torch.compile a dynamic batch size is a symbol, not an int: those graphs keep cuBLAS.
    """
    rows = x.shape[0] if x.dim() == 2 else None
    if (SKINNY and type(rows) is int and rows <= SKINNY_MAX_ROWS and (x.is_cuda or INTERPRET)
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and weight.dtype == x.dtype
            and weight.stride(-1) == 1):
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same tensor-parallel plans) whose forward goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
