"""What generate() returns: one RequestOutput per prompt, one CompletionOutput per sample (n)."""
from __future__ import annotations

import dataclasses

from ptp.errors import ConfigError


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None         # "stop" (EOS, stop string or stop token), "length", "abort"
    logprobs: list[dict[int, float]] | None = None  # per token: chosen first, then the top ones
    stop_reason: str | int | None = None            # the stop string or token id that ended it


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    num_cached_tokens: int = 0        # prompt tokens whose KV came from the prefix cache
    # with SamplingParams.prompt_logprobs: per prompt token (None for the first) its logprob and the top ones
    prompt_logprobs: list[dict[int, float] | None] | None = None

    # The first sample's fields, for the common n=1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self):
        return self.outputs[0].logprobs


@dataclasses.dataclass
class SeqUpdate:
    """What one step added to one sample. The engine fills the token ids; the output side
    (ptp.detokenize) the text."""
    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0  # prompt tokens of this sample taken from the prefix cache
    prompt_logprobs: list[dict[int, float] | None] | None = None  # with a sample's first token, if asked for


@dataclasses.dataclass
class ModelLimits:
    """What a request must fit: the vocabulary, the context window and the KV cache (in tokens)."""
    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int

    def check(self, prompt_ids: list[int], params) -> int:
        """Raise ConfigError if the request cannot fit; return its max new tokens."""
        n = len(prompt_ids)
        if n == 0:
            raise ConfigError("the prompt is empty; give at least one token.")
        if any(not 0 <= t < self.vocab_size for t in prompt_ids):
            raise ConfigError(f"the prompt has token ids outside the vocabulary [0, {self.vocab_size}).")
        if any(t >= self.vocab_size for t in params.stop_token_ids or []):
            raise ConfigError(f"stop_token_ids has token ids outside the vocabulary [0, {self.vocab_size}).")
        limit = min(self.max_model_len, self.kv_capacity_tokens)
        if n >= limit:
            raise ConfigError(
                f"this model's maximum context length is {limit} tokens; the prompt has {n} tokens, "
                "leaving no room to generate. Shorten the prompt (or raise --max-model-len)."
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        if n + max_tokens > limit:
            raise ConfigError(
                f"this model's maximum context length is {limit} tokens; you requested {n + max_tokens} "
                f"tokens ({n} in the prompt, {max_tokens} to generate). Lower max_tokens or shorten the prompt."
            )
        return max_tokens
