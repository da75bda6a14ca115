"""The experts of a mixture-of-experts layer in Triton kernels, and the same in torch.

Each token goes to top_k experts; a (token, k) pair is a "slot" (slot = token * top_k + k). Two
ways to run them, chosen per shape by the tile's BLOCK_M (`choose_config` in models/moe.py times
both on the GPU and caches the fastest, like the skinny GEMM):

BLOCK_M > 1, the grouped GEMM (tensor cores; many tokens). The kernels read each expert's weights
once per block of its slots:
1. `moe_align` sorts the slots by expert and pads every expert's run to a multiple of BLOCK_M, into
   a buffer sized by an upper bound (every expert that could get a slot padded by BLOCK_M - 1): no
   shape depends on the routing, so the step runs inside torch.compile and CUDA graphs. Blocks past
   the last used one are marked with expert -1 and return at once. (kernels/moe_router.py can do
   this in the router's own launch.)
2. gate_up: for each block, the grouped GEMM x[tokens] @ w13[e].T, SiLU(gate) * up, stored per slot.
3. down: act[slots] @ w2[e].T, scaled by the slot's router weight, stored per slot in float32.
4. `_sum_slots`: each token's top_k rows summed in order, in x's dtype (one launch: no buffer to
   zero first, no separate cast).

BLOCK_M == 1, one slot per program (matrix-vector products; a few tokens, as in a batch-1 decode
step, where the grouped GEMM pads each expert's one slot to a whole tensor-core tile and leaves
most of the GPU idle): no sorting at all.
1. gate_up: a program per (slot, BLOCK_N rows of w13[e]) streams those rows of its expert.
2. down: a program per (token, BLOCK_N rows of w2) walks the token's top_k experts and sums their
   weighted outputs in float32, so the layer's output is written once, in x's dtype: no float32
   buffer to zero, no reduction and no cast after it.
At one token the 8 x 9.4 MB of a Qwen3-30B-A3B layer's experts are read by hundreds of programs
instead of the few dozen tiles of the grouped GEMM.

Slots routed to experts another rank holds (expert id == the number of local experts) take no
part: no kernel computes them, the sums skip them, and that rank's output carries them into the
all-reduce.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ptp.kernels import pdl_for

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the tiles timed for each shape (both kernels use one).
# BLOCK_M == 1: the one-slot-per-program kernels, whose float32 partial sums are BLOCK_N x BLOCK_K
# (two of them in gate_up) spread over the warps' threads.
GEMV_CONFIGS = [(1, 4, 512, 4, 1), (1, 8, 256, 4, 1), (1, 8, 512, 8, 1), (1, 16, 128, 4, 1),
                (1, 16, 256, 8, 1), (1, 4, 256, 4, 2), (1, 8, 256, 4, 2), (1, 16, 128, 4, 2)]
GEMV_MAX_SLOTS = 64  # beyond (8 tokens at top-8), each slot re-reading its expert costs more than a tile
CONFIGS = [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 64, 4, 4), (16, 128, 64, 4, 3),
           (16, 32, 256, 4, 3), (32, 64, 64, 4, 4), (32, 128, 64, 4, 3), (64, 64, 64, 4, 3),
           (64, 128, 64, 4, 4), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3)]
INTERPRET_CONFIG = (16, 16, 32, 4, 1)  # under TRITON_INTERPRET: small tiles, so that masks are exercised


def configs_for(slots: int) -> list[tuple[int, int, int, int, int]]:
    """Tiles worth timing for `slots` (tokens x top_k) slots: blocks no taller than the slots, and
    the one-slot kernels for a few slots."""
    grouped = [c for c in CONFIGS if c[0] <= max(16, triton.next_power_of_2(slots))]
    return (GEMV_CONFIGS if slots <= GEMV_MAX_SLOTS else []) + grouped


def default_config(slots: int) -> tuple[int, int, int, int, int]:
    if slots <= 16:
        return (1, 8, 256, 4, 1)
    if slots <= 64:
        return (16, 64, 128, 4, 4)
    return (64, 128, 64, 4, 4) if slots >= 2048 else (32, 64, 64, 4, 4)


def align_capacity(slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the padded slot count: every slot, plus BLOCK_M - 1 for each expert that can
    get one (at most min(experts, slots)), rounded up to whole blocks."""
    bound = slots + min(num_experts, slots) * (block_m - 1)
    return -(-bound // block_m) * block_m


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted slot ids [capacity], expert of each block [capacity / block_m]) for local expert ids
    in [0, num_experts], num_experts meaning "held elsewhere". Padding slots hold the slot count
    (out of range); blocks past the used ones hold expert -1. Static shapes, no host sync."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    slots = flat.numel()
    cap = align_capacity(slots, num_experts, block_m)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts:].zero_()  # slots held elsewhere take no room (no host scalar: graph capture)
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.sort(flat, stable=True).indices  # slots grouped by expert, in slot order
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    dest = starts[sorted_experts] + torch.arange(slots, device=flat.device) - first_of_expert[sorted_experts]
    dest = torch.where(sorted_experts == num_experts, cap, dest)  # one trash entry past the end
    sorted_ids = torch.full((cap + 1,), slots, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, cap, block_m, device=flat.device)
    experts = torch.searchsorted(ends[:num_experts].contiguous(), block_starts, right=True)
    expert_ids = torch.where(experts < num_experts, experts, -1).to(torch.int32)
    return sorted_ids[:cap], expert_ids


