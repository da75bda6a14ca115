"""The micro-batched pipeline: the leader's step schedule under pipeline parallelism (--pp-size > 1).

With one step at a time, each stage would idle while the others run. Instead the running sequences
form up to `depth` disjoint groups (micro-batches; `--pp-micro-batches`, one per stage by default)
and the leader keeps a step of each in flight: it schedules a micro-batch, sends it to every rank
without waiting (`StepChannel.post`), runs the first stage's part and passes the hidden state on
(`ModelRunner.launch`), then schedules and launches the next while the later stages run the earlier
ones. Each `step()` tops the pipeline up to `depth` micro-batches and then waits for the oldest:
its logits come back from the last stage, it is sampled on the host, every token goes to the
engine's output side, and its sequences can be scheduled again in the next micro-batch.

A sequence belongs to one micro-batch at a time: while its step is on its way (`Sequence.in_flight`)
the scheduler passes it over, also when it was preempted meanwhile (its token still comes back and
counts; it is recomputed with it afterwards). Prompt chunks go through the same way, one chunk of a
sequence per micro-batch, the chunks of other sequences filling the other micro-batches. Every
stage runs the micro-batches in the order they were sent, so a block freed and given to a later
micro-batch is written by it only after the earlier ones are done with it on that stage.

Each micro-batch holds at most its share of the sequences (running and waiting, over `depth`), so
that a batch forms several micro-batches rather than one large one. Tokens are sampled on the host
once a micro-batch's logits are back (no placeholder tokens: the overlap of micro-batches takes the
place of ptp.overlap's one step ahead).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable

from ptp.outputs import SeqUpdate
from ptp.overlap import Launched, OverlapSchedule
from ptp.scheduler import Sequence
from ptp.step import StepBatch


@dataclasses.dataclass
class MicroBatch:
    """A micro-batch's step on its way through the stages."""
    seqs: list[Sequence]      # every sequence of the step
    sampled: list[Sequence]   # those whose logits come back, in the order of their rows
    pending: object           # the runner's PendingResult (on the leader: the receipt of the logits)
    broadcasts: list          # the works of the step's broadcast to the other ranks


class MicroBatchSchedule(OverlapSchedule):
    """Keeps up to `depth` micro-batches in flight through the pipeline stages (see the module's doc)."""

    def __init__(self, *args, depth: int, post: Callable[[StepBatch], list], **kwargs):
        super().__init__(*args, **kwargs)
        self.depth, self.post = depth, post
        self.flight: collections.deque[MicroBatch] = collections.deque()
        self.num_pipelined = 0   # micro-batches launched while another was in flight
        self.most_in_flight = 0  # the most micro-batches in flight at once

    def step(self) -> list[SeqUpdate]:
        """Launch micro-batches until `depth` are in flight (or nothing more can be scheduled), then
        take the oldest one's tokens."""
        while len(self.flight) < self.depth and self._launch():
            pass
        if not self.flight:
            return []
        return self._complete(self.flight.popleft())

    def _launch(self) -> bool:
        s = self.scheduler
        share = -(-(len(s.running) + len(s.waiting)) // self.depth)
        scheduled = s.schedule(max_seqs=max(1, share))
        if scheduled is None:
            return False
        seqs, batch = scheduled
        for seq in seqs:
            if seq.in_flight:
                raise AssertionError(f"sequence {seq.request_id}/{seq.index} was scheduled into a second micro-batch")
            seq.in_flight = True
        broadcasts = self.post(batch) if self.post is not None else []
        pending = self.runner.launch(batch)
        if self.flight:
            self.num_pipelined += 1
        sampled = [seq for seq, sample in zip(seqs, batch.sample) if sample]
        self.flight.append(MicroBatch(seqs, sampled, pending, broadcasts))
        self.most_in_flight = max(self.most_in_flight, len(self.flight))
        return True

    def _complete(self, mb: MicroBatch) -> list[SeqUpdate]:
        logits = self.runner.collect(mb.pending)
        for work in mb.broadcasts:  # every rank took the step by now: these return at once
            work.wait()
        for seq in mb.seqs:
            seq.in_flight = False
        if not mb.sampled:
            return []
        return self.sample(Launched(mb.sampled, logits, None, False))

    def drain(self) -> list[SeqUpdate]:
        """Take every micro-batch in flight (before the engine shuts down)."""
        updates = []
        while self.flight:
            updates += self._complete(self.flight.popleft())
        return updates

    def execute(self, batch: StepBatch):
        """A step outside the schedule (through Engine.execute): its result would be taken for the
        oldest micro-batch's, so none may be in flight."""
        if self.flight:
            raise RuntimeError(f"Engine.execute runs a step outside the pipeline schedule, but {len(self.flight)} "
                               "micro-batches are in flight: call it when no request is running (after generate "
                               "returns).")
        return super().execute(batch)
