"""Mixtures of experts: Mixtral, Qwen2-MoE (a shared expert with a sigmoid gate), Qwen3-MoE (q/k norm).

The decoder is llama.py's; the MLP of each sparse layer is a `SparseMoeBlock`: a router (softmax
over the experts in float32, top-k, renormalised where the model says so, as transformers does;
kernels/moe_router.py) and the experts (kernels/fused_moe.py), held per rank as `ExpertPlacement`
says:

- `--tp N` alone: every rank holds every expert, a 1/N slice of its intermediate dimension;
- `--ep E` (E divides N): ranks in groups of N / E hold the same E-th of the experts, whole
  when E = N, else sliced over the group's ranks.

Either way each rank's output is a partial sum (its experts, its slice) that meets the other ranks'
in the layer's one all-reduce, with the shared expert's row-parallel partial sum.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os

import torch
from torch import nn

from ptp.config import ModelConfig
from ptp.models import llama
from ptp.ops import Linear
from ptp.parallel.comm import all_reduce, load_machine_cache, save_machine_cache

log = logging.getLogger("ptp")
# Set PTP_DISABLE_FUSED_MOE=1 to run the experts through the torch path on the GPU too (A/B measurements).
FUSED = os.environ.get("PTP_DISABLE_FUSED_MOE", "0") != "1"


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    """This rank's experts [first, first + count) and its slice `slice_index` of `slices` of each."""
    first: int
    count: int
    slice_index: int = 0
    slices: int = 1

    @classmethod
    def for_rank(cls, config: ModelConfig, rank: int, tp: int) -> "ExpertPlacement":
        ep = config.ep_size
        group = tp // ep  # ranks that hold the same experts, each a slice of them
        count = config.num_experts // ep
        return cls(first=(rank // group) * count, count=count, slice_index=rank % group, slices=group)


class Experts(nn.Module):
    """This rank's experts: w13 [experts, 2 * width, hidden] (gate rows, then up rows), w2 [experts,
    hidden, width], width being this rank's slice of the expert width."""

    def __init__(self, config: ModelConfig, placement: ExpertPlacement):
        super().__init__()
        width = config.moe_intermediate_size // placement.slices
        self.placement, self.num_experts = placement, config.num_experts
        self.w13 = nn.Parameter(torch.empty(placement.count, 2 * width, config.hidden_size))
        self.w2 = nn.Parameter(torch.empty(placement.count, config.hidden_size, width))

    def forward(self, x: torch.Tensor, logits: torch.Tensor, top_k: int, renormalize: bool,
                round_weights: bool) -> torch.Tensor:
        """The experts' weighted sum for router logits [T, experts]: on the GPU the router kernel and
        the fused experts in one operator; elsewhere (and with PTP_DISABLE_FUSED_MOE=1) in torch."""
        if x.is_cuda and FUSED:
            return routed_experts(x, logits, self.w13, self.w2, top_k, renormalize, round_weights,
                                  self.placement.first)
        from ptp.kernels.fused_moe import fused_moe_torch
        from ptp.kernels.moe_router import route_torch

        weights, ids = route_torch(logits, top_k, renormalize, x.dtype if round_weights else torch.float32,
                                   self.placement.first, self.placement.count)
        return fused_moe_torch(x, self.w13, self.w2, weights, ids)


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig, placement: ExpertPlacement):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.round_weights = config.router_weights_in_model_dtype
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)  # the router, on every rank
        self.experts = Experts(config, placement)
        if config.shared_expert_intermediate_size:
            self.shared_expert = llama.MLP(config, config.shared_expert_intermediate_size, reduce=False)
            self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x), self.top_k, self.norm_topk_prob, self.round_weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return all_reduce(out)


class MoeForCausalLM(llama.LlamaForCausalLM):
    """llama.py's model with a `SparseMoeBlock` as the MLP of every sparse layer."""

    def __init__(self, config: ModelConfig, num_kv_heads: int | None = None, max_positions: int | None = None,
                 placement: ExpertPlacement | None = None):
        super().__init__(config, num_kv_heads, max_positions)
        placement = placement or ExpertPlacement(0, config.num_experts)
        for i, layer in enumerate(self.model.layers):
            if config.is_moe_layer(i):
                layer.mlp = SparseMoeBlock(config, placement)

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint's name for parameter (or module) `name` of this model."""
        if self.config.architecture == "MixtralForCausalLM":
            return name.replace(".mlp.", ".block_sparse_moe.")
        return name


# Checkpoint tensors of one expert, per architecture: (gate, up, down).
EXPERT_TENSORS = {"MixtralForCausalLM": ("w1", "w3", "w2")}
EXPERT_TENSORS_DEFAULT = ("gate_proj", "up_proj", "down_proj")


