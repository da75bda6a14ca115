"""Paged attention with torch's scaled_dot_product_attention.

Each sequence's blocks are gathered into a padded [batch, max_blocks * block_size] view of keys
and values; a boolean mask carries causality, sequence length and the sliding window. Exact and
simple — the reference for the faster backends — but it reads whole blocks up to the longest
sequence, so it is not meant for long contexts on the GPU. Prompts from position 0 (the common
prefill step) skip all that: causal attention over their own k and v, packed as they come through
flash attention's varlen form on the GPU (torch.nn.attention.varlen), padded to the longest for SDPA
elsewhere. On the GPU the other prefill steps (later chunks of a prompt, cached prefixes) take that
varlen form too, over each row's keys read from the cache by slot (PrefillMeta.k_slots): no padded
copy, no mask, and no kernel library that plans for every new shape.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ptp.attention.meta import DecodeMeta, register


try:  # flash attention over packed sequences (CUDA, half precision)
    from torch.nn.attention.varlen import varlen_attn
    _VARLEN_GQA = "enable_gqa" in inspect.signature(varlen_attn).parameters  # a flag from torch 2.12; 2.11 takes
except ImportError:                                                          # fewer k, v heads as they are
    varlen_attn = None


def varlen_fits(q: torch.Tensor) -> bool:
    return varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def varlen_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, longest_q: int,
                  cu_k: torch.Tensor | None = None, longest_k: int | None = None) -> torch.Tensor:
    """Causal attention of packed sequences: queries [T, H, D], sequence b's are rows cu_q[b]:cu_q[b+1];
    keys and values [T_k, H_kv, D] likewise by cu_k (default: the queries' own); longest_*: at least the
    longest of them. Where a sequence has more keys than queries, its queries are its last positions."""
    extra = {"enable_gqa": True} if _VARLEN_GQA and k.shape[1] != q.shape[1] else {}
    if cu_k is None:
        cu_k, longest_k = cu_q, longest_q
    return varlen_attn(q, k, v, cu_q, cu_k, longest_q, longest_k, window_size=(-1, 0), **extra)


class TorchAttention:
    name = "torch"
    # Deterministic mode (--enable-deterministic-inference): every step's metadata is rows of query
    # tokens (meta.rows_meta) and each row attends over its context in splits of `split_tokens`
    # tokens, merged in order: see `rows_attention`. Set by the runner.
    split_tokens: int | None = None

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
        if self.split_tokens is not None:
            tables = meta.block_tables if meta.seq_index is None else meta.block_tables[meta.seq_index]
            return rows_attention(q, k_cache, v_cache, tables.long(), meta.seq_lens, q.shape[-1] ** -0.5,
                                  self.split_tokens)
        causal = getattr(meta, "causal", False)  # rows from position 0: their own k, v are all they attend to
        if causal and meta.q_index.shape[0] == 1:  # one prompt: its tokens as they come
            out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                                 v.transpose(0, 1).unsqueeze(0), is_causal=True, enable_gqa=True)
            return out[0].transpose(0, 1).contiguous()  # [T, H, D] in the layout the op promises
        if (causal or getattr(meta, "k_slots", None) is not None) and meta.q_rows is not None and varlen_fits(q):
            return self._packed(meta, q, k, v, k_cache, v_cache, causal)
        if causal:
            # several: each padded at its end to the longest (a padded query attends to zero keys, and no
            # real one reaches past its own row's length under the causal rule)
            padded = [torch.cat([t, t.new_zeros(1, *t.shape[1:])])[meta.q_index].transpose(1, 2) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*padded, is_causal=True, enable_gqa=True)
            return out.transpose(1, 2).reshape(-1, q.shape[1], q.shape[2])[meta.out_index]
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

    def _packed(self, meta, q, k, v, k_cache, v_cache, causal: bool) -> torch.Tensor:
        """Flash attention's varlen form over the rows packed as they come: prompts from position 0
        over their own k, v; otherwise each row over its keys read from the cache by slot, row after
        row (flash attention aligns a row's causal rule to the end of its keys: query i of a chunk from
        position s sees keys 0 .. s + i). No padding, no mask."""
        rows = meta.q_rows
        cu_q = F.pad(rows[0], (0, 1), value=q.shape[0])  # [B + 1] each row's first token, then T
        if causal:
            return varlen_causal(q, k, v, cu_q, meta.q_index.shape[1])
        heads_kv, dim = k.shape[1], k.shape[2]
        keys, values = (c.view(-1, heads_kv, dim)[meta.k_slots] for c in (k_cache, v_cache))
        cu_k = F.pad(torch.cumsum(rows[1] + rows[2], 0, dtype=torch.int32), (1, 0))
        return varlen_causal(q, keys, values, cu_q, meta.q_index.shape[1], cu_k, meta.mask.shape[-1])

    def _decode_mask(self, meta: DecodeMeta, num_keys: int) -> torch.Tensor:
        k_pos = torch.arange(num_keys, device=meta.seq_lens.device).unsqueeze(0)
        lens = meta.seq_lens.long().unsqueeze(1)
        mask = k_pos < lens
        if self.sliding_window is not None:
            mask &= k_pos >= lens - self.sliding_window
        mask |= (lens == 0) & (k_pos == 0)  # padded rows attend to one key: no NaN
        return mask[:, None, None, :]


def rows_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                   lens: torch.Tensor, scale: float, split_tokens: int) -> torch.Tensor:
    """Each row of q [R, H, D] attends to its cache (block table row, keys [0, len)) in splits of
    split_tokens tokens, online softmax merged split after split. Every sum runs over the innermost
    dimension of a tensor whose shape per row is the same for every row and every batch (a split
    past a row's length adds exact zeros), so a row's bits do not depend on the other rows: the
    batch-invariant attention of the deterministic mode on CPU."""
    rows, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    per_split = split_tokens // block_size
    width = -(-tables.shape[1] // per_split) * per_split  # whole splits: every sum is split_tokens long
    tables = F.pad(tables, (0, width - tables.shape[1]))
    qf = q.float().view(rows, kv_heads, group, 1, dim)
    m = torch.full((rows, kv_heads, group), float("-inf"), device=q.device)
    l = torch.zeros(rows, kv_heads, group, device=q.device)
    acc = torch.zeros(rows, kv_heads, group, dim, device=q.device)
    lens = lens.long().view(rows, 1, 1, 1)
    for first in range(0, width, per_split):
        blocks = tables[:, first: first + per_split]
        keys = k_cache[blocks].view(rows, split_tokens, kv_heads, dim).float().permute(0, 2, 1, 3).contiguous()  # [R, KV, S, D]
        values = v_cache[blocks].view(rows, split_tokens, kv_heads, dim).float().permute(0, 2, 3, 1).contiguous()  # [R, KV, D, S]
        scores = (qf * keys.unsqueeze(2)).sum(-1) * scale  # [R, KV, G, S]
        pos = first * block_size + torch.arange(split_tokens, device=q.device)
        scores = scores.masked_fill(pos >= lens, float("-inf"))
        m_new = torch.maximum(m, scores.amax(-1))
        m_use = torch.where(m_new == float("-inf"), 0.0, m_new)
        alpha = torch.exp(m - m_use)
        p = torch.exp(scores - m_use.unsqueeze(-1))
        l = l * alpha + p.sum(-1)
        acc = acc * alpha.unsqueeze(-1) + (p.unsqueeze(3) * values.unsqueeze(2)).sum(-1)
        m = m_new
    out = acc / torch.where(l > 0, l, 1.0).unsqueeze(-1)
    return out.view(rows, heads, dim).to(q.dtype)
