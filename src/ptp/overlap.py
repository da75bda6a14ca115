"""The overlap schedule: how the leader turns scheduled steps into tokens, keeping the device busy.

A step whose sampled rows need nothing from the host (greedy, or sampled without penalties,
logprobs, a grammar or a min_tokens block) has its tokens drawn on the device and is left in
flight. The next `step()` first queues the following step — each of those sequences bringing a
placeholder for its unknown token, which the device fills in from the previous step's tokens
(`runner.last_tokens`; drawn ones are broadcast to the other ranks) — and only then waits for the
tokens of the step in flight. So the device runs step N+1 while the host checks the stop conditions
of step N. A sequence found finished then has one extra token computed, which is dropped. Every
other step is sampled on the host as soon as its logits are there (the synchronous path).

The engine gives the schedule its scheduler, runner and sampler, how to send a step to the other
ranks, and `append` (the output side: add a token, check stops); the schedule owns the step in
flight, the pinned host buffers of its tokens and the PTP_PROFILE counters.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
from typing import Callable

import torch

from ptp.outputs import SeqUpdate
from ptp.sampling import Sampler, SampleRow
from ptp.scheduler import Scheduler, Sequence, Status
from ptp.step import StepBatch

log = logging.getLogger("ptp")
PROFILE_SKIP_STEPS = 16  # the first steps wait on start-up work (compiles, graph captures)


@dataclasses.dataclass
class Launched:
    """A step on its way: its sampled sequences, their logits, and the greedy tokens' copy to the host."""
    seqs: list[Sequence]
    logits: torch.Tensor
    host: tuple | None  # (pinned buffer, event) of the tokens' copy, for a step left in flight
    ahead: bool  # tokens drawn on the device: the step stays in flight


def on_device(seq: Sequence, blocked: list[int]) -> bool:
    """Whether seq's next token can be drawn on the device without its history or the host: no
    penalties (they need the token in flight), no logprobs, no grammar, no min_tokens block."""
    p = seq.params
    return p.logprobs is None and p.prompt_logprobs is None and p.grammar is None and not blocked \
        and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0


def step_kind(batch: StepBatch) -> str:
    """'decode' (one token per sequence), 'prefill' (prompt chunks only) or 'mixed'."""
    singles = sum(len(t) == 1 for t in batch.token_ids)
    return "decode" if singles == len(batch.token_ids) else "prefill" if singles == 0 else "mixed"


def prompt_scoring(seqs: list[Sequence], batch: StepBatch) -> list[tuple[Sequence, int, int]]:
    """(sequence, chunk start, chunk length) of the step's chunks that give prompt logprobs still
    missing; marks them in batch.all_logits, so that every row of theirs gets logits."""
    out = []
    for seq, toks, start in zip(seqs, batch.token_ids, batch.starts):
        rec = seq.prompt_logprobs
        if rec is not None and max(start + 1, len(rec)) <= min(start + len(toks), len(seq.prompt_ids) - 1):
            out.append((seq, start, len(toks)))
    if out:
        marked = {id(s) for s, _, _ in out}
        batch.all_logits = [id(s) in marked for s in seqs]
    return out


