"""Applying a model's tensor-parallel plan, and checking that tp can split the model at all."""
from __future__ import annotations

import logging

from torch import nn

from ptp.config import ModelConfig
from ptp.errors import ConfigError

log = logging.getLogger("ptp")


def tp_problem(config: ModelConfig, tp: int) -> str | None:
    """Why `tp` (with config.ep_size) cannot split this model, or None when it can."""
    if config.num_heads % tp:
        return f"{config.num_heads} attention heads are not divisible by tp={tp}"
    kv = config.num_kv_heads
    if kv % tp and tp % kv:
        return f"{kv} KV heads can neither be split over nor replicated across tp={tp} ranks"
    if config.has_dense_layers and config.intermediate_size % tp:
        return f"the MLP width {config.intermediate_size} is not divisible by tp={tp}"
    if config.num_experts:
        return _expert_problem(config, tp)
    return None


def _expert_problem(config: ModelConfig, tp: int) -> str | None:
    ep = config.ep_size
    if tp % ep:
        return f"--ep {ep} does not divide tp={tp} (expert-parallel groups are made of tensor-parallel ranks)"
    if config.num_experts % ep:
        return f"{config.num_experts} experts cannot be placed evenly on --ep {ep} ranks"
    if config.moe_intermediate_size % (tp // ep):
        return (f"the expert width {config.moe_intermediate_size} is not divisible by tp / ep = {tp // ep} "
                f"(the ranks that share each expert)")
    if config.shared_expert_intermediate_size % tp:
        return f"the shared expert's width {config.shared_expert_intermediate_size} is not divisible by tp={tp}"
    return None


def valid_tp_values(config: ModelConfig, limit: int = 64) -> list[int]:
    return [t for t in range(1, limit + 1) if tp_problem(config, t) is None]


def check_tp(config: ModelConfig, tp: int) -> None:
    if config.ep_size > 1 and not config.num_experts:
        raise ConfigError(f"--ep {config.ep_size} places the experts of a mixture-of-experts model on ranks, but "
                          f"{config.architecture} has no experts; leave --ep at 1.")
    problem = tp_problem(config, tp)
    if problem:
        ep = f" with --ep {config.ep_size}" if config.ep_size > 1 else ""
        raise ConfigError(
            f"tp={tp}{ep} cannot split this model: {problem}. Valid tp values for it{ep}: "
            f"{', '.join(map(str, valid_tp_values(config))) or 'none'}."
        )


def kv_heads_per_model(config: ModelConfig, tp: int) -> int:
    """KV heads in the (possibly replicated) model: at least one whole head per rank."""
    return max(config.num_kv_heads, tp)


def apply_tp(model: nn.Module, tp_mesh, plan: dict) -> None:
    """Shard `model` in place with `parallelize_module`; re-tie embeddings that the plan untied."""
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, tp_mesh, plan)
    if model.config.tie_word_embeddings:
        model.tie_weights()  # the plan distributes embed_tokens and lm_head separately
    log.info("tensor parallel: %d ranks, %d submodule patterns split", tp_mesh.size(), len(plan))


def localize(model: nn.Module, rank: int, tp: int) -> None:
    """After loading: swap each DTensor parameter for its local shard and drop the plan's hooks.

    The plan has decided and loaded every rank's slice; from here the forward runs on plain local
    tensors (no DTensor dispatch on the hot path, nothing for torch.compile to guard on), and the
    model's own `all_reduce` / `gather_vocab` calls do the communication.
    """
    from torch.distributed.tensor import DTensor

    from ptp.parallel.layers import VocabParallelEmbedding

    for module in model.modules():
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                setattr(module, name, nn.Parameter(param.to_local(), requires_grad=False))
    vocab = model.config.vocab_size
    start = min(rank * -(-vocab // tp), vocab)
    if model.model.embed_tokens is not None:  # a later pipeline stage has none
        model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens.weight, start)
    if model.config.tie_word_embeddings:
        model.tie_weights()
