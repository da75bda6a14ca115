"""Continuous batching over a paged KV cache, with chunked prefill and preemption by recompute.

Each step: running sequences first (a decode token each, or their next prefill chunk), in
arrival order; when a sequence's next tokens need a block and none is free, the most recently
arrived running sequence is preempted (its blocks freed, its tokens recomputed later). Then
waiting sequences are admitted while the token budget, the sequence limit and the blocks allow.

By default (as SGLang) a step is either a prefill step — prompt chunks of running sequences and
newly admitted ones, whenever there are any — or a decode step of every running sequence, so that
decode steps replay their CUDA graphs; a step that mixes both runs eagerly. With a limit on prefill
while decoding (`--max-prefill-tokens-while-decoding`, the server's default), a prefill step taken
while other sequences decode holds at most that many tokens and is followed by a decode step, so a
burst of new prompts delays each running stream by one short step at a time. With mix
(`--enable-mixed-chunk`) prompt chunks share steps with the running decodes.

With the prefix cache (ptp.prefix_cache; on unless `--disable-radix-cache`), an admitted sequence
starts from the longest run of whole blocks the cache holds for its tokens (never all of them: the
last token is computed, for its logits); the blocks of its prompt join the cache as they fill, those
of its output when it finishes or is preempted, and all stay there. Blocks held by the cache alone are reused, least
recently used first, before any running sequence is preempted.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
from collections import deque

import torch

from ptp.kv_cache import BlockAllocator
from ptp.prefix_cache import Node, PrefixCache, check_blocks
from ptp.step import StepBatch
from ptp.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Sequence:
    request_id: str
    index: int                    # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    generator: torch.Generator | None = None
    seq_id: int = dataclasses.field(default_factory=lambda: next(_ids))
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0         # tokens whose K/V are in the cache
    block_table: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    first_token_time: float | None = None
    cache_node: Node | None = None  # the deepest prefix-cache node whose chain begins block_table (None: none)
    num_cached_tokens: int | None = None  # prompt tokens taken from the prefix cache at its first admission
    prompt_logprobs: list[dict[int, float] | None] | None = None  # per prompt position so far, if asked for
    constraint: object = None  # a ptp.structured.Constraint, for a request with SamplingParams.grammar
    in_flight: bool = False    # in a micro-batch not yet back from the last pipeline stage: not scheduled

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p: end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


ADMIT_BATCH_FRACTION = 8  # with a queue waiting, admit once 1/8 of --max-running-requests is free ...
ADMIT_MAX_DEFER = 32      # ... or after this many steps


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_tokens_per_step: int, max_running: int, mix: bool = False,
                 prefix_cache: bool = True, prefill_while_decoding: int = 0):
        self.allocator = allocator
        self.max_tokens_per_step = max_tokens_per_step  # <= 0: no limit
        self.prefill_while_decoding = prefill_while_decoding  # 0: no limit, and no decode step forced between
        self._last_was_prefill = False
        self.max_running = max_running
        # Admission in batches (see _defer_admission): a full batch frees room a few sequences at a time
        self.admit_batch = max(1, max_running // ADMIT_BATCH_FRACTION)
        self._deferred = 0
        self.mix = mix
        self.cache = PrefixCache(allocator) if prefix_cache else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # prefix-cache counters, over every admission (a preempted sequence is looked up again)
        self.prefix_query_tokens = 0  # tokens of admitted sequences
        self.prefix_hit_tokens = 0    # of those, taken from the cache

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, max_seqs: int = 1 << 62) -> tuple[list[Sequence], StepBatch] | None:
        """The next step, of at most `max_seqs` sequences (a micro-batch's share under pipeline parallelism)."""
        if not self.mix:
            prefill = [s for s in self.running if len(s) - s.num_computed > 1]
            budget = None
            if self.prefill_while_decoding and len(prefill) < len(self.running):  # some sequences decode
                budget = self.prefill_while_decoding
                if self._last_was_prefill:  # they had to wait for the last step: their turn now
                    prefill, budget = [], None
                    step = self._schedule([s for s in self.running if len(s) - s.num_computed <= 1], admit=False,
                                          max_seqs=max_seqs)
                    if step is not None:
                        self._last_was_prefill = False
                        return step
            if prefill or (self.waiting and len(self.running) < self.max_running and not self._defer_admission()):
                step = self._schedule(prefill, budget=budget, max_seqs=max_seqs)
                if step is not None:
                    self._last_was_prefill = True
                    return step
            # nothing to prefill, or no room for it: the running sequences' next tokens
        self._last_was_prefill = False
        return self._schedule(list(self.running), admit=self.mix, max_seqs=max_seqs)

    def _defer_admission(self) -> bool:
        """Whether to decode now and admit waiting sequences a little later. When the running batch is
        full and a queue waits, sequences finish a few per step; admitting each few at once makes a
        prefill step per decode step or two, and a prefill step costs the host about as much to launch
        whatever its size (every layer's kernels, outside the decode graphs). So room is let gather
        until `admit_batch` sequences (or the whole queue) fit, for at most ADMIT_MAX_DEFER steps
        (the queue's first request waits that many decode steps at most). A decode step at such a batch
        size is bound by the device's compute, so the smaller batch meanwhile costs little."""
        room = self.max_running - len(self.running)
        if not self.running or room >= min(len(self.waiting), self.admit_batch) or self._deferred >= ADMIT_MAX_DEFER:
            self._deferred = 0
            return False
        self._deferred += 1
        return True

    def _schedule(self, queue: list[Sequence], admit: bool = True, budget: int | None = None,
                  max_seqs: int = 1 << 62) -> tuple[list[Sequence], StepBatch] | None:
        """A step of `queue`'s next tokens (in order), then (with admit) of waiting sequences, within
        `budget` tokens (default: the step's limit) and `max_seqs` sequences."""
        if budget is None:
            budget = self.max_tokens_per_step if self.max_tokens_per_step > 0 else 1 << 62
        elif self.max_tokens_per_step > 0:
            budget = min(budget, self.max_tokens_per_step)
        chosen: list[tuple[Sequence, int]] = []
        preempted = False
        for seq in queue:
            if budget <= 0 or len(chosen) >= max_seqs:
                break
            if seq.status is not Status.RUNNING or seq.in_flight:
                continue  # preempted below by an earlier sequence, or in a micro-batch on its way
            n = min(len(seq) - seq.num_computed, budget)
            if n == 0:
                continue  # its next token is still on its way from the step in flight
            if self.allocator.blocks_needed(seq.block_table, seq.num_computed + n):  # most decode tokens: none
                while not self.allocator.can_grow(seq.block_table, seq.num_computed + n):
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                if seq.status is Status.RUNNING:
                    self.allocator.grow(seq.block_table, seq.num_computed + n)
            if seq.status is Status.RUNNING:
                chosen.append((seq, n))
                budget -= n
        while admit and self.waiting and budget > 0 and not preempted and len(self.running) < self.max_running \
                and len(chosen) < max_seqs and not self.waiting[0].in_flight:  # (preempted on its way: it waits)
            seq = self.waiting[0]
            hit = self._lookup(seq)
            cached = len(hit) * self.allocator.block_size
            n = min(len(seq) - cached, budget)
            needed = -(-(cached + n) // self.allocator.block_size) - len(hit)
            # cached blocks that only the cache holds count as free until this sequence takes them
            if needed > self.allocator.num_free - (self.cache.evictable_among(hit) if hit else 0):
                break
            self.waiting.popleft()
            self._admit_cached(seq, hit, cached)
            self.allocator.grow(seq.block_table, seq.num_computed + n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            chosen.append((seq, n))
            budget -= n
        if not chosen:
            return None
        seqs = [s for s, _ in chosen]
        batch = StepBatch(
            token_ids=[s.token_slice(s.num_computed, s.num_computed + n) for s, n in chosen],
            starts=[s.num_computed for s, _ in chosen],
            block_tables=[list(s.block_table) for s in seqs],
            sample=[s.num_computed + n == len(s) for s, n in chosen],
        )
        for s, n in chosen:
            s.num_computed += n
            # a prompt's blocks join the cache as its prefill fills them (requests side by side share a
            # system prompt); an output's, when its sequence lets go (_release): no tree work in decode.
            # After the batch took its copy of the tables: insert may swap blocks.
            if self.cache is not None and s.num_computed - n < len(s.prompt_ids):
                self._cache_computed(s)
        return seqs, batch

    # --- prefix cache ----------------------------------------------------------------------------
    def _lookup(self, seq: Sequence) -> list[Node]:
        """The cached blocks a waiting sequence can start from: whole blocks, never its last token."""
        if self.cache is None or seq.params.prompt_logprobs is not None:  # prompt logprobs need every row's logits
            return []
        tokens = seq.all_ids
        return self.cache.match(tokens, (len(tokens) - 1) // self.allocator.block_size)

    def _admit_cached(self, seq: Sequence, hit: list[Node], cached: int) -> None:
        if seq.num_cached_tokens is None:
            seq.num_cached_tokens = min(cached, len(seq.prompt_ids))
        if self.cache is None:
            return
        self.prefix_query_tokens += len(seq)
        self.prefix_hit_tokens += cached
        if hit:
            self.cache.acquire(hit, seq.block_table)
            seq.cache_node = hit[-1]
            seq.num_computed = cached

    def _cache_computed(self, seq: Sequence) -> None:
        """Put the sequence's full computed blocks into the cache (a step already queued, or the one
        being built, computes their keys and values before any later step reads them)."""
        bs = self.allocator.block_size
        node = seq.cache_node or self.cache.root
        full = seq.num_computed // bs
        if full > node.depth:
            seq.cache_node = self.cache.insert(node, seq.token_slice(node.depth * bs, full * bs), seq.block_table)

    def _release(self, seq: Sequence) -> None:
        """The sequence lets go of its blocks; those it computed stay in the prefix cache."""
        if self.cache is not None and seq.block_table:
            self._cache_computed(seq)
        seq.cache_node = None
        self.allocator.release(seq.block_table)

    def check(self) -> None:
        """Raise AssertionError if the block bookkeeping is inconsistent (see prefix_cache.check_blocks)."""
        check_blocks(self.allocator, self.cache, [*self.running, *self.waiting])

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self._release(seq)

    @property
    def kv_usage(self) -> float:
        a = self.allocator
        return 1.0 - a.num_free / a.num_blocks