class OverlapSchedule:
    """Runs the leader's steps: schedule, send, execute, sample, hand each token to `append`."""
    num_pipelined = 0  # micro-batches launched while another was in flight (ptp.pipeline's schedule)

    def __init__(self, scheduler: Scheduler, runner, sampler: Sampler, *,
                 send: Callable[[StepBatch], None] | None,
                 append: Callable[[Sequence, int, dict | None], SeqUpdate],
                 eos_ids: set[int], max_model_len: int, overlap: bool, world_size: int):
        self.scheduler, self.runner, self.sampler = scheduler, runner, sampler
        self.send, self.append = send, append
        self.eos_ids, self.max_model_len = eos_ids, max_model_len
        self.overlap, self.world_size = overlap, world_size
        self.inflight: Launched | None = None
        rows = runner.last_tokens.shape[0]
        pin = runner.device.type == "cuda"
        self._host_tokens = [torch.zeros(rows, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._flip = 0
        self.num_overlapped = 0  # steps queued before their predecessor's tokens were known
        self.profile = collections.Counter() if os.environ.get("PTP_PROFILE") else None
        self.by_kind = collections.defaultdict(lambda: [0, 0.0, 0.0])  # PTP_PROFILE: steps, launch, wait
        # PTP_PROFILE on CUDA: each step's GPU time (events around its kernels), by kind of step
        self._gpu_steps: list[tuple[str, int, torch.cuda.Event, torch.cuda.Event]] | None = (
            [] if self.profile is not None and runner.device.type == "cuda" else None)
        self._alloc_at_start: dict[str, int] = {}  # the caching allocator's counters as timing began

    def step(self) -> list[SeqUpdate]:
        """One step: queue the next step, then take the tokens of the one in flight (see the module's doc)."""
        prev, self.inflight = self.inflight, None
        if prev is not None:
            self._add_placeholders(prev)
        t = time.perf_counter()
        scheduled = self.scheduler.schedule()
        launched, kind = None, "none"
        t0 = time.perf_counter()
        if scheduled is not None:
            seqs, batch = scheduled
            if self.profile is not None:
                kind = step_kind(batch)
            sampling = [s for s, sample in zip(seqs, batch.sample) if sample]
            ahead = self.overlap and bool(sampling) and all(on_device(s, self.blocks_eos(s)) for s in sampling)
            drawn = ahead and not all(s.params.greedy for s in sampling)
            batch.share_tokens = drawn and self.world_size > 1
            scoring = prompt_scoring(seqs, batch)
            timed = self._gpu_steps is not None and self.profile["seen"] >= PROFILE_SKIP_STEPS
            if timed:
                if not self._gpu_steps:
                    self._alloc_at_start = allocator_counts()
                began = torch.cuda.Event(enable_timing=True)
                began.record()
            logits = self.execute(batch)
            if timed:
                ended = torch.cuda.Event(enable_timing=True)
                ended.record()
                self._gpu_steps.append((kind, sum(len(t) for t in batch.token_ids), began, ended))
            if scoring:  # the prompt rows' logits follow the sampled rows'
                logits = self._score_prompts(scoring, logits, len(sampling))
            if sampling:
                if drawn:  # draw on the device now; the tokens replace the argmax in last_tokens
                    tokens = self.sampler.sample_tokens(logits, [self.sample_row(s) for s in sampling])
                    self.runner.set_last_tokens(tokens, broadcast=batch.share_tokens)
                # only a step left in flight needs its tokens copied: the synchronous path samples them
                host = self._tokens_to_host(len(sampling)) if ahead else None
                launched = Launched(sampling, logits, host, ahead)
        t1 = time.perf_counter()
        updates = self._resolve(prev) if prev is not None else []
        if launched is not None:
            if launched.ahead:
                self.inflight = launched
                self.num_overlapped += 1
            else:
                updates += self.sample(launched)
        if self.profile is not None:  # PTP_PROFILE=1: where a step's wall time goes, logged at shutdown
            self.profile["seen"] += 1
            if self.profile["seen"] > PROFILE_SKIP_STEPS:
                self.profile["schedule"] += t0 - t
                self.profile["launch"] += t1 - t0
                waited = time.perf_counter() - t1
                self.profile["wait for tokens"] += waited
                self.profile["steps"] += 1
                self.by_kind[kind][0] += 1
                self.by_kind[kind][1] += t1 - t0
                self.by_kind[kind][2] += waited
        return updates

    def execute(self, batch: StepBatch) -> torch.Tensor | None:
        """Send `batch` to every rank and run it; the logits of the sequences it completes."""
        if self.send is not None:
            t = time.perf_counter()
            self.send(batch)
            if self.profile is not None and self.profile["seen"] >= PROFILE_SKIP_STEPS:
                self.profile["broadcast"] += time.perf_counter() - t
        return self.runner.execute(batch)

    def profile_report(self) -> str | None:
        """PTP_PROFILE: the host time per step, by part, once steps were counted."""
        if not self.profile or not self.profile["steps"]:
            return None
        parts = {k: v for k, v in self.profile.items() if k not in ("seen", "steps")}
        steps = self.profile["steps"]
        report = f"per step over {steps} steps: " + ", ".join(f"{k} {v / steps * 1e3:.3f} ms" for k, v in parts.items())
        report += "; by kind of step launched (launch, then wait for the previous step's tokens): " + ", ".join(
            f"{kind} {n} steps {launch / n * 1e3:.2f} + {wait / n * 1e3:.2f} ms"
            for kind, (n, launch, wait) in sorted(self.by_kind.items()))
        if self._gpu_steps:
            torch.cuda.synchronize()
            wall = sum(v for k, v in parts.items() if k != "broadcast")
            by_kind = collections.defaultdict(lambda: [0, 0, 0.0])
            for kind, tokens, began, ended in self._gpu_steps:
                by_kind[kind][0] += 1
                by_kind[kind][1] += tokens
                by_kind[kind][2] += began.elapsed_time(ended) / 1e3
            busy = sum(t for _, _, t in by_kind.values())
            report += (f"; the GPU ran steps {busy:.2f} s of {wall:.2f} s ({busy / wall:.0%}): " + ", ".join(
                f"{kind} {n} steps, {tok} tokens, {t:.2f} s ({t / n * 1e3:.2f} ms each)"
                for kind, (n, tok, t) in sorted(by_kind.items())))
            # Device memory taken or given back while steps ran: each cudaFree waits for the whole device,
            # and a retry (a request the cache could not meet) frees every cached block first
            grew = {k: v - self._alloc_at_start.get(k, 0) for k, v in allocator_counts().items()}
            if grew:
                report += "; the caching allocator meanwhile: " + ", ".join(f"{v} {k}" for k, v in grew.items())
        return report

    # --- the step left in flight -----------------------------------------------------------------
    def _tokens_to_host(self, rows: int):
        """Start copying the step's greedy tokens to the host; (buffer, event) to wait on."""
        buf = self._host_tokens[self._flip]
        self._flip ^= 1
        buf[:rows].copy_(self.runner.last_tokens[:rows], non_blocking=True)
        event = None
        if buf.is_pinned():
            event = torch.cuda.Event()
            event.record()
        return buf, event

    def _add_placeholders(self, prev: Launched) -> None:
        for row, seq in enumerate(prev.seqs):
            # a sequence whose token in flight is its last by length sits the next step out
            if seq.status is Status.RUNNING and len(seq.output_ids) + 1 < seq.max_tokens \
                    and len(seq) + 1 < self.max_model_len:
                seq.output_ids.append(-1 - row)

    def _resolve(self, prev: Launched) -> list[SeqUpdate]:
        buf, event = prev.host
        if event is not None:
            event.synchronize()
        tokens = buf[: len(prev.seqs)].tolist()
        now = time.perf_counter()
        updates = []
        for seq, token in zip(prev.seqs, tokens):
            if seq.output_ids and seq.output_ids[-1] < 0:
                seq.output_ids.pop()
            if seq.status is Status.FINISHED:  # aborted while in flight
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            updates.append(self.append(seq, token, None))
        return updates

    # --- sampling on the host --------------------------------------------------------------------
    def sample(self, launched: Launched) -> list[SeqUpdate]:
        """Sample the step's rows whose sequences are still unfinished; hand each token to `append`."""
        seqs = [s for s in launched.seqs if s.status is not Status.FINISHED]
        if not seqs:
            return []
        logits = launched.logits
        if len(seqs) < len(launched.seqs):  # some finished while this step ran: drop their rows
            keep = [i for i, s in enumerate(launched.seqs) if s.status is not Status.FINISHED]
            logits = logits[torch.tensor(keep, device=logits.device)]
        result = self.sampler(logits, [self.sample_row(s) for s in seqs])
        now = time.perf_counter()
        updates = []
        for seq, token, logprob in zip(seqs, result.token_ids, result.logprobs):
            if seq.first_token_time is None:
                seq.first_token_time = now
            updates.append(self.append(seq, token, logprob))
        return updates

    def _score_prompts(self, scoring: list[tuple[Sequence, int, int]], logits: torch.Tensor,
                       sampled: int) -> torch.Tensor:
        """Record the prompt logprobs that this step's extra logit rows give; return the sampled rows' logits."""
        extra, rows, targets, owners = logits[sampled:], [], [], []
        at = 0
        for seq, start, count in scoring:
            done = len(seq.prompt_logprobs)  # positions recorded (a preempted sequence recomputes its prompt)
            for pos in range(max(start + 1, done), min(start + count, len(seq.prompt_ids) - 1) + 1):
                rows.append(at + pos - 1 - start)  # the row of position pos - 1 predicts token pos
                targets.append(seq.prompt_ids[pos])
                owners.append(seq)
            at += count
        if rows:
            k = max(max(s.params.prompt_logprobs for s, _, _ in scoring), 1)
            logp = torch.log_softmax(extra[torch.tensor(rows, device=extra.device)].float(), dim=-1)
            chosen = logp.gather(1, torch.tensor(targets, device=extra.device).unsqueeze(1)).squeeze(1).tolist()
            top_vals, top_ids = (t.tolist() for t in logp.topk(k, dim=-1))
            for seq, token, lp, ids, vals in zip(owners, targets, chosen, top_ids, top_vals):
                entry = {token: lp}
                for tid, val in zip(ids[: seq.params.prompt_logprobs], vals):
                    entry.setdefault(tid, val)
                seq.prompt_logprobs.append(entry)
        return logits[:sampled]

    def blocks_eos(self, seq: Sequence) -> list[int]:
        """Token ids that seq may not sample yet (min_tokens)."""
        p = seq.params
        if len(seq.output_ids) < p.min_tokens:
            return sorted((self.eos_ids if not p.ignore_eos else set()) | set(p.stop_token_ids))
        return []

    def sample_row(self, seq: Sequence) -> SampleRow:
        p = seq.params
        needs_history = p.repetition_penalty != 1.0
        return SampleRow(p, seq.all_ids if needs_history else [], seq.output_ids, seq.generator, self.blocks_eos(seq),
                         seq.constraint)


def allocator_counts() -> dict[str, int]:
    """The CUDA caching allocator's event counters (those this torch has)."""
    stats = torch.cuda.memory_stats()
    names = {"num_device_alloc": "cudaMalloc", "num_device_free": "cudaFree", "num_alloc_retries": "retries",
             "num_sync_all_streams": "syncs of all streams"}
    return {label: stats[key] for key, label in names.items() if key in stats}
