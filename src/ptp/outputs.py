"""What generate() returns: one RequestOutput per prompt, one CompletionOutput per sample (n)."""
from __future__ import annotations

import dataclasses


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
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache (the first sample's)

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
    """What one step added to one sample: for streaming."""
    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    num_cached_tokens: int = 0  # prompt tokens of this sample taken from the prefix cache
