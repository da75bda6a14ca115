"""Architecture name → model class and its tensor-parallel plan."""
from ptp.config import SUPPORTED_ARCHITECTURES, ModelConfig
from ptp.errors import UnsupportedModelError
from ptp.models import llama

MODELS = {arch: (llama.LlamaForCausalLM, llama.tp_plan) for arch in SUPPORTED_ARCHITECTURES}


def model_class(config: ModelConfig):
    if config.architecture not in MODELS:
        raise UnsupportedModelError(
            f"architecture {config.architecture!r} is not supported; ptp runs {', '.join(sorted(MODELS))}."
        )
    return MODELS[config.architecture]
