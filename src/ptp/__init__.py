"""ptp: a PyTorch-native, compiler-centric LLM engine with tensor parallelism."""
from ptp.args import EngineArgs
from ptp.errors import ConfigError, ModelNotFoundError, PtpError, RankFailedError, UnsupportedModelError
from ptp.llm import LLM
from ptp.outputs import CompletionOutput, RequestOutput
from ptp.sampling import SamplingParams

__all__ = [
    "LLM", "SamplingParams", "EngineArgs", "RequestOutput", "CompletionOutput",
    "PtpError", "ConfigError", "ModelNotFoundError", "UnsupportedModelError", "RankFailedError",
]
__version__ = "0.1.0"
