"""Paged KV cache: fixed-size blocks of token slots, handed out by a block allocator."""
from __future__ import annotations

import itertools

import numpy as np
import torch

from ptp.errors import ConfigError


def table_rows(tables: list[list[int]], width: int, dtype=np.int32) -> np.ndarray:
    """Block tables as one [len(tables), width] array, each row padded with zeros (no row longer than
    width). Built in numpy: a nested list through torch.tensor costs about ten times the host time
    (several ms a step at 512 sequences, time in which the device waits for the next step)."""
    lens = np.fromiter(map(len, tables), np.int64, len(tables))
    out = np.zeros((len(tables), width), dtype)
    out[np.arange(width) < lens[:, None]] = np.fromiter(itertools.chain.from_iterable(tables), dtype, int(lens.sum()))
    return out


def longs(values) -> torch.Tensor:
    """A list (or iterable) of ints as an int64 CPU tensor, through numpy (faster than torch.tensor)."""
    if not isinstance(values, (list, tuple)):
        values = list(values)
    return torch.from_numpy(np.array(values, dtype=np.int64).reshape(len(values)))


def to_device(values, device) -> torch.Tensor:
    """Host values (a numpy array, a CPU tensor or a list of numbers) on `device`, without waiting for
    the GPU. A copy from pageable memory makes the host wait until every kernel queued before it has
    run (CUDA stages such copies synchronously): a step launched while the previous one runs would
    wait for that step, and the GPU would then idle while the rest of its launch is built. From
    pinned memory the copy is queued like a kernel; torch's caching host allocator keeps the pinned
    block until its copy has run."""
    if isinstance(values, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(values))
    elif isinstance(values, torch.Tensor):
        t = values
    else:
        t = torch.tensor(values)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def slot(table: list[int], position: int, block_size: int) -> int:
    """The cache slot (block * block_size + offset) of the token at `position` of a sequence whose
    blocks are `table`."""
    return table[position // block_size] * block_size + position % block_size


class KVCache:
    """One tensor for all layers: [layers, 2 (k, v), blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, num_layers, num_blocks, block_size, kv_heads, head_dim, dtype, device):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)

    def layer(self, i: int):
        return self.data[i, 0], self.data[i, 1]

    @staticmethod
    def bytes_per_block(num_layers, block_size, kv_heads, head_dim, dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8


class BlockAllocator:
    """Block ids with reference counts. Block tables live on the sequences; this counts and hands out.

    A block is held by each sequence whose table lists it, and by the prefix cache while the cache keeps
    it (`refs` counts both); it is free when nobody holds it. Blocks that only the prefix cache holds
    count as free: when the free list runs dry, `grow` has the cache give up its least recently used
    ones."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ConfigError("the KV cache has no room for a single block; lower the model size or raise the memory.")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.refs = [0] * num_blocks
        self.cache = None  # a PrefixCache registers itself here (see ptp.prefix_cache)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: free ones, and those only the prefix cache holds."""
        return len(self.free) + (self.cache.num_evictable if self.cache is not None else 0)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend `table` so it holds `num_tokens` tokens (caller checked can_grow)."""
        needed = self.blocks_needed(table, num_tokens)
        if needed > len(self.free):
            self.cache.evict(needed - len(self.free))
        for _ in range(needed):
            block = self.free.pop()
            self.refs[block] = 1
            table.append(block)

    def share(self, block: int) -> None:
        """One more holder of an allocated block."""
        self.refs[block] += 1

    def release(self, table: list[int]) -> None:
        """The table's holder lets go of its blocks; those nobody else holds are free again."""
        for block in reversed(table):
            self.drop(block)
        table.clear()

    def drop(self, block: int) -> None:
        refs = self.refs[block] - 1
        if refs < 0:
            raise AssertionError(f"KV block {block} was released more often than it was handed out")
        self.refs[block] = refs
        if refs == 0:
            self.free.append(block)
        elif refs == 1 and self.cache is not None:
            self.cache.unshared(block)
