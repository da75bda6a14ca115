"""What a step looks like to attention: the metadata the runner builds once per step."""
from __future__ import annotations

import dataclasses
import itertools
import weakref

import numpy as np
import torch

from ptp.kv_cache import longs, table_rows, to_device


@dataclasses.dataclass
class DecodeMeta:
    """Every sequence brings exactly one token. Shapes depend on the batch size only."""
    slot_mapping: torch.Tensor  # [B] flat cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor      # [B] int32, including the new token; 0 for a padded row
    # Deterministic mode runs prompt tokens as rows too (`rows_meta`): then row r is a query token of
    # the sequence whose block table is row seq_index[r]; None when every row is its own sequence.
    seq_index: torch.Tensor | None = None
    # With seq_index: int32 [3, tiles], each tile's first row, rows and sequence
    # (kernels/paged_attention.py rows_attend: a program per tile of a prompt's tokens)
    row_tiles: torch.Tensor | None = None


PAD_QUERIES, PAD_KEYS = 64, 128


@dataclasses.dataclass
class PrefillMeta:
    """Any mix of prompt chunks and single tokens, padded to [B, max_query] queries."""
    slot_mapping: torch.Tensor  # [T]
    block_tables: torch.Tensor  # [B, max_blocks]
    q_index: torch.Tensor       # [B, max_q] index into the T tokens (T = a zero pad row)
    out_index: torch.Tensor     # [T] index into the flattened [B * max_q] output
    mask: torch.Tensor          # [B, 1, max_q, max_blocks * block_size] True where a query may attend
    # Every row from position 0 (whole prompts, or their first chunks), no sliding window: each row's
    # attention is plain causal attention over its own k, v (no gather from the cache, no mask). Not a
    # tensor: it reaches the prefill op through the backend (Bound sets it per step), so compiled code
    # does not specialise on it.
    causal: bool = False
    # Per row, int32 [3, B]: its first token among the T, its query length, the position of its first
    # token: what the triton backend's paged prefill kernel reads instead of q_index and mask. One
    # tensor (one copy; three views of it were three storage offsets for compiled code to guard on).
    q_rows: torch.Tensor | None = None
    # On CUDA, no sliding window, not every row from position 0: int64 [sum of starts + query lens], the
    # cache slots of each row's keys 0 .. start + query len - 1, row after row: what flash attention's
    # varlen form reads in place of the padded copy and the mask (ptp.attention.torch_sdpa)
    k_slots: torch.Tensor | None = None

    @property
    def q_offsets(self) -> torch.Tensor:
        return self.q_rows[0]

    @property
    def q_lens(self) -> torch.Tensor:
        return self.q_rows[1]

    @property
    def q_starts(self) -> torch.Tensor:
        return self.q_rows[2]

    @classmethod
    def build(cls, starts: list[int], query_lens: list[int], block_tables: list[list[int]],
              slot_mapping: torch.Tensor, block_size: int, sliding_window: int | None, device) -> "PrefillMeta":
        # Sizes rounded up (queries to 64, keys to 128): SDPA's cuDNN kernel builds a plan for every new
        # shape (tens of ms each, over a second for the first), which stalled a server's steps whose
        # shapes rarely repeat; padded rows and keys are masked off.
        batch, max_q = len(starts), -(-max(query_lens) // PAD_QUERIES) * PAD_QUERIES
        key_blocks = max(1, PAD_KEYS // block_size)
        max_blocks = max(-(-(s + q) // block_size) for s, q in zip(starts, query_lens))
        max_blocks = -(-max_blocks // key_blocks) * key_blocks
        tables = torch.from_numpy(table_rows([t[:max_blocks] for t in block_tables], max_blocks, np.int64))
        # q_index[b, j]: token offset + j for the row's queries, T (the zero pad row) past them
        offsets = np.cumsum([0, *query_lens[:-1]])
        lens = np.asarray(query_lens)
        cols = np.arange(max_q)
        valid = cols[None, :] < lens[:, None]
        q_index = np.where(valid, offsets[:, None] + cols[None, :], sum(query_lens))
        out_index = np.flatnonzero(valid.reshape(-1))
        # The mask is computed on the device from the rows' starts and lengths (a [B, max_q, keys]
        # tensor built on the host and copied would cost host time and a large transfer each step).
        starts_t = to_device(longs(starts), device)
        lens_t = to_device(lens.astype(np.int64), device)
        q_cols = torch.arange(max_q, device=device)
        q_pos = starts_t.view(-1, 1, 1) + q_cols.view(1, -1, 1)
        k_pos = torch.arange(max_blocks * block_size, device=device).view(1, 1, -1)
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        q_valid = q_cols.view(1, -1, 1) < lens_t.view(-1, 1, 1)
        mask = torch.where(q_valid, mask, k_pos == 0)  # padded query rows attend to one key: no NaN
        causal = not any(starts) and sliding_window is None
        rows = torch.from_numpy(np.stack([offsets, lens, np.asarray(starts)]).astype(np.int32))
        k_slots = None
        if not causal and sliding_window is None and torch.device(device).type == "cuda":
            k_slots = to_device(torch.from_numpy(key_slots(tables.numpy(), np.asarray(starts) + lens, block_size)),
                                device)
        return cls(slot_mapping, to_device(tables, device), to_device(q_index, device), to_device(out_index, device),
                   mask.unsqueeze(1), causal, to_device(rows, device), k_slots)


def key_slots(tables: np.ndarray, key_lens: np.ndarray, block_size: int) -> np.ndarray:
    """The cache slots of positions 0 .. key_lens[b] - 1 of every row b of `tables` [B, blocks], row
    after row."""
    row = np.repeat(np.arange(len(key_lens)), key_lens)
    pos = np.arange(int(key_lens.sum())) - np.repeat(np.cumsum(key_lens) - key_lens, key_lens)
    return tables[row, pos // block_size] * block_size + pos % block_size


@dataclasses.dataclass
class MixedMeta:
    """A step with both kinds of rows: rows that bring one token (decodes) go through the backend's
    decode path, prompt chunks through its prefill path, so that no decode row is padded to the
    longest chunk (with 255 decodes beside one 512-token chunk, the padded step attends for 255 x 512
    query rows where 255 are needed)."""
    decode_tokens: torch.Tensor  # [D] indices into the step's T tokens
    decode: DecodeMeta
    chunk_tokens: torch.Tensor   # [T - D]
    chunks: PrefillMeta


def tables_tensor(tables: list[list[int]], device) -> torch.Tensor:
    """Block tables as one int32 tensor, rows padded with zeros (one tensor built, not one per row)."""
    rows = table_rows(tables, max(len(t) for t in tables))
    return to_device(rows, device)


def step_meta(starts: list[int], query_lens: list[int], block_tables: list[list[int]], slot_mapping: torch.Tensor,
              block_size: int, sliding_window: int | None, device) -> DecodeMeta | PrefillMeta | MixedMeta:
    """The attention metadata of an eager step (tokens of row i: query_lens[i], from position starts[i])."""
    single = [i for i, n in enumerate(query_lens) if n == 1]

    def decode_meta(rows, slots):
        lens = to_device(np.fromiter((starts[i] + 1 for i in rows), np.int32, len(rows)), device)
        return DecodeMeta(slots, tables_tensor([block_tables[i] for i in rows], device), lens)

    if len(single) == len(query_lens):
        return decode_meta(single, slot_mapping)
    if not single:
        return PrefillMeta.build(starts, query_lens, block_tables, slot_mapping, block_size, sliding_window, device)
    offsets = list(itertools.accumulate(query_lens, initial=0))
    chunked = [i for i, n in enumerate(query_lens) if n > 1]
    decode_tokens = to_device(longs(offsets[i] for i in single), device)
    chunk_tokens = to_device(np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in chunked]), device)
    chunks = PrefillMeta.build([starts[i] for i in chunked], [query_lens[i] for i in chunked],
                               [block_tables[i] for i in chunked], slot_mapping[chunk_tokens], block_size,
                               sliding_window, device)
    return MixedMeta(decode_tokens, decode_meta(single, slot_mapping[decode_tokens]), chunk_tokens, chunks)


def rows_meta(starts: list[int], query_lens: list[int], block_tables: list[list[int]], slot_mapping: torch.Tensor,
              device) -> DecodeMeta:
    """Deterministic mode: every token of the step is a row that attends, like a decode token, to its
    sequence's cache up to and including itself. A token's attention is then computed the same way
    whether it came in a prompt (whole or in chunks), was recomputed after a preemption, or was
    decoded: one kernel, one order of the context, whatever else is in the step."""
    lens = [s + i + 1 for s, n in zip(starts, query_lens) for i in range(n)]
    lens_t = to_device(np.asarray(lens, dtype=np.int32), device)
    tables = tables_tensor(block_tables, device)
    if all(n == 1 for n in query_lens):
        return DecodeMeta(slot_mapping, tables, lens_t)
    seq = longs(b for b, n in enumerate(query_lens) for _ in range(n))
    from ptp.kernels.paged_attention import row_tiles  # a prompt's tokens attend a tile of them per program

    return DecodeMeta(slot_mapping, tables, lens_t, to_device(seq, device), to_device(row_tiles(query_lens), device))


def mark_unbacked(meta) -> None:
    """Tell torch.compile that the sizes of these tensors say nothing about the step: they only reach
    the opaque attention ops, so no compiled code specialises (or recompiles) on a batch of 1, a
    one-block table, or two sizes that happen to be equal."""
    from torch._dynamo.decorators import mark_unbacked as mark

    for field in dataclasses.fields(meta):
        value = getattr(meta, field.name)
        if isinstance(value, torch.Tensor):
            for dim in range(value.dim()):
                mark(value, dim)
        elif dataclasses.is_dataclass(value):
            mark_unbacked(value)


_BACKENDS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_keys = itertools.count()


def register(backend) -> int:
    """Give a backend a number by which the decode_attention op finds it (and its KV cache)."""
    key = next(_keys)
    _BACKENDS[key] = backend
    return key


@torch.library.custom_op("ptp::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, layer: int, backend: int,
                     cos_sin: torch.Tensor | None = None, seq_index: torch.Tensor | None = None,
                     row_tiles: torch.Tensor | None = None) -> torch.Tensor:
    """Write this step's k, v into the paged cache and attend, for a decode step. Given cos_sin,
    q and k are not rotated yet and the backend applies RoPE itself (at position seq_len - 1).

    One opaque op for torch.compile: the KV cache is reached through the backend, not passed in, so
    the compiler never sees (and never copies) the cache that the op updates in place.
    """
    meta = DecodeMeta(slot_mapping, block_tables, seq_lens, seq_index, row_tiles)
    return _BACKENDS[backend].forward(meta, layer, q, k, v, cos_sin=cos_sin)


@decode_attention.register_fake
def _(q, k, v, slot_mapping, block_tables, seq_lens, layer, backend, cos_sin=None, seq_index=None, row_tiles=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("ptp::prefill_attention", mutates_args=())
def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
                      block_tables: torch.Tensor, q_index: torch.Tensor, out_index: torch.Tensor, mask: torch.Tensor,
                      layer: int, backend: int, q_rows: torch.Tensor | None = None,
                      k_slots: torch.Tensor | None = None) -> torch.Tensor:
    """Write the step's k, v (rotated) into the paged cache and attend, for prompt chunks
    (`PrefillMeta`'s fields): opaque to torch.compile for the same reason as decode_attention."""
    owner = _BACKENDS[backend]
    meta = PrefillMeta(slot_mapping, block_tables, q_index, out_index, mask, getattr(owner, "causal_prefill", False),
                       q_rows, k_slots)
    return owner.forward(meta, layer, q, k, v)


@prefill_attention.register_fake
def _(q, k, v, slot_mapping, block_tables, q_index, out_index, mask, layer, backend, q_rows=None, k_slots=None):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _prefill(q, k, v, m: PrefillMeta, layer: int, backend: int) -> torch.Tensor:
    return prefill_attention(q, k, v, m.slot_mapping, m.block_tables, m.q_index, m.out_index, m.mask, layer, backend,
                             m.q_rows, m.k_slots)


class Bound:
    """A backend bound to one step's metadata: what the model calls as attn(layer, q, k, v, rotary, positions)
    with q and k not yet rotated; RoPE is applied here, or inside the backend's decode kernel."""

    def __init__(self, backend, meta):
        self.backend, self.meta = backend, meta
        prefill = meta.chunks if isinstance(meta, MixedMeta) else meta
        backend.causal_prefill = isinstance(prefill, PrefillMeta) and prefill.causal  # read by prefill_attention
        begin = getattr(backend, "begin_step", None)  # per-step state of a backend (flex: its BlockMask)
        if begin is not None:
            begin()

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary, positions) -> torch.Tensor:
        m = self.meta
        if isinstance(m, DecodeMeta):
            if getattr(self.backend, "fuses_rope", False):
                return decode_attention(q, k, v, m.slot_mapping, m.block_tables, m.seq_lens, layer, self.backend.key,
                                        rotary.cos_sin, m.seq_index, m.row_tiles)
            q, k = rotary(positions, q, k)
            return decode_attention(q, k, v, m.slot_mapping, m.block_tables, m.seq_lens, layer, self.backend.key,
                                    None, m.seq_index, m.row_tiles)
        q, k = rotary(positions, q, k)
        key = self.backend.key
        if isinstance(m, MixedMeta):
            out = torch.empty_like(q)
            d, c = m.decode_tokens, m.chunk_tokens
            out[d] = decode_attention(q[d], k[d], v[d], m.decode.slot_mapping, m.decode.block_tables,
                                      m.decode.seq_lens, layer, key)
            out[c] = _prefill(q[c], k[c], v[c], m.chunks, layer, key)
            return out
        return _prefill(q, k, v, m, layer, key)
