"""The router of a mixture-of-experts layer in one Triton launch: softmax, top-k, renormalisation,
the mapping to this rank's experts and, at small token counts, the sorting of slots by expert
(kernels/fused_moe.py's moe_align) too. In torch the same is about ten kernels per layer (softmax,
top-k with its gather and sort, sum, division, cast, the local-id mapping, the align's own).

The routing is transformers' (Mixtral, Qwen2-MoE, Qwen3-MoE): probabilities by a float32 softmax
over all the experts of the router logits, the top_k largest, optionally divided by their sum
(norm_topk_prob; Mixtral always), optionally rounded to the model's dtype (the Qwen models).

Ties: among equal probabilities the lowest expert index is taken first, and the k chosen come out
in descending order, ties in ascending index. torch.topk leaves ties unspecified (on CPU it picked
experts 84, 87, 86, 85, ... of 128 equal scores), so `route_torch` takes a stable descending sort
instead, and both paths make the same choice. Equal probabilities are equal router weights: any
choice among them is the model's own arithmetic, and the order of the k only changes the order of
the float32 sum over them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ptp.kernels import pdl_for
from ptp.kernels.fused_moe import align_capacity, align_chunk, align_slots

FUSED_ALIGN_MAX_TOKENS = 16  # up to here one program routes every token and then aligns the slots
ROWS = 4  # tokens per step of a routing program: a [ROWS, experts] tile


def route_torch(logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype,
                first: int = 0, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] in weights_dtype, local expert ids [T, top_k] int64) for router logits
    [T, experts]: this rank holds experts [first, first + count); others map to id `count`."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    order = torch.sort(probs, dim=-1, descending=True, stable=True)  # ties: lowest index first
    weights, ids = order.values[:, :top_k], order.indices[:, :top_k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    count = logits.shape[-1] if count is None else count
    if first != 0 or count != logits.shape[-1]:
        ids = ids - first
        ids = torch.where((ids >= 0) & (ids < count), ids, count)
    return weights.to(weights_dtype), ids


@triton.jit
def _route_rows(L, W, IDS, rows, T, E, FIRST, COUNT, s_l,
                TOP_K: tl.constexpr, RENORM: tl.constexpr, E_P2: tl.constexpr, K_P2: tl.constexpr,
                ROWS: tl.constexpr):
    """Route the tokens `rows` ([ROWS] indices; those >= T are skipped): weights and local ids."""
    row_ok = rows < T
    e = tl.arange(0, E_P2)
    e_ok = e < E
    logits = tl.load(L + rows[:, None].to(tl.int64) * s_l + e[None, :],
                     mask=row_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
    logits = tl.where(e_ok[None, :], logits, float("-inf"))
    p = tl.exp(logits - tl.max(logits, 1)[:, None])
    probs = p / tl.sum(p, 1)[:, None]  # padding columns: exactly 0, after every real expert on ties
    kk = tl.arange(0, K_P2)
    weights = tl.zeros([ROWS, K_P2], dtype=tl.float32)
    ids = tl.zeros([ROWS, K_P2], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(probs, 1, tie_break_left=True)
        value = tl.max(probs, 1)
        weights = tl.where(kk[None, :] == j, value[:, None], weights)
        ids = tl.where(kk[None, :] == j, best[:, None], ids)
        probs = tl.where(e[None, :] == best[:, None], -1.0, probs)  # taken: below every probability
    if RENORM:
        weights = weights / tl.sum(weights, 1)[:, None]  # columns past TOP_K hold 0
    local = ids - FIRST
    local = tl.where((local >= 0) & (local < COUNT), local, COUNT)
    out = rows[:, None].to(tl.int64) * TOP_K + kk[None, :]
    ok = row_ok[:, None] & (kk < TOP_K)[None, :]
    tl.store(W + out, weights.to(W.dtype.element_ty), mask=ok)
    tl.store(IDS + out, local, mask=ok)


@triton.jit
def _route_kernel(L, W, IDS, SORTED, EXPERTS, T, E, FIRST, COUNT, CAP, NUM_BLOCKS, s_l,
                  TOP_K: tl.constexpr, RENORM: tl.constexpr, E_P2: tl.constexpr, K_P2: tl.constexpr,
                  ROWS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                  LOCAL_P2: tl.constexpr, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    """ALIGN: one program routes all T tokens, then sorts their slots by expert (align_slots).
    Otherwise: each program routes ROWS tokens."""
    if USE_PDL:  # the logits are the kernel before's output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    r = tl.arange(0, ROWS)
    if ALIGN:
        for t0 in range(0, T, ROWS):
            _route_rows(L, W, IDS, t0 + r, T, E, FIRST, COUNT, s_l, TOP_K, RENORM, E_P2, K_P2, ROWS)
        tl.debug_barrier()  # every thread's ids are written before any is read back
        align_slots(IDS, SORTED, EXPERTS, T * TOP_K, COUNT, CAP, NUM_BLOCKS, BLOCK_M, LOCAL_P2, CHUNK)
    else:
        _route_rows(L, W, IDS, tl.program_id(0) * ROWS + r, T, E, FIRST, COUNT, s_l, TOP_K, RENORM, E_P2, K_P2, ROWS)


def route(logits: torch.Tensor, top_k: int, renormalize: bool, weights_dtype: torch.dtype,
          first: int = 0, count: int | None = None, block_m: int = 1,
          ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """route_torch in one launch -> (weights, local ids as int32, aligned). aligned is moe_align's
    (sorted slot ids, expert of each block) for block_m, made in the same launch, when block_m > 1
    and there are at most FUSED_ALIGN_MAX_TOKENS tokens; else None."""
    tokens, experts = logits.shape
    count = experts if count is None else count
    assert 1 <= top_k <= experts and logits.stride(-1) == 1, (top_k, logits.shape, logits.stride())
    weights = torch.empty(tokens, top_k, dtype=weights_dtype, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=logits.device)
    fuse = block_m > 1 and tokens <= FUSED_ALIGN_MAX_TOKENS
    slots = tokens * top_k
    cap = align_capacity(slots, count, block_m) if fuse else 0
    sorted_ids = torch.empty(cap, dtype=torch.int32, device=logits.device)
    expert_ids = torch.empty(cap // block_m if fuse else 0, dtype=torch.int32, device=logits.device)
    local_p2 = triton.next_power_of_2(count + 1)
    use_pdl = pdl_for(logits)
    grid = (1,) if fuse else (triton.cdiv(tokens, ROWS),)
    _route_kernel[grid](logits, weights, ids, sorted_ids, expert_ids, tokens, experts, first, count, cap,
                        expert_ids.shape[0], logits.stride(0), TOP_K=top_k, RENORM=renormalize,
                        E_P2=triton.next_power_of_2(experts), K_P2=triton.next_power_of_2(top_k), ROWS=ROWS,
                        ALIGN=fuse, BLOCK_M=block_m, LOCAL_P2=local_p2, CHUNK=align_chunk(local_p2),
                        USE_PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
    return weights, ids, (sorted_ids, expert_ids) if fuse else None
