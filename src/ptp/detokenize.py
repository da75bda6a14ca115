"""The output side of a request: token ids → text, stop strings, and the final RequestOutput.

The engine works in token ids alone (it stops on EOS, stop token ids and lengths); this module,
run by whoever holds the tokenizer (the server's front end, or `ptp.LLM`), turns each step's
tokens into text incrementally and finds stop strings. A sample that hits a stop string is
finished here, and the caller tells the engine to abort it.
"""
from __future__ import annotations

import dataclasses

from ptp.outputs import CompletionOutput, RequestOutput, SeqUpdate
from ptp.sampling import SamplingParams


@dataclasses.dataclass
class SampleText:
    """One sample's text so far, decoded incrementally (as vLLM and SGLang do: decode a short window
    before the newest tokens and after, keep the difference once it is no longer an incomplete
    character)."""
    ids: list[int]                 # prompt + output
    prefix_offset: int
    read_offset: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class RequestText:
    """Every sample of one request, and how to turn its tokens into text."""

    def __init__(self, tokenizer, prompt: str | None, prompt_ids: list[int], params: SamplingParams):
        self.tokenizer, self.prompt, self.prompt_ids, self.params = tokenizer, prompt, prompt_ids, params
        start = max(0, len(prompt_ids) - 5)
        self.samples = [SampleText(list(prompt_ids), start, len(prompt_ids)) for _ in range(params.n)]
        self.num_cached_tokens = 0
        self.prompt_logprobs = None  # with SamplingParams.prompt_logprobs: from the first update

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    def update(self, u: SeqUpdate) -> SeqUpdate:
        """Apply the engine's update (token ids); return it with its text, and with finish_reason
        "stop" if a stop string ended it here (then the caller aborts the sample in the engine)."""
        s, p = self.samples[u.index], self.params
        if s.finish_reason is not None:  # a stop string ended it; the engine had a token in flight
            return dataclasses.replace(u, text="", token_ids=[], logprobs=None, finish_reason=None)
        if u.index == 0 and u.num_cached_tokens:
            self.num_cached_tokens = u.num_cached_tokens
        if u.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = u.prompt_logprobs
        before = len(s.text)
        s.ids += u.token_ids
        s.token_ids += u.token_ids
        if u.logprobs:
            s.logprobs += u.logprobs
        s.text += self._detokenize(s, final=u.finish_reason is not None)
        reason, stop_reason = u.finish_reason, u.stop_reason
        if p.stop and reason != "abort":
            hit = find_stop(s.text, before, p)
            if hit is not None:
                cut, stop = hit
                s.text = s.text[:cut]
                reason, stop_reason = "stop", stop
        s.finish_reason, s.stop_reason = reason, stop_reason
        return dataclasses.replace(u, text=s.text[before:], finish_reason=reason, stop_reason=stop_reason)

    def _detokenize(self, s: SampleText, final: bool = False) -> str:
        """The new text; an incomplete character is held back until the next token, or written as the
        tokenizer writes it (U+FFFD) once the sample ends, so that the text is its tokens' decode."""
        if self.tokenizer is None:
            return ""
        skip = self.params.skip_special_tokens
        prefix = self.tokenizer.decode(s.ids[s.prefix_offset: s.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(s.ids[s.prefix_offset:], skip_special_tokens=skip)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            s.prefix_offset, s.read_offset = s.read_offset, len(s.ids)
            return full[len(prefix):]
        return ""

    def output(self, request_id: str) -> RequestOutput:
        keep = self.params.logprobs is not None
        return RequestOutput(request_id, self.prompt, self.prompt_ids, [
            CompletionOutput(i, s.text, list(s.token_ids), s.finish_reason, list(s.logprobs) if keep else None,
                             s.stop_reason)
            for i, s in enumerate(self.samples)
        ], finished=self.finished, num_cached_tokens=self.num_cached_tokens, prompt_logprobs=self.prompt_logprobs)


def find_stop(text: str, before: int, p: SamplingParams):
    """(where the text ends, the stop string) for the first stop string that ends after `before`."""
    longest = max(len(s) for s in p.stop)
    window_start = max(0, before - longest + 1)
    best = None
    for stop in p.stop:
        i = text.find(stop, window_start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    if best is None:
        return None
    i, stop = best
    return (i + len(stop) if p.include_stop_str_in_output else i), stop
