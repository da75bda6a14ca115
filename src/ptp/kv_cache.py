"""Paged KV cache: fixed-size blocks of token slots, handed out by a block allocator."""
from __future__ import annotations

import torch

from ptp.errors import ConfigError


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
    """Free list of block ids. Block tables live on the sequences; this only counts and hands out."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ConfigError("the KV cache has no room for a single block; lower the model size or raise the memory.")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= len(self.free)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Extend `table` so it holds `num_tokens` tokens (caller checked can_grow)."""
        for _ in range(self.blocks_needed(table, num_tokens)):
            table.append(self.free.pop())

    def release(self, table: list[int]) -> None:
        self.free.extend(reversed(table))
        table.clear()
