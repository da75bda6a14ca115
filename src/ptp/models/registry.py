"""Architecture name → model class and its tensor-parallel plan."""
from ptp.config import SUPPORTED_ARCHITECTURES, ModelConfig
from ptp.errors import UnsupportedModelError
from ptp.models import llama, moe

MODELS = {arch: (moe.MoeForCausalLM, moe.tp_plan) if options.get("moe") else (llama.LlamaForCausalLM, llama.tp_plan)
          for arch, options in SUPPORTED_ARCHITECTURES.items()}


def model_class(config: ModelConfig):
    if config.architecture not in MODELS:
        raise UnsupportedModelError(
            f"architecture {config.architecture!r} is not supported; ptp runs {', '.join(sorted(MODELS))}."
        )
    return MODELS[config.architecture]
