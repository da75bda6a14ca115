"""One per rank: the sharded model, its KV cache and attention backend; runs one step's batch.

Steps where every sequence brings one token (decode) go through `DecodeGraphs` (graphs.py): the forward is
compiled once (torch.compile, dynamic batch size) and captured in a CUDA graph per batch-size
bucket, the batch padded to the next bucket. Every other step (prefill, mixed) runs through one
decoder layer compiled with dynamic shapes that every layer of the model reuses (a whole-model
compile per kind of step would cost minutes of start-up), or eagerly (--torch-compile-prefill off,
or where the decode step is not compiled either).

Under pipeline parallelism each rank runs its stage's layers only (parallel/p2p.py): the first stage
embeds, the others start from the previous stage's hidden state and residual, received before the
step (into the decode graphs' static inputs when the step replays one); the last stage computes
the logits and sends the sampled rows' back to the first stage.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from ptp import ops
from ptp.attention import Bound, make_backend, rows_meta, step_meta
from ptp.attention.meta import mark_unbacked
from ptp.config import ModelConfig
from ptp.errors import ConfigError
from ptp.graphs import DecodeGraphs, PrefillGraphs
from ptp.hub import ModelFiles
from ptp.kv_cache import KVCache, longs, to_device
from ptp.loader import load_model
from ptp.parallel.comm import broadcast_from_first, gather_vocab, set_fixed_order
from ptp.parallel.mesh import Dist
from ptp.parallel.p2p import PendingResult, Stage, StageLink, stage_layers
from ptp.parallel.plans import kv_heads_per_model
from ptp.sampling import argmax_rows
from ptp.step import StepBatch

log = logging.getLogger("ptp")
CPU_KV_BYTES = 256 << 20  # the default KV cache on CPU holds up to this, or one full-length sequence if more


class ModelRunner:
    def __init__(self, config: ModelConfig, files: ModelFiles | None, *, dtype: torch.dtype, d: Dist,
                 load_format: str, max_model_len: int, block_size: int, num_kv_blocks: int | None,
                 mem_fraction_static: float, attention_backend: str, seed: int,
                 compile_decode: bool = False, compile_tuned: bool = False, cuda_graphs: bool = False,
                 cuda_graph_max_bs: int = 160, max_seqs: int = 256,
                 custom_all_reduce: bool = True, p2p_check: bool = False, max_step_tokens: int = 8192,
                 compile_prefill: bool = False, deterministic: bool = False, pp_partition: list[int] | None = None,
                 pipelined: bool = False):
        self.config, self.d, self.device, self.dtype = config, d, d.device, dtype
        self.max_model_len = max_model_len
        self.deterministic = deterministic
        if deterministic:
            check_deterministic(config, attention_backend, d.device)
        ops.set_deterministic(deterministic)
        set_fixed_order(deterministic)
        self.stage = Stage(d.pp_rank, d.pp_size, stage_layers(config.num_layers, d.pp_size, pp_partition)[d.pp_rank])
        self.link = StageLink(d.rank, d.tp_rank, d.tp_size, self.stage) if d.pp_size > 1 else None
        # micro-batches in flight through the stages: results go back to the leader only, received later
        self.pipelined = pipelined and self.link is not None
        start = time.perf_counter()
        self.model = load_model(config, files, dtype=dtype, device=d.device, tp_mesh=d.tp_mesh,
                                load_format=load_format, max_positions=max_model_len, seed=seed, stage=self.stage)
        self.load_seconds = time.perf_counter() - start
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.rank_weight_bytes = self._gather_all(self.weight_bytes)
        kv_heads = kv_heads_per_model(config, d.tp_size) // d.tp_size  # this rank's
        layers = len(self.stage.layers)  # this stage's: the KV cache holds only those
        per_block = KVCache.bytes_per_block(layers, block_size, kv_heads, config.head_dim, dtype)
        blocks = num_kv_blocks or self._blocks_that_fit(per_block, max_model_len, block_size, mem_fraction_static)
        blocks = min(self._gather_all(blocks))
        if blocks < 1:
            raise ConfigError(
                f"no memory is left for the KV cache after the weights ({self.weight_bytes / 2**30:.1f} GiB per rank) "
                f"under --mem-fraction-static {mem_fraction_static}; raise it, or spread the model over more GPUs "
                "(--tp, --pp-size)."
            )
        if blocks * block_size < max_model_len:
            log.warning("the KV cache holds %d tokens, less than one sequence of --max-model-len %d",
                        blocks * block_size, max_model_len)
        log.info("building the KV cache: %d tokens in blocks of %d, %.2f GiB per rank", blocks * block_size,
                 block_size, (blocks + 1) * per_block / 2**30)
        # One block more than the scheduler hands out: padded rows of a graph write their K/V there.
        self.kv_cache = KVCache(layers, blocks + 1, block_size, kv_heads, config.head_dim, dtype, d.device)
        self.num_blocks = blocks
        self.rank_kv_bytes = self._gather_all(self.kv_cache.data.nbytes)
        # The greedy token of each sampled row of the last step, on the device, on every rank. A step's
        # token id -(j + 1) stands for row j of it: the previous step's token, which the host has not
        # seen yet (the engine queues decode steps one ahead of their results).
        self.last_tokens = torch.zeros(max(max_seqs, cuda_graph_max_bs), dtype=torch.long, device=d.device)
        self.attention = make_backend(attention_backend, self.kv_cache, config.sliding_window, d.device)
        if deterministic:
            self.attention.split_tokens = split_size(max_model_len, block_size)
            if d.device.type == "cuda":  # every kernel writes what it returns: no NaN fill of torch.empty
                torch.utils.deterministic.fill_uninitialized_memory = False
        if custom_all_reduce and d.tp_size > 1 and d.device.type == "cuda" and not d.tp_group_in_one_node:
            log.info("custom all-reduce off: the tensor-parallel group spans nodes (symmetric memory works only "
                     "inside one); NCCL reduces")
        elif custom_all_reduce and d.tp_size > 1 and d.device.type == "cuda" and not deterministic:
            from ptp.parallel.comm import setup_custom_all_reduce
            largest = max(max_step_tokens, cuda_graph_max_bs) * config.hidden_size * torch.finfo(dtype).bits // 8
            setup_custom_all_reduce(d.tp_mesh.get_group(), d.device, d.rank, d.cpu_group,
                                    min(64 << 20, largest), p2p_check)
        self.profiler = None
        if os.environ.get("PTP_KERNEL_PROFILE") and d.device.type == "cuda":
            from ptp.profiling import StepProfiler
            self.profiler = StepProfiler.from_spec(os.environ["PTP_KERNEL_PROFILE"], d.rank)
        self.run_layer = None
        if (cuda_graphs or compile_decode or compile_prefill) and not getattr(self.attention, "compiled_steps", True):
            log.info("the %s attention backend runs every step eagerly (no compiled steps, no CUDA graphs)",
                     self.attention.name)
            cuda_graphs = compile_decode = compile_prefill = False
        if compile_prefill:
            self.compile_prefill()
        self.decode = None
        if compile_decode or cuda_graphs:
            self.decode = DecodeGraphs(self, compile_decode, cuda_graphs, cuda_graph_max_bs, compile_tuned)
        self.prefill = None
        # with CUDA graphs; on CPU (no graphs) with the compiled step too, where the tests check the padding
        # not in deterministic mode (a prompt's rows attend through its real block table there), nor with
        # pipeline stages (its graphs take token ids: no hidden-state inputs for later stages)
        if ((cuda_graphs or (compile_decode and d.device.type == "cpu")) and config.sliding_window is None
                and not deterministic and d.pp_size == 1):
            self.prefill = PrefillGraphs(self, cuda_graphs, min(max_step_tokens, max_model_len))

    def compile_prefill(self) -> None:
        """Run the steps that do not replay a decode graph (prefill, mixed) through one decoder layer
        compiled with dynamic shapes: dynamo reuses its code for every layer module (their parameters
        are inputs; the layer index is an argument), so each kind of step compiles once, not per layer."""
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        self.run_layer = torch.compile(_run_layer, dynamic=True)
        log.info("prefill and mixed steps run through one compiled decoder layer: each kind compiles on its first step")

    def _blocks_that_fit(self, per_block: int, max_model_len: int, block_size: int, fraction: float) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * fraction - (total - free)
            return max(0, int(budget // per_block) - 1)
        # CPU: room for up to 4 full-length sequences while they fit in CPU_KV_BYTES, and for one in any case
        # (the cache is allocated zero-filled at every start: 4 x 8k tokens of a 135M model took 1.4 GiB)
        sequence = -(-max_model_len // block_size)
        wanted = min(4 * sequence, max(sequence, CPU_KV_BYTES // per_block))
        return max(1, min(wanted, (2 << 30) // per_block))

    def _gather_all(self, value):
        if self.d.world_size == 1:
            return [value]
        out = [None] * dist.get_world_size(self.d.cpu_group)
        dist.all_gather_object(out, value, group=self.d.cpu_group)
        return out

    def release(self) -> None:
        """Drop the model, the KV cache and the graphs, so that their memory can be reused."""
        import gc

        self.decode = self.model = self.kv_cache = self.attention = None
        gc.unfreeze()  # the engine froze start-up's objects, these among them
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def set_last_tokens(self, tokens: torch.Tensor, broadcast: bool) -> None:
        """Rank 0: the tokens it drew for the step's sampled rows replace their argmax in last_tokens;
        with broadcast, every rank receives them (each calls receive_last_tokens)."""
        self.last_tokens[: tokens.shape[0]].copy_(tokens)
        if broadcast and self.d.tp_size > 1:  # only the first stage's ranks embed tokens
            broadcast_from_first(self.last_tokens[: tokens.shape[0]])

    def receive_last_tokens(self, rows: int) -> None:
        broadcast_from_first(self.last_tokens[:rows])

    @property
    def scratch_slot(self) -> int:
        return self.num_blocks * self.kv_cache.block_size

    def forward_logits(self, input_ids, positions, meta, logit_rows=None, run_layer=None, hidden=None,
                       sampled=None):
        """float32 logits of the chosen rows; the greedy tokens of the first `sampled` (all, if None)
        go to last_tokens. Input ids below 0 are taken from last_tokens (see there). A pipeline stage
        after the first starts from `hidden` (the previous stage's hidden state and residual); one
        before the last returns them."""
        last = self.last_tokens
        if hidden is None:
            input_ids = torch.where(input_ids < 0, last[(-1 - input_ids).clamp(min=0)], input_ids)
        hidden = self.model(input_ids, positions, Bound(self.attention, meta), run_layer, hidden)
        if not self.stage.last:
            return hidden
        if logit_rows is not None:
            hidden = hidden[logit_rows]
        logits = gather_vocab(self.model.logits(hidden), self.config.vocab_size).float()
        head = logits if sampled is None else logits[:sampled]
        last[: head.shape[0]].copy_(argmax_rows(head))
        return logits

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> torch.Tensor | None:
        """Run the batch; return float32 logits [sequences to sample, vocab] (same on every rank; under
        pipeline parallelism on the first stage's tensor-parallel rank 0 and the last stage's ranks)."""
        if self.link is None:
            return self._execute(batch)
        if self.pipelined:
            return self.collect(self.launch(batch))
        link, rows = self.link, sum(batch.sample)
        hidden = None if self.stage.first else self._receive_hidden(batch)
        out = self._execute(batch, hidden)
        if not self.stage.last:
            link.send_hidden(*out)
        elif rows:
            link.send_back(out, self.last_tokens[:rows])
            return out
        if self.stage.first and rows:
            return link.receive_back(rows, self.config.vocab_size, self.last_tokens)
        return None

    @torch.inference_mode()
    def launch(self, batch: StepBatch) -> PendingResult | None:
        """Micro-batched pipeline: run this stage's part of the step and pass it on, without waiting for
        the later stages. On the leader, the result's receipt is posted and returned (see `collect`)."""
        hidden = None if self.stage.first else self._receive_hidden(batch)
        out = self._execute(batch, hidden)
        if not self.stage.last:
            self.link.send_hidden(*out)
        else:
            self.link.send_result(out, self.device)
        if self.stage.first and self.d.tp_rank == 0:
            return self.link.post_result(sum(batch.sample), self.config.vocab_size, self.device)
        return None

    @staticmethod
    def collect(pending: PendingResult | None) -> torch.Tensor | None:
        """Wait for a launched step's result: the float32 logits of its sampled rows (None if none, or
        on a rank other than the leader)."""
        return None if pending is None else pending.wait()

    def _takes_decode(self, batch: StepBatch) -> bool:
        return self.decode is not None and batch.is_decode and len(batch.token_ids) <= self.decode.max_bs

    def _receive_hidden(self, batch: StepBatch):
        """The previous stage's (hidden, residual) for this step: into the decode graphs' inputs (padded
        to the batch bucket, as the sender's graph output is) or into new tensors."""
        if self._takes_decode(batch):
            bs = self.decode.bucket(len(batch.token_ids))
            x, residual = (h[:bs] for h in self.decode.hidden)
        else:
            shape = (sum(len(t) for t in batch.token_ids), self.config.hidden_size)
            x, residual = (torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2))
        self.link.receive_hidden(x, residual)
        return x, residual

    def _execute(self, batch: StepBatch, hidden=None):
        """This stage's part of the step (the whole step without pipeline parallelism)."""
        if self.profiler is not None and (batch.is_decode or self.profiler.every_kind):
            self.profiler.tick()
        if self._takes_decode(batch):
            return self.decode.run(batch)
        if self.prefill is not None and self.prefill.takes(batch):
            return self.prefill.run(batch)
        device, block_size = self.device, self.kv_cache.block_size
        ids, positions, slots, logit_rows, extra_rows, row = [], [], [], [], [], 0
        all_logits = batch.all_logits or [False] * len(batch.token_ids)
        for toks, start, table, sample, every in zip(batch.token_ids, batch.starts, batch.block_tables,
                                                     batch.sample, all_logits):
            ids.extend(toks)
            pos = np.arange(start, start + len(toks))  # numpy per row, not Python per token
            positions.append(pos)
            slots.append(np.asarray(table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size)
            if every:  # prompt logprobs: every row's logits, after the sampled rows
                extra_rows.extend(range(row, row + len(toks)))
            row += len(toks)
            if sample:
                logit_rows.append(row - 1)
        sampled = len(logit_rows)
        logit_rows += extra_rows
        as_tensor = lambda x: to_device(longs(x), device)  # noqa: E731
        pos_t, slot_t = (to_device(np.concatenate(x), device) for x in (positions, slots))
        input_ids = as_tensor(ids)
        if self.deterministic:
            meta = rows_meta(batch.starts, [len(t) for t in batch.token_ids], batch.block_tables, slot_t, device)
        else:
            meta = step_meta(batch.starts, [len(t) for t in batch.token_ids], batch.block_tables, slot_t, block_size,
                             self.config.sliding_window, device)
        if not logit_rows and min(ids) < 0:
            raise AssertionError("a step that samples nothing cannot use the previous step's tokens")
        return self.forward_step(input_ids, pos_t, meta, as_tensor(logit_rows) if logit_rows else None, hidden,
                                 sampled=sampled if extra_rows else None)

    def forward_step(self, input_ids, positions, meta, logit_rows, hidden=None, sampled=None) -> torch.Tensor | None:
        """A step that does not replay a decode graph: through the compiled layer (run_layer) if there
        is one, else eagerly. Without logit rows (a prompt chunk that completes no sequence) nothing is
        sampled and None is returned."""
        run_layer = self.run_layer
        if run_layer is None:
            return self._forward(input_ids, positions, meta, logit_rows, None, hidden, sampled)
        mark_unbacked(meta)
        # no "duck sizing" of equal sizes: a 4096-token chunk must not tie the token count to the hidden size
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return self._forward(input_ids, positions, meta, logit_rows, run_layer, hidden, sampled)

    def _forward(self, input_ids, positions, meta, logit_rows, run_layer=None, hidden=None, sampled=None):
        if logit_rows is None and self.stage.last:
            self.model(input_ids, positions, Bound(self.attention, meta), run_layer, hidden)
            return None
        return self.forward_logits(input_ids, positions, meta, logit_rows, run_layer, hidden, sampled)


def split_size(max_model_len: int, block_size: int) -> int:
    """The deterministic mode's attention split, in context tokens: fixed for the engine's life (a
    token's result depends on it), at least 256, and large enough that the longest context has at
    most 64 splits (bounding the partial results a decode step keeps)."""
    return max(256, block_size, 1 << (max(1, -(-max_model_len // 64)) - 1).bit_length())


def check_deterministic(config: ModelConfig, attention_backend: str, device: torch.device) -> None:
    """Refuse what the deterministic mode cannot make batch-invariant, saying what to do instead."""
    if config.sliding_window is not None:
        raise ConfigError("--enable-deterministic-inference does not support sliding-window attention yet; "
                          "run this model without the flag.")
    if attention_backend not in ("auto", "triton", "torch"):
        raise ConfigError(f"--enable-deterministic-inference needs --attention-backend triton (CUDA) or torch "
                          f"(CPU), or auto; got {attention_backend!r}.")
    if device.type == "cuda" and attention_backend == "torch":
        raise ConfigError("--enable-deterministic-inference on CUDA needs the triton attention backend "
                          "(--attention-backend triton or auto).")


def _run_layer(layer, x, residual, positions, rotary, attn, index):
    return layer(x, residual, positions, rotary, attn, index)
