"""The wire format of one step: what a replica's leader sends every rank of it (runner and the
step channel both import it, so neither imports the other)."""
from __future__ import annotations

import dataclasses
import itertools


@dataclasses.dataclass
class StepBatch:
    """One step, as rank 0 broadcasts it: per sequence, the tokens to run and where they go."""
    token_ids: list[list[int]]     # new tokens of each sequence this step
    starts: list[int]              # position of each sequence's first new token
    block_tables: list[list[int]]
    sample: list[bool]             # whether this step completes the sequence (its logits are needed)
    share_tokens: bool = False     # rank 0 broadcasts the tokens it draws (they feed the next step)
    # per sequence: whether every row of its chunk gets logits too (prompt logprobs), after the sampled rows
    all_logits: list[bool] | None = None

    def wants_all_logits(self) -> bool:
        return bool(self.all_logits) and any(self.all_logits)

    @property
    def is_decode(self) -> bool:
        return all(len(t) == 1 for t in self.token_ids) and all(self.sample) and not self.wants_all_logits()

    def encode(self) -> list[int]:
        """Flat integers for the wire: n, then per sequence its token count, start, sample flag and
        table length, then all tokens, then all tables, then the all-logits flags, then share_tokens."""
        all_logits = self.all_logits or [False] * len(self.token_ids)
        return [len(self.token_ids), *map(len, self.token_ids), *self.starts, *map(int, self.sample),
                *map(len, self.block_tables), *itertools.chain.from_iterable(self.token_ids),
                *itertools.chain.from_iterable(self.block_tables), *map(int, all_logits), int(self.share_tokens)]

    @classmethod
    def decode(cls, ints: list[int]) -> "StepBatch":
        share, ints = bool(ints[-1]), ints[:-1]
        n = ints[0]
        all_logits, ints = [bool(x) for x in ints[len(ints) - n:]], ints[:len(ints) - n]
        counts, starts, sample, widths = (ints[1 + i * n: 1 + (i + 1) * n] for i in range(4))
        flat, at = ints[1 + 4 * n:], 0
        token_ids, tables = [], []
        for c in counts:
            token_ids.append(flat[at: at + c])
            at += c
        for w in widths:
            tables.append(flat[at: at + w])
            at += w
        return cls(token_ids, starts, tables, [bool(s) for s in sample], share, all_logits if any(all_logits) else None)
