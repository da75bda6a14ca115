"""One per rank: the sharded model, its KV cache and attention backend; runs one step's batch."""
from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch.distributed as dist

from ptp.attention import make_backend
from ptp.config import ModelConfig
from ptp.hub import ModelFiles
from ptp.kv_cache import KVCache
from ptp.loader import load_model
from ptp.parallel.comm import gather_vocab
from ptp.parallel.mesh import Dist
from ptp.parallel.plans import kv_heads_per_model

log = logging.getLogger("ptp")


@dataclasses.dataclass
class StepBatch:
    """One step, as rank 0 broadcasts it: per sequence, the tokens to run and where they go."""
    token_ids: list[list[int]]     # new tokens of each sequence this step
    starts: list[int]              # position of each sequence's first new token
    block_tables: list[list[int]]
    sample: list[bool]             # whether this step completes the sequence (its logits are needed)


class ModelRunner:
    def __init__(self, config: ModelConfig, files: ModelFiles | None, *, dtype: torch.dtype, d: Dist,
                 load_format: str, max_model_len: int, block_size: int, num_kv_blocks: int | None,
                 mem_fraction_static: float, attention_backend: str, seed: int):
        self.config, self.d, self.device = config, d, d.device
        start = time.perf_counter()
        self.model = load_model(config, files, dtype=dtype, device=d.device, tp_mesh=d.tp_mesh,
                                load_format=load_format, max_positions=max_model_len, seed=seed)
        self.load_seconds = time.perf_counter() - start
        self.weight_bytes = sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
            for p in self.model.parameters()
        )
        self.rank_weight_bytes = self._gather_all(self.weight_bytes)
        kv_heads = kv_heads_per_model(config, d.world_size) // d.world_size  # this rank's
        per_block = KVCache.bytes_per_block(config.num_layers, block_size, kv_heads, config.head_dim, dtype)
        blocks = num_kv_blocks or self._blocks_that_fit(per_block, max_model_len, block_size, mem_fraction_static)
        blocks = self._agree_on_min(blocks)
        self.kv_cache = KVCache(config.num_layers, blocks, block_size, kv_heads, config.head_dim, dtype, d.device)
        self.attention = make_backend(attention_backend, self.kv_cache, config.sliding_window)

    def _blocks_that_fit(self, per_block: int, max_model_len: int, block_size: int, fraction: float) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * fraction - (total - free)
            return max(0, int(budget // per_block))
        wanted = 4 * -(-max_model_len // block_size)
        return max(1, min(wanted, (2 << 30) // per_block))

    def _gather_all(self, value):
        if self.d.world_size == 1:
            return [value]
        out = [None] * self.d.world_size
        dist.all_gather_object(out, value, group=self.d.cpu_group)
        return out

    def _agree_on_min(self, blocks: int) -> int:
        if self.d.world_size == 1:
            return blocks
        return min(self._gather_all(blocks))

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> torch.Tensor | None:
        """Run the batch; return float32 logits [sequences to sample, vocab] (same on every rank)."""
        device, block_size = self.device, self.kv_cache.block_size
        ids, positions, slots, logit_rows, row = [], [], [], [], 0
        for toks, start, table, sample in zip(batch.token_ids, batch.starts, batch.block_tables, batch.sample):
            ids.extend(toks)
            pos = range(start, start + len(toks))
            positions.extend(pos)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
            row += len(toks)
            if sample:
                logit_rows.append(row - 1)
        input_ids = torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True)
        pos_t = torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True)
        slot_t = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)
        self.attention.prepare(batch.starts, [len(t) for t in batch.token_ids], batch.block_tables, slot_t, device)
        hidden = self.model(input_ids, pos_t, self.attention)
        if not logit_rows:
            return None
        local = self.model.logits(hidden[torch.tensor(logit_rows, device=device)])
        return gather_vocab(local, self.config.vocab_size).float()
