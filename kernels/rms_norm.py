"""RMSNorm of a few rows, with the residual add before it: the norms of a batch-1 decode step.

Inductor fuses the same arithmetic into one kernel too; this one exists so that the norm takes
part in programmatic dependent launch (see kernels/__init__.py): it waits for the projection
before it, then lets the next projection start streaming its weights at once, which hides most
of the norm's two microseconds and the next kernel's ramp-up.

Rounding follows the model's RMSNorm (models/llama.py): the sum x + residual in the input dtype,
mean of squares and scaling in float32, the normed row rounded to the input dtype, then the
product with the weight rounded again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptp.kernels import pdl_for


@triton.jit
def _add_rms_norm(X, R, W, OUT, NEW_R, D, eps, s_x, s_r, s_o, s_nr,
                  HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    d = tl.arange(0, BLOCK)
    ok = d < D
    w = tl.load(W + d, mask=ok, other=0.0)  # a parameter: safe to read before the wait
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(X + row * s_x + d, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * s_r + d, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded to the input dtype, as torch adds
        tl.store(NEW_R + row * s_nr + d, x, mask=ok)
    h = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(h * h, 0) / D + eps)
    normed = (h * inv).to(x.dtype)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(OUT + row * s_o + d, out.to(OUT.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [M, D] (+ residual [M, D]) -> (RMSNorm(sum) * weight, the sum or None without a residual).

    The output's dtype is that of weight * x under torch's type promotion (the model's)."""
    m, dim = x.shape
    out = torch.empty(m, dim, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_residual = torch.empty_like(x) if residual is not None else None
    r = residual if residual is not None else x
    nr = new_residual if new_residual is not None else out
    use_pdl = pdl_for(x)
    block = triton.next_power_of_2(dim)
    _add_rms_norm[(m,)](x, r, weight, out, nr, dim, eps, x.stride(0), r.stride(0), out.stride(0), nr.stride(0),
                        HAS_RESIDUAL=residual is not None, BLOCK=block, USE_PDL=use_pdl,
                        num_warps=max(1, min(8, block // 1024)), launch_pdl=use_pdl)
    return out, new_residual
