"""Structured outputs: a grammar the output must match, enforced by masking the logits.

Why llguidance: its Rust core computes the allowed-token mask of a JSON schema, regex or Lark
grammar in tens of microseconds per step (an Earley parser over a token trie, no precompiled
automaton per schema, so a new schema costs nothing up front), it covers most of JSON Schema,
and it is maintained and used by vLLM and SGLang.

The front end turns a request's `response_format` / `guided_regex` / `guided_choice` into one
llguidance grammar string (`grammar_for`), checked there so that a bad schema gets a 400 naming
the problem; the string travels in SamplingParams.grammar. The replica, which sees the tokens,
keeps one matcher per constrained sample (`Constraint`): before sampling it fills the sample's
bitmask of allowed tokens, the sampler applies it to the logits on the device, and the sampled
token advances the matcher. Constrained samples take the engine's synchronous path; the others
keep the overlapped one and pay nothing.
"""
from __future__ import annotations

import functools
import json

import torch

from ptp.errors import ConfigError


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ConfigError("structured outputs need the llguidance package: pip install llguidance") from None
    return llguidance


# compact JSON (no free whitespace between tokens): a model cannot pad its output with whitespace
# for as long as max_tokens allows, and a schema's output stays as short as it can be
JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_for(*, json_schema: dict | None = None, json_object: bool = False, regex: str | None = None,
                choice: list[str] | None = None) -> str:
    """The llguidance grammar of one kind of constraint; ConfigError naming the problem if it cannot compile."""
    ll = _llguidance()
    M = ll.LLMatcher
    if json_object:
        grammar = M.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS)
    elif json_schema is not None:
        try:
            grammar = M.grammar_from_json_schema(json_schema, JSON_OPTIONS)
        except ValueError as e:
            raise ConfigError(f"the JSON schema cannot be used: {e}") from None
    elif regex is not None:
        grammar = M.grammar_from_regex(regex)
    elif choice is not None:
        if not choice or any(not isinstance(c, str) or not c for c in choice):
            raise ConfigError("guided_choice must be a non-empty list of non-empty strings.")
        grammar = M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choice))
    else:
        raise ValueError("no constraint given")
    error = M.validate_grammar(grammar)
    if error:
        what = "JSON schema" if json_schema is not None else "regex" if regex is not None else "grammar"
        raise ConfigError(f"the {what} cannot be compiled for constrained decoding: {error}")
    return grammar


@functools.lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of the tokenizer (about a second to build: once per process, on first use)."""
    from llguidance.hf import from_tokenizer

    return from_tokenizer(tokenizer, n_vocab=vocab_size)


class Constraint:
    """One sample's matcher: which tokens may come next, and the tokens it took."""

    def __init__(self, tokenizer, vocab_size: int, grammar: str):
        if tokenizer is None:
            raise ConfigError("structured outputs need the model's tokenizer; this model was loaded without one.")
        ll = _llguidance()
        self.matcher = ll.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self.matcher.is_error():
            raise ConfigError(f"the grammar cannot be used: {self.matcher.get_error()}")
        self.words = (vocab_size + 31) // 32

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed-token bitmask (int32 words, bit j of word i: token 32·i + j) into row (host)."""
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def advance(self, token: int) -> bool:
        """Take the sampled token; False if the grammar rejects it (then the matcher is in error)."""
        return self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The output is complete: nothing but EOS may follow."""
        return self.matcher.is_stopped()


def bitmasks(constraints: list[Constraint | None], vocab_size: int) -> torch.Tensor | None:
    """[rows, words] int32 on the host: each constrained row's allowed tokens, every token for the others."""
    if not any(c is not None for c in constraints):
        return None
    words = (vocab_size + 31) // 32
    masks = torch.full((len(constraints), words), -1, dtype=torch.int32)
    for i, c in enumerate(constraints):
        if c is not None:
            c.fill(masks[i])
    return masks


def apply_bitmasks(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """logits with every token its row's bitmask disallows at -inf (on the logits' device)."""
    masks = masks.to(logits.device, non_blocking=True)
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((masks.unsqueeze(-1) >> bits) & 1).view(masks.shape[0], -1)[:, : logits.shape[1]]
    return logits.masked_fill(allowed == 0, float("-inf"))
