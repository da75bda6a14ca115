"""Pipeline stages: which layers each stage holds, and the point-to-point links between stages.

Stage s of P holds a contiguous run of layers. Tensor-parallel rank t of stage s sends the hidden
state and the residual ([tokens, hidden] each) to rank t of stage s + 1. The last stage's logits go
back to the first stage, whose ranks embed the next step's tokens: its tensor-parallel rank 0 (a
replica's leader, which samples) receives the float32 logits of the sampled rows, every other rank
of the first stage only their greedy tokens (the placeholders of the next step are taken from them).

With micro-batches in flight (`--pp-micro-batches`), the result goes to the leader alone and is
received asynchronously: the leader posts the receive as it passes a step on (`post_result`) and
waits for it later (`PendingResult.wait`), while it runs the next micro-batch's first stage. A step
that samples no row (a prompt chunk that completes no sequence) sends one number back, so that the
leader knows when every stage is done with it.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ptp.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
    """Pipeline stage `index` of `count`, holding the model's layers `layers`."""
    index: int
    count: int
    layers: range

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


def stage_layers(num_layers: int, pp: int, partition: list[int] | None = None) -> list[range]:
    """The layers of each of `pp` stages: `partition` (layer counts) if given, else an even split with
    the remainder one each to the first stages (the last stage also runs the lm_head)."""
    if partition is None:
        if pp > num_layers:
            raise ConfigError(f"--pp-size {pp} is more than the model's {num_layers} layers: every stage needs at "
                              f"least one layer; use --pp-size {num_layers} or fewer.")
        base, extra = divmod(num_layers, pp)
        partition = [base + (s < extra) for s in range(pp)]
    if len(partition) != pp or sum(partition) != num_layers or min(partition) < 1:
        raise ConfigError(
            f"--pp-layer-partition {','.join(map(str, partition))} gives {len(partition)} stages holding "
            f"{sum(partition)} layers, but the model has {num_layers} layers and --pp-size is {pp}: give {pp} counts "
            f"of at least 1 that add up to {num_layers}."
        )
    bounds = [0]
    for n in partition:
        bounds.append(bounds[-1] + n)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _exchange(ops: list[tuple]) -> None:
    """Run (isend | irecv, tensor, peer) operations as one batch and wait for them (on CUDA, `wait`
    makes the current stream wait; the host does not block)."""
    works = dist.batch_isend_irecv([dist.P2POp(op, tensor, peer) for op, tensor, peer in ops])
    for work in works:
        work.wait()


class StageLink:
    """One rank's links: from the previous stage and to the next (same tensor-parallel rank), and
    between the last stage and the first."""

    def __init__(self, rank: int, tp_rank: int, tp_size: int, stage: Stage):
        self.stage, self.tp_rank = stage, tp_rank
        self.prev = rank - tp_size if not stage.first else None
        self.next = rank + tp_size if not stage.last else None
        hops = (stage.count - 1) * tp_size
        self.back = rank + hops if stage.first else rank - hops if stage.last else None

    def receive_hidden(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        _exchange([(dist.irecv, x, self.prev), (dist.irecv, residual, self.prev)])

    def send_hidden(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        _exchange([(dist.isend, x.contiguous(), self.next), (dist.isend, residual.contiguous(), self.next)])

    def send_back(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """Last stage: the sampled rows' logits to the leader, their greedy tokens to the other ranks."""
        payload = logits if self.tp_rank == 0 else tokens
        _exchange([(dist.isend, payload.contiguous(), self.back)])

    def receive_back(self, rows: int, vocab: int, tokens: torch.Tensor) -> torch.Tensor | None:
        """First stage: fill tokens[:rows] with the last stage's greedy tokens; on tensor-parallel rank 0
        also return the logits."""
        if self.tp_rank != 0:
            _exchange([(dist.irecv, tokens[:rows], self.back)])
            return None
        from ptp.sampling import argmax_rows

        logits = torch.empty(rows, vocab, dtype=torch.float32, device=tokens.device)
        _exchange([(dist.irecv, logits, self.back)])
        tokens[:rows].copy_(argmax_rows(logits))
        return logits

    def send_result(self, logits: torch.Tensor | None, device: torch.device) -> None:
        """Last stage, micro-batched: the sampled rows' logits (or, for a step without any, one number
        saying it is done) to the leader, from the last stage's tensor-parallel rank 0 only."""
        if self.tp_rank == 0:
            payload = logits if logits is not None else torch.zeros(1, dtype=torch.float32, device=device)
            _exchange([(dist.isend, payload.contiguous(), self.back)])

    def post_result(self, rows: int, vocab: int, device: torch.device) -> "PendingResult":
        """Leader, micro-batched: post the receipt of a step's result without waiting for it."""
        buffer = torch.empty((rows, vocab) if rows else (1,), dtype=torch.float32, device=device)
        works = dist.batch_isend_irecv([dist.P2POp(dist.irecv, buffer, self.back)])  # as _exchange, not waited
        return PendingResult(buffer if rows else None, works)


@dataclasses.dataclass
class PendingResult:
    """A step's result on its way back from the last stage: the sampled rows' logits (None if it
    samples none) once `wait()` returns."""
    logits: torch.Tensor | None
    works: list

    def wait(self) -> torch.Tensor | None:
        for work in self.works:
            work.wait()
        return self.logits
