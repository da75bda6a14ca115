"""The one all-reduce of ptp, and the gather of vocabulary-parallel logits.

Row-parallel layers leave each rank a partial sum; `all_reduce` completes it. It is a custom op
(`torch.library`) so torch.compile traces it as one node and CUDA graphs can capture it. Today
it runs the process group's own collective (NCCL on CUDA, gloo on CPU).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_state = {"group": None, "size": 1}


def set_tp_group(group: dist.ProcessGroup | None) -> None:
    _state["group"] = group
    _state["size"] = 1 if group is None else dist.get_world_size(group)


def tp_size() -> int:
    return _state["size"]


@torch.library.custom_op("ptp::all_reduce", mutates_args=())
def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    out = x.contiguous().clone()
    dist.all_reduce(out, group=_state["group"])
    return out


@_all_reduce.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel ranks (identity on one rank)."""
    if _state["size"] == 1:
        return x
    return torch.ops.ptp.all_reduce(x)


def gather_vocab(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Join each rank's vocabulary slice [N, V/tp] into [N, V] (slices may be uneven by one chunk)."""
    size = _state["size"]
    if size == 1:
        return local_logits
    chunk = -(-vocab_size // size)
    padded = local_logits.new_zeros(local_logits.shape[0], chunk)
    padded[:, : local_logits.shape[1]] = local_logits
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous(), group=_state["group"])
    return torch.cat(parts, dim=-1)[:, :vocab_size]
