"""Paged decode attention in Triton: one query token per sequence, keys and values read from blocks.

Grid: (sequence, KV head, split). Each program reads its KV head's blocks once and serves every
query head of that group (GQA), over one slice ("split") of the context; a second kernel merges
the splits' partial softmax results. Splitting the context keeps the GPU busy when the batch is
small and contexts are long (split-K / flash-decoding).

The step's new key and value (one token per sequence) come in as tensors: the kernel attends to
them from registers and the first split of each (sequence, KV head) writes them into their cache
slot, so the cache write costs no launch of its own. No program reads that slot in this launch.
Given the rotary table, the kernel also rotates q and the new k (rotate-half layout, position =
length - 1), so the model's RoPE costs no launch either.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptp.kernels import pdl_for


@triton.jit
def _decode_partial(
    Q, KN, VN, SLOTS, K, V, BT, LENS, O, M, L, COS_SIN,
    scale, splits,
    s_qb, s_qh, s_nb, s_nh, s_kb, s_ks, s_kh, s_btb, s_ob, s_oh, s_os, s_mb, s_mh, s_cs,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr, IEEE: tl.constexpr, ROPE: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:  # everything read here may come from the kernel before (kernels/__init__.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(LENS + b)
    chunks = tl.cdiv(seq_len, TOKENS)
    per_split = tl.cdiv(chunks, splits)
    first = split * per_split
    last = tl.minimum(first + per_split, chunks)

    g = tl.arange(0, GROUP_PAD)
    heads = kvh * GROUP + g
    d = tl.arange(0, D)
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    newest = seq_len - 1  # the new token's position: its k, v come from KN, VN
    k_new = tl.load(KN + b * s_nb + kvh * s_nh + d)
    v_new = tl.load(VN + b * s_nb + kvh * s_nh + d)
    if ROPE:  # x * cos + rotate_half(x) * sin, in float32 as the model does it
        half: tl.constexpr = D // 2
        partner = (d + half) % D
        sign = tl.where(d < half, -1.0, 1.0)
        cs_at = tl.maximum(newest, 0) * s_cs + d % half
        cos = tl.load(COS_SIN + cs_at)
        sin = tl.load(COS_SIN + cs_at + half) * sign
        q_p = tl.load(Q + b * s_qb + heads[:, None] * s_qh + partner[None, :], mask=(g < GROUP)[:, None], other=0.0)
        q = (q.to(tl.float32) * cos[None, :] + q_p.to(tl.float32) * sin[None, :]).to(q.dtype)
        k_p = tl.load(KN + b * s_nb + kvh * s_nh + partner)
        k_new = (k_new.to(tl.float32) * cos + k_p.to(tl.float32) * sin).to(k_new.dtype)
    if split == 0:
        slot = tl.load(SLOTS + b)
        at = (slot // BLOCK_SIZE) * s_kb + (slot % BLOCK_SIZE) * s_ks + kvh * s_kh
        tl.store(K + at + d, k_new)
        tl.store(V + at + d, v_new)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    t = tl.arange(0, TOKENS)
    for chunk in range(first, last):
        tok = chunk * TOKENS + t
        cached = tok < newest  # the new token is not read from the cache: it is added below, from registers
        phys = tl.load(BT + b * s_btb + tok // BLOCK_SIZE, mask=cached, other=0).to(tl.int64)
        row = phys * s_kb + (tok % BLOCK_SIZE) * s_ks + kvh * s_kh
        # K and V go from their loads straight into the dots: anything between (a select of the new
        # token, say) stops Triton from pipelining the loads, which cost a third of the bandwidth.
        k = tl.load(K + row[:, None] + d[None, :], mask=cached[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(cached[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a chunk of only the new token: nothing yet
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m - m_use)
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(V + row[:, None] + d[None, :], mask=cached[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    if (split == 0) & (seq_len > 0):  # the new token, once per (sequence, KV head)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
        m_new = tl.maximum(m, s_new)
        alpha = tl.exp(m - m_new)
        p_new = tl.exp(s_new - m_new)
        l = l * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        m = m_new
    keep = g < GROUP
    tl.store(O + b * s_ob + heads[:, None] * s_oh + split * s_os + d[None, :], acc, mask=keep[:, None])
    tl.store(M + b * s_mb + heads * s_mh + split, m, mask=keep)
    tl.store(L + b * s_mb + heads * s_mh + split, l, mask=keep)


@triton.jit
def _decode_merge(O, M, L, OUT, splits, s_ob, s_oh, s_os, s_mb, s_mh, s_outb, s_outh,
                  SPLITS_PAD: tl.constexpr, D: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D)
    ok = s < splits
    m = tl.load(M + b * s_mb + h * s_mh + s, mask=ok, other=float("-inf"))
    l = tl.load(L + b * s_mb + h * s_mh + s, mask=ok, other=0.0)
    top = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
    total = tl.sum(l * w, 0)
    o = tl.load(O + b * s_ob + h * s_oh + s[:, None] * s_os + d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(OUT + b * s_outb + h * s_outh + d, out.to(OUT.dtype.element_ty))


def paged_decode(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, slots: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, splits: int, tokens_per_step: int = 64, cos_sin: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D]; the new k_new, v_new [B, KV, D] go to cache slot `slots` [B] (and are attended to);
    caches [blocks, block_size, KV, D]; block_tables [B, max_blocks]; seq_lens [B], new token included.
    cos_sin [positions, D] float32 (cos | sin halves): q and k_new are rotated first (RoPE).

    Returns [B, H, D]. A sequence of length 0 (a padded row) gives zeros.
    """
    k_new, v_new = k_new.to(k_cache.dtype), v_new.to(v_cache.dtype)  # views are fine: strides are passed
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1 or k_new.stride() != v_new.stride():
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    part = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    m = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    out = torch.empty(batch, heads, dim, dtype=q.dtype, device=q.device)
    rope = cos_sin is not None
    use_pdl = pdl_for(q)
    _decode_partial[(batch, kv_heads, splits)](
        q, k_new, v_new, slots, k_cache, v_cache, block_tables, seq_lens, part, m, l, cos_sin if rope else q,
        scale, splits,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1),
        cos_sin.stride(0) if rope else 0,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=dim, BLOCK_SIZE=block_size,
        TOKENS=tokens_per_step, IEEE=q.dtype == torch.float32, ROPE=rope, USE_PDL=use_pdl, launch_pdl=use_pdl,
    )
    _decode_merge[(batch, heads)](
        part, m, l, out, splits, part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1),
        out.stride(0), out.stride(1), SPLITS_PAD=triton.next_power_of_2(splits), D=dim,
        USE_PDL=use_pdl, launch_pdl=use_pdl,
    )
    return out