ALIGN_MAX_SLOTS = 8192  # beyond (prefill), the torch align: one program walking the slots would be slow


@triton.jit
def align_slots(IDS, SORTED, EXPERTS, S, E, CAP, NUM_BLOCKS,
                BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr):
    """moe_align in one program: count the slots of each expert, pad the counts to BLOCK_M, lay the
    experts' runs end to end, then write each slot into its expert's run (in slot order)."""
    experts = tl.arange(0, E_P2)
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for c0 in range(0, S, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(IDS + offs, mask=offs < S, other=E)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    counts = tl.where(experts < E, counts, 0)  # slots held elsewhere take no room
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    for p0 in range(0, CAP, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        tl.store(SORTED + p, tl.zeros([CHUNK], dtype=tl.int32) + S, mask=p < CAP)
    for b0 in range(0, NUM_BLOCKS, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        owner = tl.sum(((ends[None, :] <= (b * BLOCK_M)[:, None]) & (experts < E)[None, :]).to(tl.int32), axis=1)
        tl.store(EXPERTS + b, tl.where(owner < E, owner, -1), mask=b < NUM_BLOCKS)
    tl.debug_barrier()  # the padding above is written before the slots below land on it
    seen = tl.zeros([E_P2], dtype=tl.int32)
    for c0 in range(0, S, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(IDS + offs, mask=offs < S, other=E)
        hit = (ids[:, None] == experts[None, :]).to(tl.int32)
        before = tl.cumsum(hit, axis=0) - hit  # earlier slots of the same expert in this chunk
        dest = tl.sum(hit * (starts + seen)[None, :] + hit * before, axis=1)
        tl.store(SORTED + dest, offs, mask=(offs < S) & (ids < E))
        seen += tl.sum(hit, axis=0)


@triton.jit
def _align_kernel(IDS, SORTED, EXPERTS, S, E, CAP, NUM_BLOCKS,
                  BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr):
    align_slots(IDS, SORTED, EXPERTS, S, E, CAP, NUM_BLOCKS, BLOCK_M, E_P2, CHUNK)


def align_chunk(e_p2: int) -> int:
    """Slots per step of align_slots: a [CHUNK, E_P2] comparison tile of at most 4096 entries."""
    return max(16, min(64, 4096 // e_p2))


def moe_align_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_align in one kernel launch (the decode step: tens of small torch ops per layer otherwise)."""
    flat = topk_ids.reshape(-1).to(torch.int32)
    slots = flat.numel()
    cap = align_capacity(slots, num_experts, block_m)
    sorted_ids = torch.empty(cap, dtype=torch.int32, device=flat.device)
    expert_ids = torch.empty(cap // block_m, dtype=torch.int32, device=flat.device)
    e_p2 = triton.next_power_of_2(num_experts + 1)
    chunk = align_chunk(e_p2)
    _align_kernel[(1,)](flat, sorted_ids, expert_ids, slots, num_experts, cap, cap // block_m,
                        BLOCK_M=block_m, E_P2=e_p2, CHUNK=chunk, num_warps=4)
    return sorted_ids, expert_ids


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # float32 models: full precision (tf32 would lose the 1e-4 agreement with the reference)
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _gate_up_kernel(X, W13, ACT, SORTED, EXPERTS, S, N, K, s_xt, s_we, s_wn, s_at,
                    TOP_K: tl.constexpr, IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """ACT[slot, n] = SiLU(x[token] . w13[e, n]) * (x[token] . w13[e, N + n]) for this block's slots."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(EXPERTS + pid_m).to(tl.int64)
    if e < 0:
        return
    slots = tl.load(SORTED + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    ok = slots < S
    tokens = (slots // TOP_K).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    x_ptrs = X + tokens[:, None] * s_xt + kk[None, :]
    g_ptrs = W13 + e * s_we + n[None, :].to(tl.int64) * s_wn + kk[:, None]  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + N * s_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        a = tl.load(x_ptrs + k0, mask=ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        gate = _dot(a, tl.load(g_ptrs + k0, mask=w_mask, other=0.0), gate, IEEE)
        up = _dot(a, tl.load(u_ptrs + k0, mask=w_mask, other=0.0), up, IEEE)
    act = gate * tl.sigmoid(gate) * up
    tl.store(ACT + slots[:, None].to(tl.int64) * s_at + n[None, :], act.to(ACT.dtype.element_ty),
             mask=ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(ACT, W2, OUT, SORTED, EXPERTS, TOPW, S, N, K, s_at, s_we, s_wn, s_ot,
                 IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[slot, n] = weight[slot] * (act[slot] . w2[e, n]) in float32 for this block's slots."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(EXPERTS + pid_m).to(tl.int64)
    if e < 0:
        return
    slots = tl.load(SORTED + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    ok = slots < S
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = ACT + slots[:, None].to(tl.int64) * s_at + kk[None, :]
    w_ptrs = W2 + e * s_we + n[None, :].to(tl.int64) * s_wn + kk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        a = tl.load(a_ptrs + k0, mask=ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(a, tl.load(w_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc, IEEE)
    acc *= tl.load(TOPW + slots, mask=ok, other=0.0).to(tl.float32)[:, None]
    tl.store(OUT + slots[:, None].to(tl.int64) * s_ot + n[None, :], acc, mask=ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_slots(PARTS, IDS, OUT, N, E, s_p, s_o, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[t, n] = sum over k, in order, of PARTS[t * TOP_K + k, n] for the slots whose expert is
    held here (the others were never written), in OUT's dtype."""
    t = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = n < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        slot = t * TOP_K + k
        held = tl.load(IDS + slot) < E
        acc += tl.load(PARTS + slot * s_p + n, mask=ok & held, other=0.0)
    tl.store(OUT + t * s_o + n, acc.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _gate_up_gemv_kernel(X, W13, ACT, IDS, N, K, E, s_xt, s_we, s_wn, s_at,
                         TOP_K: tl.constexpr, USE_PDL: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """ACT[slot, n] = SiLU(x[token] . w13[e, n]) * (x[token] . w13[e, N + n]) for this program's
    slot and BLOCK_N rows n, as float32 partial sums [BLOCK_N, BLOCK_K] reduced once at the end."""
    slot = tl.program_id(0)
    pid_n = tl.program_id(1)
    if USE_PDL:  # the expert id is the router's output: nothing can be read before it is written
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    e = tl.load(IDS + slot).to(tl.int64)
    if e >= E:  # held by another rank: down skips this slot
        return
    token = (slot // TOP_K).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    g_ptrs = W13 + e * s_we + n[:, None].to(tl.int64) * s_wn + kk[None, :]  # [BLOCK_N, BLOCK_K]
    u_ptrs = g_ptrs + N * s_wn
    x_ptrs = X + token * s_xt + kk
    gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + kk) < K
        a = tl.load(x_ptrs + k0, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        w_mask = n_ok[:, None] & k_ok[None, :]
        gate += tl.load(g_ptrs + k0, mask=w_mask, other=0.0).to(tl.float32) * a
        up += tl.load(u_ptrs + k0, mask=w_mask, other=0.0).to(tl.float32) * a
    g = tl.sum(gate, 1)
    act = g * tl.sigmoid(g) * tl.sum(up, 1)
    tl.store(ACT + slot.to(tl.int64) * s_at + n, act.to(ACT.dtype.element_ty), mask=n_ok)


@triton.jit
def _down_gemv_kernel(ACT, W2, OUT, IDS, TOPW, N, K, E, s_at, s_we, s_wn, s_ot,
                      TOP_K: tl.constexpr, USE_PDL: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[token, n] = sum_k weight[slot] * (act[slot] . w2[e, n]) over the token's top_k slots,
    for this program's BLOCK_N rows n: one float32 partial sum over all of them, rounded once."""
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    w_rows = W2 + n[:, None].to(tl.int64) * s_wn + kk[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    steps = tl.cdiv(K, BLOCK_K)
    for i in range(0, TOP_K * steps):  # one loop over (expert, k0): one pipeline over all the weights
        slot = token * TOP_K + i // steps
        k0 = (i % steps) * BLOCK_K
        e = tl.load(IDS + slot).to(tl.int64)
        mine = e < E  # an expert held by another rank adds nothing here
        k_ok = ((k0 + kk) < K) & mine
        scale = tl.load(TOPW + slot).to(tl.float32)
        a = tl.load(ACT + slot.to(tl.int64) * s_at + k0 + kk, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + tl.where(mine, e, 0) * s_we + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * (a * scale)[None, :]
    tl.store(OUT + token.to(tl.int64) * s_ot + n, tl.sum(acc, 1).to(OUT.dtype.element_ty), mask=n_ok)


def _experts_gemv(x, w13, w2, topk_weights, topk_ids, block_n, block_k, warps, stages) -> torch.Tensor:
    tokens, hidden = x.shape
    experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    ids = topk_ids.to(torch.int32).contiguous()
    act = torch.empty(tokens * top_k, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    use_pdl = pdl_for(x)
    common = dict(TOP_K=top_k, USE_PDL=use_pdl, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                  num_stages=stages, launch_pdl=use_pdl)
    _gate_up_gemv_kernel[(tokens * top_k, triton.cdiv(inter, block_n))](
        x, w13, act, ids, inter, hidden, experts, x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        **common)
    _down_gemv_kernel[(tokens, triton.cdiv(hidden, block_n))](
        act, w2, out, ids, topk_weights.contiguous(), hidden, inter, experts, act.stride(0), w2.stride(0),
        w2.stride(1), out.stride(0), **common)
    return out


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: tuple[int, int, int, int, int] | None = None,
              aligned: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) -> [T, H] in x's dtype.

    x [T, H]; w13 [E, 2I, H] (gate rows, then up rows); w2 [E, H, I]; topk_ids [T, k] local expert
    ids, E for an expert held elsewhere (it adds nothing here). config: (BLOCK_M, BLOCK_N, BLOCK_K,
    warps, stages), default_config's without one. aligned: moe_align's result for BLOCK_M where the
    router already made it (kernels/moe_router.py); BLOCK_M == 1 needs none.
    """
    tokens, hidden = x.shape
    experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    slots = tokens * top_k
    if config is None:
        config = INTERPRET_CONFIG if not x.is_cuda else default_config(slots)
    bm, bn, bk, warps, stages = config
    x = x.contiguous()
    if bm == 1:
        return _experts_gemv(x, w13, w2, topk_weights, topk_ids, bn, bk, warps, stages)
    if aligned is None:
        align = moe_align_triton if slots <= ALIGN_MAX_SLOTS else moe_align
        aligned = align(topk_ids, experts, bm)
    sorted_ids, expert_ids = aligned
    act = torch.empty(slots, inter, dtype=x.dtype, device=x.device)
    parts = torch.empty(slots, hidden, dtype=torch.float32, device=x.device)
    ieee = x.dtype == torch.float32
    blocks = expert_ids.shape[0]
    _gate_up_kernel[(blocks, triton.cdiv(inter, bn))](
        x, w13, act, sorted_ids, expert_ids, slots, inter, hidden, x.stride(0), w13.stride(0), w13.stride(1),
        act.stride(0), TOP_K=top_k, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages)
    _down_kernel[(blocks, triton.cdiv(hidden, bn))](
        act, w2, parts, sorted_ids, expert_ids, topk_weights.reshape(-1).contiguous(), slots, hidden, inter,
        act.stride(0), w2.stride(0), w2.stride(1), parts.stride(0), IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, num_warps=warps, num_stages=stages)
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(hidden))
    _sum_slots[(tokens, triton.cdiv(hidden, block))](parts, topk_ids.reshape(-1), out, hidden, experts, parts.stride(0),
                                                      out.stride(0), TOP_K=top_k, BLOCK=block, num_warps=4)
    return out


def fused_moe_torch(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
    """The same as `fused_moe` in torch, with static shapes: every local expert runs over every token
    and its output is scaled by that token's router weight for it (zero where not chosen). The
    work grows with the number of local experts: this is the CPU path (tests, small models)."""
    tokens, hidden = x.shape
    experts = w13.shape[0]
    combine = torch.zeros(tokens, experts + 1, dtype=torch.float32, device=x.device)
    combine.scatter_add_(1, topk_ids.to(torch.int64), topk_weights.float())  # a token picks an expert once
    out = torch.zeros(tokens, hidden, dtype=torch.float32, device=x.device)
    for e in range(experts):
        gate, up = F.linear(x, w13[e]).chunk(2, dim=-1)
        out += combine[:, e:e + 1] * F.linear(F.silu(gate) * up, w2[e]).float()
    return out.to(x.dtype)
