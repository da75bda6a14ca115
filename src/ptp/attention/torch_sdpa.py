"""Paged attention with torch's scaled_dot_product_attention.

Each sequence's keys are gathered from its blocks into a padded [batch, max_context] view; a
boolean mask carries causality, context length and the sliding window. Queries are padded to
[batch, max_query]. Simple and exact; the reference for faster backends.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks]
    q_index: torch.Tensor       # [B, max_q] index into the T tokens (T = a zero pad row)
    out_index: torch.Tensor     # [T] index into the flattened [B * max_q] output
    mask: torch.Tensor          # [B, 1, max_q, max_ctx] True where a query may attend
    max_ctx: int


class TorchAttention:
    def __init__(self, kv_cache, sliding_window: int | None):
        self.kv_cache = kv_cache
        self.sliding_window = sliding_window
        self.meta: TorchAttentionMetadata | None = None

    def prepare(self, starts: list[int], query_lens: list[int], block_tables: list[list[int]],
                slot_mapping: torch.Tensor, device) -> None:
        batch, max_q = len(starts), max(query_lens)
        ctx_lens = [s + q for s, q in zip(starts, query_lens)]
        max_ctx = max(ctx_lens)
        block_size = self.kv_cache.block_size
        max_blocks = -(-max_ctx // block_size)
        tables = torch.zeros(batch, max_blocks, dtype=torch.long)
        q_index = torch.full((batch, max_q), sum(query_lens), dtype=torch.long)
        out_index, offset = [], 0
        for b, (table, q_len) in enumerate(zip(block_tables, query_lens)):
            tables[b, : len(table[:max_blocks])] = torch.tensor(table[:max_blocks], dtype=torch.long)
            q_index[b, :q_len] = torch.arange(offset, offset + q_len)
            out_index.extend(range(b * max_q, b * max_q + q_len))
            offset += q_len
        starts_t = torch.tensor(starts).view(-1, 1, 1)
        q_pos = starts_t + torch.arange(max_q).view(1, -1, 1)         # absolute position of each query
        k_pos = torch.arange(max_ctx).view(1, 1, -1)
        mask = k_pos <= q_pos
        if self.sliding_window is not None:
            mask &= k_pos > q_pos - self.sliding_window
        q_valid = torch.arange(max_q).view(1, -1, 1) < torch.tensor(query_lens).view(-1, 1, 1)
        mask = torch.where(q_valid, mask, k_pos == 0)  # padded query rows attend to one key: no NaN
        self.meta = TorchAttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=tables.to(device),
            q_index=q_index.to(device),
            out_index=torch.tensor(out_index, dtype=torch.long).to(device),
            mask=mask.unsqueeze(1).to(device),
            max_ctx=max_ctx,
        )

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        k_cache, v_cache = self.kv_cache.layer(layer)
        heads_kv, dim = k.shape[1], k.shape[2]
        k_cache.view(-1, heads_kv, dim).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, heads_kv, dim).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        batch = meta.block_tables.shape[0]
        keys = k_cache[meta.block_tables].view(batch, -1, heads_kv, dim)[:, : meta.max_ctx]
        values = v_cache[meta.block_tables].view(batch, -1, heads_kv, dim)[:, : meta.max_ctx]
        q_padded = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[meta.q_index]  # [B, max_q, H, D]
        out = F.scaled_dot_product_attention(
            q_padded.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=meta.mask, enable_gqa=True,
        )
        return out.transpose(1, 2).reshape(-1, q.shape[1], dim)[meta.out_index]