def tp_plan(config: ModelConfig) -> dict:
    """llama.py's plan for attention, embeddings and lm_head; the dense MLPs and shared experts
    split like llama's MLP. The experts are not in the plan: each rank builds and loads its own
    (ExpertPlacement)."""
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {k: v for k, v in llama.tp_plan(config).items() if ".mlp." not in k}
    for i in range(config.num_layers):
        if not config.is_moe_layer(i):
            mlp = f"model.layers.{i}.mlp."
        elif config.shared_expert_intermediate_size:
            mlp = f"model.layers.{i}.mlp.shared_expert."
        else:
            continue
        plan[mlp + "gate_up_proj"] = ColwiseParallel()
        plan[mlp + "down_proj"] = RowwiseParallel(output_layouts=Partial(), use_local_output=True)
    return plan


# --- the fused kernel as an operator, with its tile measured per shape ---------------------------

_CHOICE: dict[str, list] = {}


@torch.library.custom_op("ptp::routed_experts", mutates_args=())
def routed_experts(x: torch.Tensor, logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
                   renormalize: bool, round_weights: bool, first: int) -> torch.Tensor:
    """The router kernel (kernels/moe_router.py: softmax, top-k, renormalisation, this rank's expert
    ids from `first` on, and at small batches the slots sorted for the tile's BLOCK_M) and then
    kernels/fused_moe.py with the tile that measured fastest for this shape on this GPU."""
    from ptp.kernels.fused_moe import default_config, fused_moe
    from ptp.kernels.moe_router import route

    config = _config(x, w13, w2, top_k) or default_config(x.shape[0] * top_k)
    weights, ids, aligned = route(logits, top_k, renormalize, x.dtype if round_weights else torch.float32,
                                  first, w13.shape[0], block_m=config[0])
    return fused_moe(x, w13, w2, weights, ids, config, aligned)


@routed_experts.register_fake
def _(x, logits, w13, w2, top_k, renormalize, round_weights, first):
    return torch.empty_like(x)


TUNE_MAX_TOKENS = 256  # decode batches (a few buckets) are timed; prefill lengths vary: they take default_config


def _config(x, w13, w2, top_k: int) -> tuple | None:
    from ptp.kernels.fused_moe import configs_for

    if not x.is_cuda or x.shape[0] > TUNE_MAX_TOKENS:
        return None
    key = f"{x.shape[0]}x{top_k} {tuple(w13.shape)} {tuple(w2.shape)} {str(x.dtype).removeprefix('torch.')}"
    if not _CHOICE:
        _CHOICE.update(load_machine_cache("fused-moe"))
    entry = _CHOICE.get(key)
    offered = [list(c) for c in configs_for(x.shape[0] * top_k)]
    # A choice made among other tiles (an older ptp) is measured again: a new tile may win.
    if not (isinstance(entry, dict) and entry.get("offered") == offered and entry.get("config") in offered):
        if torch.cuda.is_current_stream_capturing():
            return None  # the default tile; warm-up runs come before any capture, so this is rare
        timings = tune_fused_moe(x, w13, w2, top_k)
        best = min(timings, key=timings.get)
        entry = _CHOICE[key] = {"config": list(best), "us": round(timings[best], 2), "offered": offered}
        log.debug("fused MoE %s: %s of %s", key, best, timings)
        save_machine_cache("fused-moe", _CHOICE)
    return tuple(entry["config"])


def tune_fused_moe(x, w13, w2, top_k: int, iters: int = 16) -> dict[tuple, float]:
    """Microseconds of the kernel per tile of configs_for, in a CUDA graph, under even random
    routings of x's tokens over the experts: a different one each call, so that (as in a decode
    step, whose layers each read their own experts) few of the weights read are still in L2."""
    from ptp.kernels.fused_moe import configs_for, fused_moe
    from ptp.parallel.comm import time_in_graph

    experts = w13.shape[0]
    gen = torch.Generator(device=x.device).manual_seed(0)
    routings = []
    for _ in range(8):
        scores = torch.rand(x.shape[0], experts, generator=gen, device=x.device)
        weights, ids = scores.topk(min(top_k, experts), dim=-1)
        if ids.shape[1] < top_k:  # fewer local experts than top_k: the rest are held elsewhere
            pad = torch.full((x.shape[0], top_k - ids.shape[1]), experts, device=x.device, dtype=ids.dtype)
            ids, weights = torch.cat([ids, pad], 1), torch.cat([weights, weights.new_zeros(pad.shape)], 1)
        routings.append((weights, ids))
    turn = itertools.count()

    def run(config):
        weights, ids = routings[next(turn) % len(routings)]
        return fused_moe(x, w13, w2, weights, ids, config)

    out = {}
    for config in configs_for(x.shape[0] * top_k):
        try:
            run(config)  # compiles it, outside the graph
            out[config] = time_in_graph(lambda c=config: run(c), iters)
        except Exception as e:  # noqa: BLE001  a tile this GPU cannot run (shared memory) is skipped
            log.debug("fused MoE tile %s failed: %s", config, e)
    return out
