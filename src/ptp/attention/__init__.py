"""Attention over the paged KV cache, behind one interface.

The runner describes each step with metadata — `DecodeMeta` when every sequence brings one new
token (the hot, graph-captured path), `PrefillMeta` when every one brings several, `MixedMeta`
(the two, each row through its own path) for a mix — and binds it to the backend;
the model calls the bound backend once per layer with that layer's q, k, v for every new token
([tokens, heads, head_dim]). The backend writes k and v into the cache (one indexed copy per
layer for the whole step) and returns the attention output shaped like q.
"""
from __future__ import annotations

import logging
import os

import torch

from ptp.attention.meta import Bound, DecodeMeta, MixedMeta, PrefillMeta, rows_meta, step_meta
from ptp.attention.torch_sdpa import TorchAttention
from ptp.errors import ConfigError

log = logging.getLogger("ptp")
NOT_BUILT_IN = {"fa3", "flashinfer", "flashattention", "flashmla"}


def available_backends(device: torch.device) -> list[str]:
    """In order of preference: `auto` takes the first."""
    from ptp.attention.flex_backend import flex_available

    names = ["torch"]
    if flex_available():
        names.append("flex")
    if device.type == "cuda" and _has_triton():
        names.insert(0, "triton")
    elif os.environ.get("TRITON_INTERPRET") == "1" and _has_triton():
        names.append("triton")  # on CPU, in the Triton interpreter (tests): never the default
    return names


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def make_backend(name: str, kv_cache, sliding_window: int | None, device: torch.device):
    available = available_backends(device)
    if name == "auto":
        name = available[0]
    if name not in available:
        why = " (ptp does not ship it)" if name in NOT_BUILT_IN else ""
        if name == "triton":
            why = " (it needs a CUDA GPU and the triton package)"
        raise ConfigError(
            f"--attention-backend {name!r} is not available here{why}; available: {', '.join(available + ['auto'])}."
        )
    if name == "triton":
        from ptp.attention.triton_backend import TritonAttention
        return TritonAttention(kv_cache, sliding_window)
    if name == "flex":
        from ptp.attention.flex_backend import FlexAttention
        return FlexAttention(kv_cache, sliding_window)
    return TorchAttention(kv_cache, sliding_window)


__all__ = ["Bound", "DecodeMeta", "MixedMeta", "PrefillMeta", "make_backend", "available_backends", "rows_meta",
           "step_meta"]
