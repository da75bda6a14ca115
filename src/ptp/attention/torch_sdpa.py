"""Paged attention with torch's scaled_dot_product_attention.

Each sequence's blocks are gathered into a padded [batch, max_blocks * block_size] view of keys
and values; a boolean mask carries causality, sequence length and the sliding window. Exact and
simple — the reference for the faster backends — but it reads whole blocks up to the longest
sequence, so it is not meant for long contexts on the GPU. One whole prompt from position 0 (the
common prefill step) skips all that: causal SDPA over its own k and v.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ptp.attention.meta import DecodeMeta, register


class TorchAttention:
    name = "torch"

    def __init__(self, kv_cache, sliding_window: int | None):
        self.kv_cache = kv_cache
        self.sliding_window = sliding_window
        self.key = register(self)

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        k_cache, v_cache = self.kv_cache.layer(layer)
        heads_kv, dim = k.shape[1], k.shape[2]
        k_cache.view(-1, heads_kv, dim).index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.view(-1, heads_kv, dim).index_copy_(0, slots, v.to(v_cache.dtype))
        return k_cache, v_cache

    fuses_rope = False  # q and k arrive rotated

    def forward(self, meta, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin=None) -> torch.Tensor:
        assert cos_sin is None, "the torch backend takes q and k already rotated"
        k_cache, v_cache = self.write_kv(layer, meta.slot_mapping, k, v)
        if getattr(meta, "causal", False):  # one whole prompt: its own k, v are all it attends to
            out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                                 v.transpose(0, 1).unsqueeze(0), is_causal=True, enable_gqa=True)
            return out[0].transpose(0, 1).contiguous()  # [T, H, D] in the layout the op promises
        tables = meta.block_tables.long()
        batch, heads_kv, dim = tables.shape[0], k.shape[1], k.shape[2]
        keys = k_cache[tables].view(batch, -1, heads_kv, dim)
        values = v_cache[tables].view(batch, -1, heads_kv, dim)
        if isinstance(meta, DecodeMeta):
            q_padded, mask = q.unsqueeze(1), self._decode_mask(meta, keys.shape[1])
        else:
            q_padded, mask = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[meta.q_index], meta.mask
        out = F.scaled_dot_product_attention(
            q_padded.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, enable_gqa=True,
        ).transpose(1, 2)
        if isinstance(meta, DecodeMeta):
            return out.squeeze(1).contiguous()
        return out.reshape(-1, q.shape[1], dim)[meta.out_index]

    def _decode_mask(self, meta: DecodeMeta, num_keys: int) -> torch.Tensor:
        k_pos = torch.arange(num_keys, device=meta.seq_lens.device).unsqueeze(0)
        lens = meta.seq_lens.long().unsqueeze(1)
        mask = k_pos < lens
        if self.sliding_window is not None:
            mask &= k_pos >= lens - self.sliding_window
        mask |= (lens == 0) & (k_pos == 0)  # padded rows attend to one key: no NaN
        return mask[:, None, None, :]
