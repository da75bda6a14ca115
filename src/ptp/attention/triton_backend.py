"""Decode through ptp's Triton paged-decode kernel (kernels/paged_attention.py); prefill through SDPA."""
from __future__ import annotations

import logging

import torch

from ptp.attention.meta import DecodeMeta
from ptp.attention.torch_sdpa import TorchAttention
from ptp.kernels import sm_count

log = logging.getLogger("ptp")


def choose_splits(batch: int, kv_heads: int, max_tokens: int, device: torch.device, waves: int = 2) -> int:
    """Enough (sequence, KV head, split) programs to fill the GPU `waves` times over; at least 256
    tokens each (at the longest context the step's block tables allow)."""
    sms = sm_count(device.index or 0) if device.type == "cuda" else 4
    wanted = -(-waves * sms // max(1, batch * kv_heads))
    return max(1, min(wanted, max_tokens // 256, 64))


def paged_decode(q, k_new, v_new, slots, k_cache, v_cache, block_tables, seq_lens, scale: float,
                 cos_sin=None, splits: int | None = None) -> torch.Tensor:
    """Rotate q and k (given cos_sin), write the step's k, v into the cache and attend: one kernel
    does it all (and, given more than one split, a second merges them; the count is chosen here)."""
    from ptp.kernels.paged_attention import paged_decode as kernel

    max_tokens = block_tables.shape[1] * k_cache.shape[1]
    if splits is None:
        splits = choose_splits(q.shape[0], k_cache.shape[2], max_tokens, q.device)
    return kernel(q, k_new, v_new, slots, k_cache, v_cache, block_tables, seq_lens, scale, splits, cos_sin=cos_sin)


class TritonAttention(TorchAttention):
    name = "triton"

    def __init__(self, kv_cache, sliding_window: int | None):
        super().__init__(kv_cache, sliding_window)
        self.fuses_rope = sliding_window is None  # else decode falls back to the torch path
        if sliding_window is not None:
            log.warning("the triton decode kernel has no sliding window; decode uses the torch backend")

    def forward(self, meta, layer: int, q, k, v, cos_sin=None):
        if not isinstance(meta, DecodeMeta) or self.sliding_window is not None:
            return super().forward(meta, layer, q, k, v, cos_sin)
        k_cache, v_cache = self.kv_cache.layer(layer)
        return paged_decode(q, k, v, meta.slot_mapping, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                            q.shape[-1] ** -0.5, cos_sin)
