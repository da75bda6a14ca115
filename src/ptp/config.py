"""The model's shape, normalised from a Hugging Face config.json or GGUF metadata."""
from __future__ import annotations

import dataclasses
from typing import Any

from ptp.errors import UnsupportedModelError

# Architectures ptp implements, mapped to the options of their decoder: models/llama.py for the dense
# ones, models/moe.py for the mixtures of experts (whose attention is llama.py's).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
    "MixtralForCausalLM": {"moe": True},
    "Qwen2MoeForCausalLM": {"moe": True, "qkv_bias": True},
    "Qwen3MoeForCausalLM": {"moe": True, "qk_norm": True},
}


@dataclasses.dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts (num_experts == 0: a dense model). intermediate_size is then the width of
    # the dense MLP layers (mlp_only_layers, and those off the decoder_sparse_step), if any.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one more expert that every token goes through
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # Router weights rounded to the model's dtype before they scale the experts' outputs (Qwen) or
    # kept in float32 (Mixtral), as transformers does.
    router_weights_in_model_dtype: bool = True
    # How this run places experts (--ep): ranks in groups of tp / ep_size hold the same experts.
    ep_size: int = 1

    def is_moe_layer(self, index: int) -> bool:
        return (self.num_experts > 0 and index not in self.mlp_only_layers
                and (index + 1) % self.decoder_sparse_step == 0)

    @property
    def has_dense_layers(self) -> bool:
        return any(not self.is_moe_layer(i) for i in range(self.num_layers))

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"architecture {archs or raw.get('model_type')!r} is not supported; "
                f"ptp runs {', '.join(sorted(SUPPORTED_ARCHITECTURES))}."
            )
        options = SUPPORTED_ARCHITECTURES[arch]
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        sliding = raw.get("sliding_window")
        if arch.startswith("Qwen") and not raw.get("use_sliding_window", False):
            sliding = None
        rope_scaling = raw.get("rope_scaling") or None
        rope_theta = raw.get("rope_theta")
        if rope_theta is None and isinstance(raw.get("rope_parameters"), dict):
            # transformers >= 5 writes rope settings under rope_parameters
            params = dict(raw["rope_parameters"])
            rope_theta = params.pop("rope_theta", 10000.0)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind in (None, "default"):
                rope_scaling = None
            elif kind not in ("llama3", "linear"):
                raise UnsupportedModelError(
                    f"rope scaling type {kind!r} is not supported; ptp supports 'llama3' and 'linear'."
                )
        return cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=bool(raw.get("qkv_bias", options.get("qkv_bias", False))) or bool(raw.get("attention_bias", False)),
            qk_norm=options.get("qk_norm", False),
            rope_scaling=rope_scaling,
            sliding_window=sliding,
            dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos,
            **(_moe_fields(arch, raw) if options.get("moe") else {}),
        )


def _moe_fields(arch: str, raw: dict[str, Any]) -> dict[str, Any]:
    if arch == "MixtralForCausalLM":  # every layer sparse, experts as wide as intermediate_size, always renormalised
        return dict(num_experts=raw["num_local_experts"], num_experts_per_tok=raw["num_experts_per_tok"],
                    moe_intermediate_size=raw["intermediate_size"], norm_topk_prob=True,
                    router_weights_in_model_dtype=False)
    return dict(
        num_experts=raw.get("num_experts") or raw["num_local_experts"],
        num_experts_per_tok=raw["num_experts_per_tok"],
        moe_intermediate_size=raw["moe_intermediate_size"],
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0)
        if arch == "Qwen2MoeForCausalLM" else 0,
        decoder_sparse_step=int(raw.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
    )
