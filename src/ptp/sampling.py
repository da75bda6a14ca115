"""Sampling parameters and the sampler: penalties, temperature, top-k/top-p/min-p, seeds, logprobs."""
from __future__ import annotations

import dataclasses

import torch

from ptp.errors import ConfigError
from ptp.kv_cache import to_device


@dataclasses.dataclass
class SamplingParams:
    """How to pick each next token, and when to stop. Same meaning as vLLM's / OpenAI's fields."""
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1              # -1 or 0: no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16   # None: up to the context window
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None   # number of top logprobs per token besides the chosen one
    skip_special_tokens: bool = True
    # the prompt's own logprobs: per prompt token (None for the first) the token's and this many top ones
    prompt_logprobs: int | None = None
    # an llguidance grammar the output must match (ptp.structured.grammar_for builds it)
    grammar: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self.validate()

    def validate(self) -> None:
        def bad(name, value, expected):
            raise ConfigError(f"SamplingParams.{name}={value!r} is invalid: expected {expected}.")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", self.n, "an integer >= 1")
        if not (0.0 <= self.temperature <= 100.0):
            bad("temperature", self.temperature, "a number in [0, 100] (0 means greedy)")
        if not (0.0 < self.top_p <= 1.0):
            bad("top_p", self.top_p, "a number in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            bad("top_k", self.top_k, "-1 or 0 (no limit) or an integer >= 1")
        if not (0.0 <= self.min_p <= 1.0):
            bad("min_p", self.min_p, "a number in [0, 1]")
        if not (0.0 < self.repetition_penalty <= 10.0):
            bad("repetition_penalty", self.repetition_penalty, "a number in (0, 10] (1 means none)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                bad(name, getattr(self, name), "a number in [-2, 2]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", self.max_tokens, "an integer >= 1, or None for the rest of the context")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", self.min_tokens, f"at most max_tokens={self.max_tokens}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", self.logprobs, "an integer in [0, 20]")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            bad("prompt_logprobs", self.prompt_logprobs, "an integer in [0, 20], or None")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", self.seed, "an integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", self.stop, "non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", self.stop_token_ids, "non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def argmax_rows(x: torch.Tensor, parts: int = 64) -> torch.Tensor:
    """argmax over the last dimension of [B, V] in two passes: one pass over a 128k vocabulary is one
    program per row on the GPU, one long serial pass at batch 1; `parts` slices of it run side by side."""
    b, v = x.shape
    if v < 64 * parts:
        return x.argmax(dim=-1)
    width = -(-v // parts)
    x = torch.nn.functional.pad(x, (0, parts * width - v), value=float("-inf"))
    best, at = x.view(b, parts, width).max(dim=-1)
    part = best.argmax(dim=-1, keepdim=True)
    return (part * width + at.gather(-1, part)).squeeze(-1)


def deterministic() -> bool:
    """Whether this process runs --enable-deterministic-inference (the runner sets ops.DETERMINISTIC)."""
    from ptp.ops import DETERMINISTIC

    return DETERMINISTIC["on"]


def _penalized(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


@dataclasses.dataclass
class SampleRow:
    """What the sampler needs of one sequence this step."""
    params: SamplingParams
    token_history: list[int]      # prompt + output so far (for repetition penalty)
    output_tokens: list[int]      # output so far (for presence/frequency penalty)
    generator: torch.Generator | None
    block_eos: list[int]          # token ids that may not be sampled yet (min_tokens)
    constraint: object = None     # a ptp.structured.Constraint: the tokens its grammar allows next


@dataclasses.dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # chosen token first, then the top ones


class Sampler:
    def __init__(self, device, seed: int):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SampleResult:
        logits = logits.float()
        token_list = self.sample_tokens(logits, rows).tolist()
        return SampleResult(token_list, self._logprobs(logits, token_list, rows))

    @torch.no_grad()
    def sample_tokens(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """The next token of each row, as a device tensor: no copy to the host, no sync."""
        logits = logits.float()
        constrained = any(r.constraint is not None for r in rows)
        if constrained:  # structured outputs: the grammar's masks, computed while the step ran on the device
            from ptp.structured import apply_bitmasks, bitmasks

            logits = apply_bitmasks(logits, bitmasks([r.constraint for r in rows], logits.shape[1]))
        plain = all(r.params.greedy and not r.block_eos and not _penalized(r.params) for r in rows)
        if plain:  # the common greedy case: one argmax
            return argmax_rows(logits)
        if any(_penalized(r.params) for r in rows):
            logits = self._penalize(logits.clone(), rows)
        elif any(r.block_eos for r in rows):
            logits = logits.clone()
        for i, row in enumerate(rows):
            if row.block_eos:
                logits[i, row.block_eos] = float("-inf")
        greedy_tokens = argmax_rows(logits)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        tokens = greedy_tokens
        if sampled:
            idx = to_device(sampled, logits.device)
            if deterministic():
                # one row at a time: torch's sort and cumsum pick their algorithm by the row count
                # (one row is scanned differently from many), which would move top-p's cut-off
                probs = torch.cat([self._probs(logits[i: i + 1], [rows[i]], stable=True) for i in sampled])
            else:
                probs = self._probs(logits[idx], [rows[i] for i in sampled])
            choice = self._draw(probs, [rows[i] for i in sampled])
            tokens = greedy_tokens.clone()
            tokens[idx] = choice
        return tokens

    def _penalize(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        for i, row in enumerate(rows):
            p = row.params
            if p.repetition_penalty != 1.0 and row.token_history:
                ids = to_device(sorted(set(row.token_history)), logits.device)
                seen = logits[i, ids]
                logits[i, ids] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and row.output_tokens:
                counts = torch.zeros(logits.shape[1], device=logits.device)
                counts.scatter_add_(0, to_device(row.output_tokens, logits.device),
                                    torch.ones(len(row.output_tokens), device=logits.device))
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        return logits

    @staticmethod
    def _probs(logits: torch.Tensor, rows: list[SampleRow], stable: bool = False) -> torch.Tensor:
        temps = to_device([r.params.temperature for r in rows], logits.device).unsqueeze(1)
        # a tiny temperature or repetition penalty overflows float logits: the largest become finfo.max
        # (ties among the best), never inf or nan, which would fail the draw for the whole batch
        logits = (logits / temps).nan_to_num(nan=float("-inf"), posinf=torch.finfo(logits.dtype).max)
        vocab = logits.shape[1]
        top_k = to_device([r.params.top_k if r.params.top_k > 0 else vocab for r in rows], logits.device)
        top_p = to_device([r.params.top_p for r in rows], logits.device)
        min_p = to_device([r.params.min_p for r in rows], logits.device)
        sorted_logits, order = logits.sort(dim=-1, descending=True, stable=stable)  # stable: ties by token id
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        drop = ranks >= top_k.unsqueeze(1)
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs   # mass of strictly better tokens
        drop |= before >= top_p.unsqueeze(1)
        drop |= sorted_probs < min_p.unsqueeze(1) * sorted_probs[:, :1]
        drop[:, 0] = False  # the best token always survives
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filtered = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
        return filtered.softmax(dim=-1)

    def _draw(self, probs: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """A draw from each row's distribution: a seeded row (every row in deterministic mode, where
        the engine seeds unseeded requests from --seed) from its own generator, one row at a time,
        so that its draw does not depend on the other rows; the others from the engine's generator."""
        out = torch.empty(len(rows), dtype=torch.long, device=probs.device)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            idx = to_device(unseeded, probs.device)
            out[idx] = torch.multinomial(probs[idx], 1, generator=self.generator).squeeze(1)
        for i, row in enumerate(rows):
            if row.generator is not None:
                out[i] = torch.multinomial(probs[i], 1, generator=row.generator).squeeze(0)
        return out

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: list[int], rows: list[SampleRow]):
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        result: list[dict[int, float] | None] = [None] * len(rows)
        if not wanted:
            return result
        if deterministic():
            from ptp.ops import log_softmax_rows

            logp = log_softmax_rows(raw[wanted])
        else:
            logp = torch.log_softmax(raw[wanted], dim=-1)
        k = max(rows[i].params.logprobs for i in wanted)
        top_vals, top_ids = logp.topk(max(k, 1), dim=-1)
        chosen = logp[torch.arange(len(wanted)), torch.tensor([tokens[i] for i in wanted])]
        for j, i in enumerate(wanted):
            entry = {tokens[i]: chosen[j].item()}
            n = rows[i].params.logprobs
            for tid, val in zip(top_ids[j, :n].tolist(), top_vals[j, :n].tolist()):
                entry.setdefault(tid, val)
            result[i] = entry
        return result
