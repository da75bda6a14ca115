"""ptp's Triton kernels.

Programmatic dependent launch (PDL, Hopper and newer): the kernels of the batch-1 hot path are
launched so that the next one may start while the previous one finishes. Each such kernel first
does only what depends on nothing before it (loading weights), then `gdc_wait()`s for the
previous kernel's results, and lets its own successor start early (`gdc_launch_dependents()`).
A kernel launched this way must wait before it reads any activation or writes anything; what it
reads before the wait must have been written before the step began (weights, step inputs copied
from the host, the KV cache of earlier steps).
PTP_DISABLE_PDL=1 turns it off (A/B measurements).
"""
from __future__ import annotations

import functools
import os

_PDL: dict[int, bool] = {}  # device index -> launch with PDL (a plain dict: torch.compile reads it as a constant)


def pdl_enabled(device_index: int) -> bool:
    """Whether kernels on this CUDA device are launched with programmatic dependent launch."""
    if device_index not in _PDL:
        import torch

        off = os.environ.get("PTP_DISABLE_PDL", "0") == "1" or os.environ.get("TRITON_INTERPRET") == "1"
        _PDL[device_index] = not off and torch.cuda.get_device_capability(device_index)[0] >= 9
    return _PDL[device_index]


def pdl_for(tensor) -> bool:
    return tensor.is_cuda and pdl_enabled(tensor.device.index if tensor.device.index is not None else 0)


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count
