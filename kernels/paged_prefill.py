"""Paged prefill attention in Triton: prompt chunks that attend to keys already in the paged cache.

For a step that is not one whole prompt from position 0: several prompts at once, a chunk after an
earlier chunk, a prompt whose prefix came from the prefix cache. Row b of the step brings
q_lens[b] query tokens (q[q_offsets[b] + i], at position starts[b] + i); its keys and values,
the step's own included (written before this kernel runs), are read from the cache through the
row's block table. Nothing is gathered into a padded copy and no mask tensor is read: causality
(a query at position p sees keys at positions <= p) and the sliding window (keys > p - window)
are computed from positions.

Grid: (block of BLOCK_Q query tokens of a row, row, KV head). A program serves every query head
of its KV head's group (GQA): its BLOCK_Q tokens x GROUP_PAD heads are the rows of one tile,
so each key tile is read once for the group. Flash-attention forward: online softmax over key
tiles of BLOCK_N tokens, accumulated in float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _prefill_fwd(
    Q, K, V, O, BT, Q_OFF, Q_LEN, START,
    scale, window,
    s_qt, s_qh, s_kb, s_ks, s_kh, s_btb, s_ot, s_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, IEEE: tl.constexpr,
):
    q_block = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_len = tl.load(Q_LEN + b)
    first_q = q_block * BLOCK_Q
    if first_q >= q_len:  # the grid covers the longest row: shorter rows end early
        return
    q_off = tl.load(Q_OFF + b).to(tl.int64)
    start = tl.load(START + b)

    ROWS: tl.constexpr = BLOCK_Q * GROUP_PAD
    r = tl.arange(0, ROWS)
    i = first_q + r // GROUP_PAD       # the row's query token within this sequence's chunk
    g = r % GROUP_PAD                  # its query head within the KV head's group
    row_ok = (i < q_len) & (g < GROUP)
    head = kvh * GROUP + g
    pos = start + i                    # absolute position of the query token
    d = tl.arange(0, D)
    q_at = (q_off + i).to(tl.int64) * s_qt + head * s_qh
    q = tl.load(Q + q_at[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)

    m = tl.full([ROWS], float("-inf"), tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    last_pos = start + tl.minimum(first_q + BLOCK_Q, q_len) - 1  # the last key any row here sees
    lo = 0
    if WINDOW:  # keys before the first query's window are seen by none of them
        lo = tl.maximum(start + first_q - window + 1, 0) // BLOCK_N * BLOCK_N
    n = tl.arange(0, BLOCK_N)
    for key0 in range(lo, last_pos + 1, BLOCK_N):
        tok = key0 + n
        ok = tok <= last_pos
        phys = tl.load(BT + b * s_btb + tok // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        at = phys * s_kb + (tok % BLOCK_SIZE) * s_ks + kvh * s_kh
        k = tl.load(K + at[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + at[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        seen = tok[None, :] <= pos[:, None]
        if WINDOW:
            seen = seen & (tok[None, :] > pos[:, None] - window)
        s = tl.where(seen, s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m - m_use)
        l = l * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    o_at = (q_off + i).to(tl.int64) * s_ot + head * s_oh
    tl.store(O + o_at[:, None] + d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  q_offsets: torch.Tensor, q_lens: torch.Tensor, starts: torch.Tensor, max_q: int, scale: float,
                  sliding_window: int | None = None, block_q: int | None = None, block_n: int = 64) -> torch.Tensor:
    """q [T, H, D]: the step's query tokens, row after row; caches [blocks, block_size, KV, D] holding
    every key and value the rows attend to (the step's own written already); block_tables [B, max_blocks]
    int32; per row b (int32 [B]): q_offsets[b] (its first token in q), q_lens[b], starts[b] (position of
    that token). max_q: at least the longest q_lens (a host-side number: it sizes the grid).

    Returns [T, H, D]: token j of row b attends to the row's keys at positions
    <= starts[b] + j (and > starts[b] + j - sliding_window, given one)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    tokens, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if heads % kv_heads or k_cache.shape[-1] != dim or v_cache.stride() != k_cache.stride():
        raise ValueError(f"paged_prefill: q [T, {heads}, {dim}] does not fit caches {tuple(k_cache.shape)} "
                         f"(query heads must be a multiple of KV heads, same head size, K and V laid out alike)")
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    if block_q is None:  # tiles of 64 query rows (heads x tokens) at least, as tl.dot wants 16+
        block_q = max(16, 64 // group_pad)
    out = torch.empty_like(q)
    batch = block_tables.shape[0]
    if tokens == 0 or batch == 0:
        return out
    grid = (triton.cdiv(max_q, block_q), batch, kv_heads)
    _prefill_fwd[grid](
        q, k_cache, v_cache, out, block_tables, q_offsets, q_lens, starts,
        scale, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, D=dim, BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_N=block_n,
        WINDOW=sliding_window is not None, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2,
    )
    return out
