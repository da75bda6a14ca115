"""Paged decode attention in Triton: one query token per sequence, keys and values read from blocks.

Grid: (sequence, KV head, split). Each program reads its KV head's blocks once and serves every
query head of that group (GQA), over its share of the context: a contiguous range of chunks, or,
where the whole grid is resident at once, chunks dealt to the splits in turn (see PREFETCH). A
second kernel merges the splits' partial softmax results; with one split (big batches) the program
writes the output itself and no merge is launched. Splitting the context keeps the GPU busy when
the batch is small and contexts are long (split-K / flash-decoding).

Fixed split size (`split_tokens`, for --enable-deterministic-inference): split s always covers
context tokens [s * split_tokens, (s + 1) * split_tokens), whatever the batch, and the merge walks
a sequence's splits one after the other in order; a row's result then depends on its own
sequence alone. With `seq_index`, rows are query tokens (several per sequence: a prompt) and row
r reads the block table of sequence seq_index[r]; `write_only` launches only the cache write of
the rows' new keys and values (rotated), so that a prompt's tokens are all in the cache before
its rows attend to them.

Row tiles (`rows_attend`, the deterministic mode's prompt tokens): up to ROW_TILE query tokens of
one prompt per program, which then reads each chunk of keys and values once for all of them, where the
decode kernel reads it once per token. Each row is computed as the decode kernel computes it: the
same chunks in the same order, the new token last in split 0, the splits merged in order (in the
program, as the merge kernel does it). In the fixed split size mode both kernels sum a row's
probabilities and score its new token through tl.dot, not tl.sum: a reduction's order follows the
register layout, which follows the tile's shape, while a dot gives a row the same bits whatever the
rows beside it (as the batch-invariant matmul relies on).

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

from ptp.kernels import pdl_for, sm_count


@triton.jit
def _attend_chunk(q, k, v, cached, m, l, acc, scale, ones, IEEE: tl.constexpr, DOT_SUMS: tl.constexpr):
    """Online softmax over one chunk of cached tokens (`cached` [1 or rows, TOKENS] masks the rest).
    DOT_SUMS (the fixed split size mode): the probabilities' row sums through a dot with `ones`
    [TOKENS, 16], so that a row's bits do not depend on how many rows share the tile."""
    # K and V go from their loads straight into the dots: anything between (a select of the new
    # token, say) stops Triton from pipelining the loads, which cost a third of the bandwidth.
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(cached, s * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a chunk of only the new token: nothing yet
    p = tl.exp(s - m_use[:, None])
    alpha = tl.exp(m - m_use)
    if DOT_SUMS:  # float32 FMAs over the chunk in order: a row's bits whatever the rows beside it
        l = l * alpha + tl.max(tl.dot(p, ones, input_precision="ieee"), 1)
    else:
        l = l * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc


@triton.jit
def _new_token_scores(q, k_rows, own, IEEE: tl.constexpr):
    """Each row's score against its own new key: q [M, D] . k_rows [R, D] through a dot, then the
    column `own` [M] of each row (a max over one value and -inf: exact)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k_rows), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k_rows))
    cols = tl.arange(0, s.shape[1])
    return tl.max(tl.where(cols[None, :] == own[:, None], s, float("-inf")), 1)


# Triton builds a kernel apart for each integer argument equal to 1, divisible by 16, or neither:
# arguments that follow the step (split count, block-table width and stride, the partial results'
# strides) would each make some step of a run pay for another build, seconds on a fresh machine.
# Used in address arithmetic of scalar loads and stores only: the hints gain nothing there.
VARYING = ["splits", "max_blocks", "s_btb", "s_mb", "s_mh"]


@triton.jit(do_not_specialize=VARYING)
def _decode_partial(
    Q, KN, VN, SLOTS, K, V, BT, LENS, O, M, L, COS_SIN, OUT, SEQ,
    scale, splits, max_blocks, split_chunks,
    s_qb, s_qh, s_nb, s_nh, s_kb, s_ks, s_kh, s_btb, s_ob, s_oh, s_os, s_mb, s_mh, s_cs, s_outb, s_outh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr, IEEE: tl.constexpr, ROPE: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
    ONE_SPLIT: tl.constexpr, FIXED_SPLIT: tl.constexpr, HAS_SEQ: tl.constexpr, WRITE_ONLY: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    t = tl.arange(0, TOKENS)
    d = tl.arange(0, D)
    # What does not come from the kernel before (the q/k/v projection) is read before the PDL wait,
    # while that kernel still runs: the lengths and block tables are step inputs that a copy wrote
    # before the step began, and the cached keys and values were written by earlier steps, never by
    # a kernel of this step (this kernel writes only the new token's slot, which no program reads).
    seq_len = tl.load(LENS + b)
    if HAS_SEQ:  # rows are query tokens: this one's sequence owns the block table
        bt_row = tl.load(SEQ + b).to(tl.int64)
    else:
        bt_row = b
    newest = seq_len - 1  # the new token's position: its k, v come from KN, VN
    chunks = tl.cdiv(seq_len, TOKENS)
    if FIXED_SPLIT:
        # The grid has a split per split_tokens of the widest block table the step allows (4,096 tokens:
        # 16), most of them past a row's context: such a program leaves before its loads (it stores
        # nothing either way, and the merge reads only a row's own splits).
        if (split > 0) & (split * split_chunks * TOKENS >= seq_len):
            return
    if PREFETCH:
        # For a grid that is resident at once (ptp's rule: batch 1, and long contexts at small
        # batches): chunks are dealt to the splits in turn (split s takes chunks s, s + splits, ...),
        # so the block table is read without waiting for the length, and the first chunk's keys and
        # values are in flight before the wait (into registers: ~80 more per thread, which would
        # halve the programs an SM holds in a bigger grid).
        first_tok = split * TOKENS + t
        first_block = tl.load(BT + bt_row * s_btb + first_tok // BLOCK_SIZE, mask=first_tok // BLOCK_SIZE < max_blocks,
                              other=0)
        first_cached = first_tok < newest  # the new token is not read from the cache: it is added from registers
        first_row = first_block.to(tl.int64) * s_kb + (first_tok % BLOCK_SIZE) * s_ks + kvh * s_kh
        k_first = tl.load(K + first_row[:, None] + d[None, :], mask=first_cached[:, None], other=0.0)
        v_first = tl.load(V + first_row[:, None] + d[None, :], mask=first_cached[:, None], other=0.0)
        start, stop, step = split + splits, chunks, splits
    elif FIXED_SPLIT:  # split s: the chunks of context tokens [s * split_tokens, (s + 1) * split_tokens)
        start = split * split_chunks
        stop = tl.minimum(start + split_chunks, chunks)
        step = 1
    else:  # a contiguous range of chunks per split (measured faster than dealing them in a big grid)
        per_split = tl.cdiv(chunks, splits)
        start = split * per_split
        stop = tl.minimum(start + per_split, chunks)
        step = 1
    if ROPE:
        half: tl.constexpr = D // 2
        partner = (d + half) % D
        sign = tl.where(d < half, -1.0, 1.0)
        cs_at = tl.maximum(newest, 0) * s_cs + d % half
        cos = tl.load(COS_SIN + cs_at)
        sin = tl.load(COS_SIN + cs_at + half) * sign
    if USE_PDL:  # q, k_new, v_new come from the kernel before (kernels/__init__.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    g = tl.arange(0, GROUP_PAD)
    heads = kvh * GROUP + g
    q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    k_new = tl.load(KN + b * s_nb + kvh * s_nh + d)
    v_new = tl.load(VN + b * s_nb + kvh * s_nh + d)
    if ROPE:  # x * cos + rotate_half(x) * sin, in float32 as the model does it
        q_p = tl.load(Q + b * s_qb + heads[:, None] * s_qh + partner[None, :], mask=(g < GROUP)[:, None], other=0.0)
        q = (q.to(tl.float32) * cos[None, :] + q_p.to(tl.float32) * sin[None, :]).to(q.dtype)
        k_p = tl.load(KN + b * s_nb + kvh * s_nh + partner)
        k_new = (k_new.to(tl.float32) * cos + k_p.to(tl.float32) * sin).to(k_new.dtype)
    if split == 0:
        slot = tl.load(SLOTS + b)
        at = (slot // BLOCK_SIZE) * s_kb + (slot % BLOCK_SIZE) * s_ks + kvh * s_kh
        tl.store(K + at + d, k_new)
        tl.store(V + at + d, v_new)
    if WRITE_ONLY:
        return
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    if PREFETCH:
        m, l, acc = _attend_chunk(q, k_first, v_first, first_cached[None, :], m, l, acc, scale, 0.0, IEEE, False)
    ones = tl.full([TOKENS, 16], 1.0, tl.float32)
    for chunk in range(start, stop, step):
        tok = chunk * TOKENS + t
        cached = tok < newest
        phys = tl.load(BT + bt_row * s_btb + tok // BLOCK_SIZE, mask=cached, other=0).to(tl.int64)
        row = phys * s_kb + (tok % BLOCK_SIZE) * s_ks + kvh * s_kh
        k = tl.load(K + row[:, None] + d[None, :], mask=cached[:, None], other=0.0)
        v = tl.load(V + row[:, None] + d[None, :], mask=cached[:, None], other=0.0)
        m, l, acc = _attend_chunk(q, k, v, cached[None, :], m, l, acc, scale, ones, IEEE, FIXED_SPLIT)
    if (split == 0) & (seq_len > 0):  # the new token, once per (sequence, KV head)
        if FIXED_SPLIT:  # through a dot, as rows_attend does it (see the module's docstring)
            c16 = tl.arange(0, 16)
            k_pad = tl.where(c16[:, None] == 0, k_new[None, :], tl.zeros([16, D], k_new.dtype)).to(q.dtype)
            s_new = _new_token_scores(q, k_pad, tl.zeros([GROUP_PAD], tl.int32), IEEE) * scale
        else:
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * scale
        m_new = tl.maximum(m, s_new)
        alpha = tl.exp(m - m_new)
        p_new = tl.exp(s_new - m_new)
        l = l * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        m = m_new
    keep = g < GROUP
    if FIXED_SPLIT:  # a split past this sequence's context: the merge does not read it
        keep = keep & ((split == 0) | (split * split_chunks * TOKENS < seq_len))
    if ONE_SPLIT:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(OUT + b * s_outb + heads[:, None] * s_outh + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=keep[:, None])
    else:
        tl.store(O + b * s_ob + heads[:, None] * s_oh + split * s_os + d[None, :], acc, mask=keep[:, None])
        tl.store(M + b * s_mb + heads * s_mh + split, m, mask=keep)
        tl.store(L + b * s_mb + heads * s_mh + split, l, mask=keep)


@triton.jit(do_not_specialize=["splits", "s_mb", "s_mh"])
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


@triton.jit(do_not_specialize=["s_mb", "s_mh"])
def _decode_merge_in_order(O, M, L, OUT, LENS, s_ob, s_oh, s_os, s_mb, s_mh, s_outb, s_outh, split_tokens,
                           D: tl.constexpr, USE_PDL: tl.constexpr):
    """The merge of the fixed split size mode: a sequence's non-empty splits, one after the other."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    used = tl.maximum(tl.cdiv(tl.load(LENS + b), split_tokens), 1)
    m = tl.load(M + b * s_mb + h * s_mh)
    l = tl.load(L + b * s_mb + h * s_mh)
    acc = tl.load(O + b * s_ob + h * s_oh + d)
    for s in range(1, used):
        m_s = tl.load(M + b * s_mb + h * s_mh + s)
        l_s = tl.load(L + b * s_mb + h * s_mh + s)
        o_s = tl.load(O + b * s_ob + h * s_oh + s * s_os + d)
        m_new = tl.maximum(m, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp(m - m_use)
        c = tl.exp(m_s - m_use)
        l = l * a + l_s * c
        acc = acc * a + o_s * c
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)
    tl.store(OUT + b * s_outb + h * s_outh + d, out.to(OUT.dtype.element_ty))


FIXED_TOKENS = 64  # the chunk of the fixed split size mode: rows_attend must walk the same chunks


def _kernel_inputs(q, k_new, v_new, cache_dtype):
    """q with unit stride in its last dimension; k_new, v_new in the cache's dtype with equal strides
    (views are fine: the kernels take strides)."""
    k_new, v_new = k_new.to(cache_dtype), v_new.to(cache_dtype)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1 or k_new.stride() != v_new.stride():
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    return q, k_new, v_new


def paged_decode(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, slots: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float, splits: int, tokens_per_step: int | None = None, cos_sin: torch.Tensor | None = None,
                 prefetch: bool | None = None, split_tokens: int | None = None,
                 seq_index: torch.Tensor | None = None, write_only: bool = False,
                 num_warps: int = 4, num_stages: int | None = None) -> torch.Tensor:
    """q [B, H, D]; the new k_new, v_new [B, KV, D] go to cache slot `slots` [B] (and are attended to);
    caches [blocks, block_size, KV, D]; block_tables [B, max_blocks]; seq_lens [B], new token included.
    cos_sin [positions, D] float32 (cos | sin halves): q and k_new are rotated first (RoPE).
    prefetch: deal chunks to the splits in turn and read each split's first chunk before the PDL
    wait (None: where that pays, see below). tokens_per_step: the chunk (None: 32 or 64, see below).
    split_tokens: the fixed split size mode (a multiple of the chunk; `splits` then only sizes the
    grid: at least the longest context's split count). seq_index [B]: row -> block-table row.
    num_warps, num_stages: the partial kernel's launch (bench/attention.py --tiles times others; None:
    2 stages from 512 rows, where they measured 1-5% faster at 256-512 tokens of context, else 3, and 3
    with split_tokens).

    Returns [B, H, D]. A sequence of length 0 (a padded row) gives zeros.
    """
    q, k_new, v_new = _kernel_inputs(q, k_new, v_new, k_cache.dtype)
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = heads // kv_heads
    fixed = split_tokens is not None
    if fixed:
        tokens_per_step, prefetch = FIXED_TOKENS, False
        if split_tokens % tokens_per_step:
            raise ValueError(f"split_tokens={split_tokens} must be a multiple of {tokens_per_step}")
        splits = max(1, -(-block_tables.shape[1] * block_size // split_tokens))
    if num_stages is None:  # (the deterministic mode keeps one launch at every batch size)
        num_stages = 2 if batch >= 512 and not fixed else 3
    out = torch.empty(batch, heads, dim, dtype=q.dtype, device=q.device)
    if splits > 1:
        part = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
        m = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
    else:  # unused: the one split writes `out`
        part = m = l = out
    rope = cos_sin is not None
    use_pdl = pdl_for(q)
    if prefetch is None:
        # The prefetched chunk costs registers, which halves the programs an SM holds: worth it only
        # where the whole grid is resident at once anyway (batch 1 and long contexts; measured).
        prefetch = use_pdl and batch * kv_heads * splits <= 2 * sm_count(q.device.index or 0)
    if tokens_per_step is None:
        # 32-token chunks spread a short context over more of the splits (batch 1, 384 of at most 4096
        # tokens in 16 splits: about a quarter faster), but walk a long one slower (32k tokens in
        # 33 splits: about a quarter slower; 4k in 16: a tenth slower): only where there are many splits
        # and a split's share of the longest context the block tables allow is at most 256 tokens.
        max_tokens = block_tables.shape[1] * block_size
        tokens_per_step = 32 if prefetch and splits >= 8 and max_tokens <= 256 * splits else 64
    _decode_partial[(batch, kv_heads, 1 if write_only else splits)](
        q, k_new, v_new, slots, k_cache, v_cache, block_tables, seq_lens, part, m, l, cos_sin if rope else q, out,
        seq_index if seq_index is not None else seq_lens,
        scale, splits, block_tables.shape[1], (split_tokens or tokens_per_step) // tokens_per_step,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), part.stride(0), part.stride(1), part.stride(-2), m.stride(0), m.stride(1),
        cos_sin.stride(0) if rope else 0, out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=dim, BLOCK_SIZE=block_size,
        TOKENS=tokens_per_step, IEEE=q.dtype == torch.float32, ROPE=rope, USE_PDL=use_pdl, PREFETCH=prefetch,
        ONE_SPLIT=splits == 1, FIXED_SPLIT=fixed, HAS_SEQ=seq_index is not None, WRITE_ONLY=write_only,
        launch_pdl=use_pdl, num_warps=num_warps, num_stages=num_stages,
    )
    if write_only:
        return out
    if splits > 1 and fixed:
        _decode_merge_in_order[(batch, heads)](
            part, m, l, out, seq_lens, part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1),
            out.stride(0), out.stride(1), split_tokens, D=dim, USE_PDL=use_pdl, launch_pdl=use_pdl,
        )
    elif splits > 1:
        _decode_merge[(batch, heads)](
            part, m, l, out, splits, part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1),
            out.stride(0), out.stride(1), SPLITS_PAD=triton.next_power_of_2(splits), D=dim,
            USE_PDL=use_pdl, launch_pdl=use_pdl,
        )
    return out


ROW_TILE = 16  # query tokens of one prompt per program of rows_attend


@triton.jit(do_not_specialize=["n_tiles", "s_btb"])  # one build whatever the step (see VARYING)
def _rows_attend(
    Q, KN, VN, K, V, BT, LENS, TILES, COS_SIN, OUT,
    scale, n_tiles, split_chunks, split_tokens,
    s_qb, s_qh, s_nb, s_nh, s_kb, s_ks, s_kh, s_btb, s_cs, s_outb, s_outh,
    GROUP: tl.constexpr, GP: tl.constexpr, R: tl.constexpr, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr, IEEE: tl.constexpr, ROPE: tl.constexpr,
):
    """One program: a tile of up to R consecutive query tokens of one prompt (rows first, first +
    1, ...; their keys and values already in the cache) and one KV head; every split of the context
    in turn, merged as _decode_merge_in_order merges them. Row i of the [R * GP, D] block is query
    head i % GP of token i // GP."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    first = tl.load(TILES + tile)
    count = tl.load(TILES + n_tiles + tile)
    seq = tl.load(TILES + 2 * n_tiles + tile).to(tl.int64)
    M: tl.constexpr = R * GP
    i = tl.arange(0, M)
    r = i // GP
    g = i % GP
    d = tl.arange(0, D)
    t = tl.arange(0, TOKENS)
    rr = tl.arange(0, R)
    token = (first + r).to(tl.int64)
    token_ok = r < count
    live = token_ok & (g < GROUP)
    heads = kvh * GROUP + g
    lens = tl.load(LENS + token, mask=token_ok, other=0)
    newest = lens - 1
    q_at = token[:, None] * s_qb + heads[:, None] * s_qh
    q = tl.load(Q + q_at + d[None, :], mask=live[:, None], other=0.0)
    own = (first + rr).to(tl.int64)
    k_own = tl.load(KN + own[:, None] * s_nb + kvh * s_nh + d[None, :], mask=(rr < count)[:, None], other=0.0)
    v_new = tl.load(VN + token[:, None] * s_nb + kvh * s_nh + d[None, :], mask=token_ok[:, None], other=0.0)
    if ROPE:  # each token at its own position, as the decode kernel rotates its one token
        half: tl.constexpr = D // 2
        partner = (d + half) % D
        sign = tl.where(d < half, -1.0, 1.0)
        cs_at = tl.maximum(newest, 0)[:, None] * s_cs + (d % half)[None, :]
        cos = tl.load(COS_SIN + cs_at)
        sin = tl.load(COS_SIN + cs_at + half) * sign[None, :]
        q_p = tl.load(Q + q_at + partner[None, :], mask=live[:, None], other=0.0)
        q = (q.to(tl.float32) * cos + q_p.to(tl.float32) * sin).to(q.dtype)
        own_lens = tl.load(LENS + own, mask=rr < count, other=1)
        cs_own = tl.maximum(own_lens - 1, 0)[:, None] * s_cs + (d % half)[None, :]
        cos_own = tl.load(COS_SIN + cs_own)
        sin_own = tl.load(COS_SIN + cs_own + half) * sign[None, :]
        k_p = tl.load(KN + own[:, None] * s_nb + kvh * s_nh + partner[None, :], mask=(rr < count)[:, None], other=0.0)
        k_own = (k_own.to(tl.float32) * cos_own + k_p.to(tl.float32) * sin_own).to(k_own.dtype)
    longest = tl.max(lens, 0)
    chunks = tl.cdiv(longest, TOKENS)
    splits = tl.maximum(tl.cdiv(longest, split_tokens), 1)
    ones = tl.full([TOKENS, 16], 1.0, tl.float32)
    m = tl.full([M], float("-inf"), tl.float32)
    l = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for split in range(0, splits):
        m_s = tl.full([M], float("-inf"), tl.float32)
        l_s = tl.zeros([M], tl.float32)
        acc_s = tl.zeros([M, D], tl.float32)
        start = split * split_chunks
        stop = tl.minimum(start + split_chunks, chunks)
        for chunk in range(start, stop):
            tok = chunk * TOKENS + t
            read = tok < (longest - 1)  # keys some row of the tile attends to from the cache
            phys = tl.load(BT + seq * s_btb + tok // BLOCK_SIZE, mask=read, other=0).to(tl.int64)
            at = phys * s_kb + (tok % BLOCK_SIZE) * s_ks + kvh * s_kh
            k = tl.load(K + at[:, None] + d[None, :], mask=read[:, None], other=0.0)
            v = tl.load(V + at[:, None] + d[None, :], mask=read[:, None], other=0.0)
            cached = tok[None, :] < newest[:, None]
            m_s, l_s, acc_s = _attend_chunk(q, k, v, cached, m_s, l_s, acc_s, scale, ones, IEEE, True)
        if split == 0:  # each token's own key and value last, as the decode kernel's split 0 adds them
            s_new = _new_token_scores(q, k_own, r, IEEE) * scale
            has = lens > 0
            m_new = tl.maximum(m_s, s_new)
            alpha = tl.exp(m_s - m_new)
            p_new = tl.exp(s_new - m_new)
            l_s = tl.where(has, l_s * alpha + p_new, l_s)
            acc_s = tl.where(has[:, None], acc_s * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32), acc_s)
            m_s = tl.where(has, m_new, m_s)
            m, l, acc = m_s, l_s, acc_s
        else:  # the merge of _decode_merge_in_order, for the rows whose context reaches this split
            use = split * split_tokens < lens
            m_new = tl.maximum(m, m_s)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            a = tl.exp(m - m_use)
            c = tl.exp(m_s - m_use)
            l = tl.where(use, l * a + l_s * c, l)
            acc = tl.where(use[:, None], acc * a[:, None] + acc_s * c[:, None], acc)
            m = tl.where(use, m_new, m)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(OUT + token[:, None] * s_outb + heads[:, None] * s_outh + d[None, :], out.to(OUT.dtype.element_ty),
             mask=live[:, None])


def row_tiles(query_lens: list[int], tile: int = ROW_TILE):
    """int32 [3, tiles] for rows_attend: first row, rows, sequence of each tile of at most `tile`
    consecutive query tokens of one sequence (the rows of a step are its sequences' tokens in order)."""
    import numpy as np

    firsts, counts, seqs = [], [], []
    row = 0
    for b, n in enumerate(query_lens):
        for j in range(0, n, tile):
            firsts.append(row + j)
            counts.append(min(tile, n - j))
            seqs.append(b)
        row += n
    return np.asarray([firsts, counts, seqs], dtype=np.int32).reshape(3, -1)


def rows_attend(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, tiles: torch.Tensor,
                scale: float, split_tokens: int, cos_sin: torch.Tensor | None = None) -> torch.Tensor:
    """The fixed split size mode's attention for rows that are query tokens of prompts, a tile of
    them per program (`row_tiles`): each row's bits equal those paged_decode(..., split_tokens=,
    seq_index=) gives it. q [rows, H, D]; k_new, v_new [rows, KV, D], already written to the cache
    (paged_decode's write_only launch); block_tables [sequences, max_blocks]; seq_lens [rows] (a
    row's position + 1); tiles int32 [3, tiles]. Returns [rows, H, D]."""
    q, k_new, v_new = _kernel_inputs(q, k_new, v_new, k_cache.dtype)
    rows, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    tokens = FIXED_TOKENS
    if split_tokens % tokens:
        raise ValueError(f"split_tokens={split_tokens} must be a multiple of {tokens}")
    out = torch.empty(rows, heads, dim, dtype=q.dtype, device=q.device)
    n_tiles = tiles.shape[1]
    if n_tiles == 0:
        return out
    rope = cos_sin is not None
    group = heads // kv_heads
    gp = triton.next_power_of_2(group)
    _rows_attend[(n_tiles, kv_heads)](
        q, k_new, v_new, k_cache, v_cache, block_tables, seq_lens, tiles.contiguous(),
        cos_sin if rope else q, out,
        scale, n_tiles, split_tokens // tokens, split_tokens,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), cos_sin.stride(0) if rope else 0, out.stride(0), out.stride(1),
        GROUP=group, GP=gp, R=ROW_TILE, D=dim, BLOCK_SIZE=block_size, TOKENS=tokens,
        IEEE=q.dtype == torch.float32, ROPE=rope, num_warps=4 if ROW_TILE * gp <= 64 else 8,
    )
    return out
