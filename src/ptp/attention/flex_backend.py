"""Paged attention through FlexAttention (torch.nn.attention.flex_attention).

Like the torch backend, each step gathers every sequence's blocks into a [batch, max_blocks *
block_size] view of keys and values; the visibility rule (causal, sequence lengths, sliding window,
padded rows) is the same boolean mask, here turned once per step into FlexAttention's block-sparse
BlockMask and shared by every layer, so blocks a query cannot see are skipped. On CUDA,
flex_attention is compiled (dynamic shapes) while the step around it runs eagerly; on CPU it all
runs eagerly (correct, not fast).
"""
from __future__ import annotations

import warnings

import torch

from ptp.attention.meta import DecodeMeta
from ptp.attention.torch_sdpa import TorchAttention


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
        return True
    except ImportError:
        return False


class FlexAttention(TorchAttention):
    name = "flex"
    fuses_rope = False
    # The BlockMask is built once per step, when Bound announces the step: every step runs eagerly
    # (no compiled decode step, no CUDA graphs, no compiled prefill layer: create_block_mask cannot
    # run inside an op called from compiled code); flex_attention itself is compiled on CUDA.
    compiled_steps = False

    def __init__(self, kv_cache, sliding_window: int | None):
        super().__init__(kv_cache, sliding_window)
        from torch.nn.attention.flex_attention import flex_attention

        device = kv_cache.data.device
        if device.type == "cuda":
            self._attend = torch.compile(flex_attention, dynamic=True)
        else:  # eager on CPU: exact, and the tests' reference; its "not compiled" warning says nothing new
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            self._attend = flex_attention
        self._block_masks: dict[int, object] = {}  # the step's masks, by the id of the tensor they come from

    def forward(self, meta, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin=None) -> torch.Tensor:
        assert cos_sin is None, "the flex backend takes q and k already rotated"
        k_cache, v_cache = self.write_kv(layer, meta.slot_mapping, k, v)
        tables = meta.block_tables.long()
        batch, heads_kv, dim = tables.shape[0], k.shape[1], k.shape[2]
        keys = k_cache[tables].view(batch, -1, heads_kv, dim).transpose(1, 2)  # [B, KV, L, D]
        values = v_cache[tables].view(batch, -1, heads_kv, dim).transpose(1, 2)
        decode = isinstance(meta, DecodeMeta)
        if decode:
            q_padded = q.unsqueeze(2)  # [B, H, 1, D]
        else:
            q_padded = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[meta.q_index].transpose(1, 2)  # [B, H, Q, D]
        out = self._attend(q_padded, keys, values, block_mask=self._mask(meta, q_padded.shape[2], keys.shape[2]),
                           scale=dim ** -0.5, enable_gqa=True)
        if decode:
            return out.squeeze(2).contiguous()
        return out.transpose(1, 2).reshape(-1, q.shape[1], dim)[meta.out_index]

    def begin_step(self) -> None:
        """Called by Bound once per step (eagerly: this backend's decode is not compiled)."""
        self._block_masks = {}

    def _mask(self, meta, q_len: int, kv_len: int):
        """The BlockMask of this step's metadata (a mixed step has two), built at the first layer and
        reused by the others."""
        from torch.nn.attention.flex_attention import create_block_mask

        decode = isinstance(meta, DecodeMeta)
        # the op that reaches a decode step builds its DecodeMeta anew per layer, from the step's tensors
        key = id(meta.seq_lens if decode else meta.mask)
        if key not in self._block_masks:
            dense = self._decode_mask(meta, kv_len) if decode else meta.mask  # [B, 1, Q, L]
            self._block_masks[key] = create_block_mask(lambda b, h, q_idx, kv_idx: dense[b, 0, q_idx, kv_idx],
                                                       dense.shape[0], None, q_len, kv_len, device=dense.device)
        return self._block_masks[key]
