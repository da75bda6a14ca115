"""Decode through ptp's Triton paged-decode kernel (kernels/paged_attention.py); prefill through SDPA,
or, with PTP_PAGED_PREFILL=1, steps other than prompts from position 0 through the paged prefill
kernel (kernels/paged_prefill.py), which reads keys through the block tables in place of
SDPA over a padded gathered copy."""
from __future__ import annotations

import logging
import os

import torch

from ptp.attention.meta import DecodeMeta, PrefillMeta
from ptp.attention.torch_sdpa import TorchAttention
from ptp.kernels import sm_count

log = logging.getLogger("ptp")


def choose_splits(batch: int, kv_heads: int, max_tokens: int, device: torch.device, waves: int = 2) -> int:
    """Enough (sequence, KV head, split) programs to fill the GPU `waves` times over; at least 256
    tokens each (at the longest context the step's block tables allow)."""
    sms = sm_count(device.index or 0) if device.type == "cuda" else 4
    wanted = -(-waves * sms // max(1, batch * kv_heads))
    return max(1, min(wanted, max_tokens // 256, 64))




def paged_decode(q, k_new, v_new, slots, k_cache, v_cache, block_tables, seq_lens, scale: float,
                 cos_sin=None, splits: int | None = None, split_tokens: int | None = None,
                 seq_index=None, row_tiles=None) -> torch.Tensor:
    """Rotate q and k (given cos_sin), write the step's k, v into the cache and attend: one kernel
    does it all (and, given more than one split, a second merges them; the count is chosen here).

    split_tokens (deterministic mode): splits of that many context tokens each, merged in order,
    whatever the batch. seq_index: rows are query tokens of prompts (meta.rows_meta); every row's
    key and value are written into the cache first (one launch), then the rows attend a tile of a
    prompt's rows per program (row_tiles; rows_attend: the bits of a program per row, far fewer reads)."""
    from ptp.kernels.paged_attention import paged_decode as kernel

    if split_tokens is not None:
        args = (k_cache, v_cache, block_tables)
        # rows_attend: a prompt's tokens a tile per program (row_tiles); the same bits as the per-row
        # split kernel (tests/test_deterministic.py on CUDA). A decode step stays with the split kernel:
        # at 256 sequences it measured faster than rows_attend with one row per program.
        if seq_index is None:
            return kernel(q, k_new, v_new, slots, *args, seq_lens, scale, 1, cos_sin=cos_sin, split_tokens=split_tokens)
        kernel(q, k_new, v_new, slots, *args, seq_lens, scale, 1, cos_sin=cos_sin, split_tokens=split_tokens,
               seq_index=seq_index, write_only=True)
        from ptp.kernels.paged_attention import rows_attend

        return rows_attend(q, k_new, v_new, *args, seq_lens, row_tiles, scale, split_tokens, cos_sin)
    max_tokens = block_tables.shape[1] * k_cache.shape[1]
    if splits is None:
        splits = choose_splits(q.shape[0], k_cache.shape[2], max_tokens, q.device)
    return kernel(q, k_new, v_new, slots, k_cache, v_cache, block_tables, seq_lens, scale, splits, cos_sin=cos_sin)


class TritonAttention(TorchAttention):
    name = "triton"

    def __init__(self, kv_cache, sliding_window: int | None):
        super().__init__(kv_cache, sliding_window)
        self.fuses_rope = sliding_window is None  # else decode falls back to the torch path
        if sliding_window is not None:
            log.warning("the triton decode kernel has no sliding window; decode uses the torch backend")
        self.paged_prefill = os.environ.get("PTP_PAGED_PREFILL", "0") == "1"

    def forward(self, meta, layer: int, q, k, v, cos_sin=None):
        if (self.paged_prefill and isinstance(meta, PrefillMeta) and not meta.causal and meta.q_rows is not None
                and self.split_tokens is None):
            return self._paged_prefill(meta, layer, q, k, v)
        if not isinstance(meta, DecodeMeta) or self.sliding_window is not None:
            return super().forward(meta, layer, q, k, v, cos_sin)
        k_cache, v_cache = self.kv_cache.layer(layer)
        return paged_decode(q, k, v, meta.slot_mapping, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                            q.shape[-1] ** -0.5, cos_sin, split_tokens=self.split_tokens, seq_index=meta.seq_index,
                            row_tiles=meta.row_tiles)

    def _paged_prefill(self, meta: PrefillMeta, layer: int, q, k, v):
        from ptp.kernels.paged_prefill import paged_prefill

        k_cache, v_cache = self.write_kv(layer, meta.slot_mapping, k, v)  # the kernel reads the step's own k, v there
        # q_index is [B, longest query length rounded up]: a size known on the host, so the grid
        # needs no read of the lengths from the device
        return paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.q_offsets, meta.q_lens, meta.q_starts,
                             meta.q_index.shape[1], q.shape[-1] ** -0.5, self.sliding_window)
