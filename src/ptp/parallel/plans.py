"""Applying a model's tensor-parallel plan, and checking that tp can split the model at all."""
from __future__ import annotations

import logging

from torch import nn

from ptp.config import ModelConfig
from ptp.errors import ConfigError

log = logging.getLogger("ptp")


def tp_problem(config: ModelConfig, tp: int) -> str | None:
    """Why `tp` cannot split this model, or None when it can."""
    if config.num_heads % tp:
        return f"{config.num_heads} attention heads are not divisible by tp={tp}"
    kv = config.num_kv_heads
    if kv % tp and tp % kv:
        return f"{kv} KV heads can neither be split over nor replicated across tp={tp} ranks"
    if config.intermediate_size % tp:
        return f"the MLP width {config.intermediate_size} is not divisible by tp={tp}"
    return None


def valid_tp_values(config: ModelConfig, limit: int = 64) -> list[int]:
    return [t for t in range(1, limit + 1) if tp_problem(config, t) is None]


def check_tp(config: ModelConfig, tp: int) -> None:
    problem = tp_problem(config, tp)
    if problem:
        raise ConfigError(
            f"tp={tp} cannot split this model: {problem}. Valid tp values for it: "
            f"{', '.join(map(str, valid_tp_values(config)))}."
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
