"""Attention over the paged KV cache, behind one interface.

A backend turns a step's sequences into metadata once (`prepare`), then is called once per layer
with this step's q, k, v of every token ([tokens, heads, head_dim]); it writes k and v into the
cache and returns the attention output of the same shape as q.
"""
from __future__ import annotations

from ptp.attention.torch_sdpa import TorchAttention
from ptp.errors import ConfigError

BACKENDS = {"torch": TorchAttention}
KNOWN_ELSEWHERE = {"triton", "flex", "fa3", "flashinfer", "flashattention"}


def make_backend(name: str, kv_cache, sliding_window: int | None):
    if name not in BACKENDS:
        hint = " (it is not built into this version of ptp)" if name in KNOWN_ELSEWHERE else ""
        raise ConfigError(
            f"--attention-backend {name!r} is not available{hint}; available: {', '.join(sorted(BACKENDS))}."
        )
    return BACKENDS[name](kv_cache, sliding_window)
