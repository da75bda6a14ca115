"""One per rank: the sharded model, its KV cache and attention backend; runs one step's batch.

Steps where every sequence brings one token (decode) go through `DecodeGraphs`: the forward is
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

import dataclasses
import itertools
import logging
import os
import time

import torch
import torch.distributed as dist

from ptp import ops
from ptp.attention import Bound, DecodeMeta, make_backend, rows_meta, step_meta
from ptp.attention.meta import PrefillMeta, mark_unbacked
from ptp.config import ModelConfig
from ptp.errors import ConfigError
from ptp.hub import ModelFiles
from ptp.kernels import pdl_enabled
from ptp.kv_cache import KVCache, slot
from ptp.loader import load_model
from ptp.parallel.comm import broadcast_from_first, gather_vocab, set_fixed_order
from ptp.parallel.mesh import Dist
from ptp.parallel.p2p import Stage, StageLink, stage_layers
from ptp.parallel.plans import kv_heads_per_model
from ptp.sampling import argmax_rows
from ptp.step import StepBatch

log = logging.getLogger("ptp")


class ModelRunner:
    def __init__(self, config: ModelConfig, files: ModelFiles | None, *, dtype: torch.dtype, d: Dist,
                 load_format: str, max_model_len: int, block_size: int, num_kv_blocks: int | None,
                 mem_fraction_static: float, attention_backend: str, seed: int,
                 compile_decode: bool = False, compile_tuned: bool = False, cuda_graphs: bool = False,
                 cuda_graph_max_bs: int = 160, max_seqs: int = 256,
                 custom_all_reduce: bool = True, p2p_check: bool = False, max_step_tokens: int = 8192,
                 compile_prefill: bool = False, deterministic: bool = False, pp_partition: list[int] | None = None):
        self.config, self.d, self.device, self.dtype = config, d, d.device, dtype
        self.max_model_len = max_model_len
        self.deterministic = deterministic
        if deterministic:
            check_deterministic(config, attention_backend, d.device)
        ops.set_deterministic(deterministic)
        set_fixed_order(deterministic)
        self.stage = Stage(d.pp_rank, d.pp_size, stage_layers(config.num_layers, d.pp_size, pp_partition)[d.pp_rank])
        self.link = StageLink(d.rank, d.tp_rank, d.tp_size, self.stage) if d.pp_size > 1 else None
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
            self.profiler = StepProfiler(int(os.environ["PTP_KERNEL_PROFILE"]), d.rank)
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

    def _blocks_that_fit(self, per_block: int, max_model_len: int, block_size: int, fraction: float) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * fraction - (total - free)
            return max(0, int(budget // per_block) - 1)
        wanted = 4 * -(-max_model_len // block_size)
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
        if self.profiler is not None and batch.is_decode:
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
            pos = range(start, start + len(toks))
            positions.extend(pos)
            slots.extend(slot(table, p, block_size) for p in pos)
            if every:  # prompt logprobs: every row's logits, after the sampled rows
                extra_rows.extend(range(row, row + len(toks)))
            row += len(toks)
            if sample:
                logit_rows.append(row - 1)
        sampled = len(logit_rows)
        logit_rows += extra_rows
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long).to(device, non_blocking=True)  # noqa: E731
        input_ids, pos_t, slot_t = as_tensor(ids), as_tensor(positions), as_tensor(slots)
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


def capture_graph(step, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """step() run twice on a side stream (compiling it, if it is compiled, and warming it up), then
    captured into a CUDA graph in `pool`; returns the graph and the output tensor it refills."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out


def graph_buckets(max_bs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 8 up to max_bs (as SGLang does)."""
    sizes = [b for b in (1, 2, 4) if b < max_bs] + list(range(8, max_bs + 1, 8))
    return sorted(set(sizes + [max_bs]))


class DecodeGraphs:
    """The decode step, compiled once and replayed from a CUDA graph per batch-size bucket."""

    def __init__(self, runner: ModelRunner, compile_: bool, graphs: bool, max_bs: int, tuned: bool = False):
        self.runner, self.graphs_on = runner, graphs and runner.device.type == "cuda"
        device = runner.device
        self.max_bs = max_bs
        self.buckets = graph_buckets(max_bs)
        self.max_blocks = -(-runner.max_model_len // runner.kv_cache.block_size)
        self.ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.pos = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slots = torch.full((max_bs,), runner.scratch_slot, dtype=torch.long, device=device)
        self.tables = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=device)
        self.lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        # a pipeline stage after the first: the previous stage's hidden state and residual, received here
        self.hidden = () if runner.stage.first else tuple(
            torch.zeros(max_bs, runner.config.hidden_size, dtype=runner.dtype, device=device) for _ in range(2))
        # host staging: one pinned buffer for ids, positions, slots, lengths; one for block tables
        pin = device.type == "cuda"
        self.host_vec = torch.zeros(4, max_bs, dtype=torch.long, pin_memory=pin)
        self.host_tables = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, pin_memory=pin)
        self.copied = torch.cuda.Event() if pin else None
        self.step = self._step
        if compile_ and device.type == "cuda":
            # decided once, before tracing: the step reads this decision from a dict, which dynamo
            # guards on; filled during the first trace, it forced a second compile of the step
            pdl_enabled(device.index or 0)
        if compile_:
            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            # tuned: coordinate-descent tuning of the generated kernels, as gpt-fast does (measured
            # a few % faster batch-1 steps, for a much longer cold start)
            options = {"coordinate_descent_tuning": True} if tuned else None
            self.step = torch.compile(self._step, fullgraph=True, dynamic=None, options=options)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.graphs_on:
            self._capture()

    def _step(self, ids, pos, slots, tables, lens, *hidden):
        return self.runner.forward_logits(ids, pos, DecodeMeta(slots, tables, lens), hidden=hidden or None)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _inputs(self, bs: int):
        args = (self.ids[:bs], self.pos[:bs], self.slots[:bs], self.tables[:bs], self.lens[:bs],
                *(h[:bs] for h in self.hidden))
        if bs > 1:
            for a in args:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return args

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        start = time.perf_counter()
        for i, bs in enumerate(reversed(self.buckets)):
            args = self._inputs(bs)
            self.graphs[bs] = capture_graph(lambda: self.step(*args), pool)
            log.info("captured decode graph for batch %d (%d/%d, %.1f s)", bs, i + 1, len(self.buckets),
                     time.perf_counter() - start)
        torch.cuda.synchronize()

    def run(self, batch: StepBatch) -> torch.Tensor:
        n = len(batch.token_ids)
        bs = self.bucket(n)
        block_size = self.runner.kv_cache.block_size
        starts = batch.starts
        slots = [slot(table, p, block_size) for table, p in zip(batch.block_tables, starts)]
        pad = bs - n
        if self.copied is not None:
            # The pinned staging buffers are copied asynchronously; a rank that never waits for its GPU
            # (ranks > 0) must not overwrite them before the previous step's copies have run.
            self.copied.synchronize()
        vec = self.host_vec
        vec[:, :bs] = torch.tensor([[t[0] for t in batch.token_ids] + [0] * pad, starts + [0] * pad,
                                    slots + [self.runner.scratch_slot] * pad, [s + 1 for s in starts] + [0] * pad])
        width = max(len(t) for t in batch.block_tables)
        self.host_tables[:n, :width] = torch.tensor([t + [0] * (width - len(t)) for t in batch.block_tables],
                                                    dtype=torch.int32)
        self.ids[:bs].copy_(vec[0, :bs], non_blocking=True)
        self.pos[:bs].copy_(vec[1, :bs], non_blocking=True)
        self.slots[:bs].copy_(vec[2, :bs], non_blocking=True)
        self.lens[:bs].copy_(vec[3, :bs], non_blocking=True)
        self.tables[:n, :width].copy_(self.host_tables[:n, :width], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if self.graphs_on:
            graph, out = self.graphs[bs]
            graph.replay()
        else:
            out = self.step(*self._inputs(bs))
        # a stage before the last passes all bs rows on: the next stage's graph takes them as they are
        return out[:n] if self.runner.stage.last else out


def prefill_buckets(largest: int) -> list[int]:
    """Prompt lengths to capture: 16, 32, 48, 64, then a step of a quarter of the last power of two."""
    sizes, n = [], 16
    while n <= largest:
        sizes.append(n)
        n += max(16, 1 << (n.bit_length() - 3))
    return sizes


class PrefillGraphs:
    """The prefill step of one whole prompt (from position 0, up to 512 tokens), replayed from a CUDA
    graph per length bucket: such a step is bound by the host launching each layer's kernels (a
    short prompt: several times more host time than GPU time), and a graph launches
    them all at once. The prompt is padded at its end; causal attention keeps the padded rows out of
    the real ones, and their keys and values go to the scratch slot. On CPU (no graphs) the padded step
    runs as it is, which the tests use to check the padding."""

    def __init__(self, runner: ModelRunner, graphs: bool, largest: int):
        self.runner, self.graphs_on = runner, graphs and runner.device.type == "cuda"
        device = runner.device
        self.buckets = prefill_buckets(min(512, largest))
        n = self.buckets[-1] if self.buckets else 0
        with torch.inference_mode():  # as the general path's step inputs are: the same compiled layer serves both
            self.ids = torch.zeros(n, dtype=torch.long, device=device)
            self.pos = torch.arange(n, dtype=torch.long, device=device)
            self.slots = torch.full((n,), runner.scratch_slot, dtype=torch.long, device=device)
            self.row = torch.zeros(1, dtype=torch.long, device=device)  # the last real token: the row to sample
        self.host = torch.zeros(2, n + 1, dtype=torch.long, pin_memory=device.type == "cuda")
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if self.graphs_on and self.buckets:
            self._capture()

    def takes_length(self, n: int) -> bool:
        return bool(self.buckets) and 1 < n <= self.buckets[-1]

    def takes(self, batch: StepBatch) -> bool:
        toks = batch.token_ids
        return (len(toks) == 1 and batch.starts[0] == 0 and batch.sample[0] and self.takes_length(len(toks[0]))
                and min(toks[0]) >= 0 and not batch.wants_all_logits())

    def _meta(self, n: int) -> PrefillMeta:
        """The metadata of a whole prompt of n tokens, built as any step's is (the same compiled layer
        serves both). Its block table points at the scratch block: captured, the metadata is fixed,
        and the causal path reads only the slots, which each run refills. (Built outside a capture:
        it copies from the host.)"""
        block_size = self.runner.kv_cache.block_size
        scratch = [self.runner.scratch_slot // block_size] * -(-n // block_size)
        meta = PrefillMeta.build([0], [n], [scratch], self.slots[:n], block_size, None, self.runner.device)
        assert meta.causal
        return meta

    def _step(self, n: int, meta: PrefillMeta) -> torch.Tensor:
        return self.runner.forward_step(self.ids[:n], self.pos[:n], meta, self.row)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        start = time.perf_counter()
        for n in reversed(self.buckets):
            meta = self._meta(n)
            self.graphs[n] = capture_graph(lambda: self._step(n, meta), pool)
        torch.cuda.synchronize()  # the warm-up and capture wrote keys and values only to the scratch slot
        log.info("captured prefill graphs for prompts of up to %d tokens (%d lengths, %.1f s)", self.buckets[-1],
                 len(self.buckets), time.perf_counter() - start)

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> torch.Tensor:
        toks, table = batch.token_ids[0], batch.block_tables[0]
        n, block_size = len(toks), self.runner.kv_cache.block_size
        bucket = next(b for b in self.buckets if b >= n)
        if self.copied is not None:
            self.copied.synchronize()  # the pinned buffer's previous copy has run (ranks > 0 never wait)
        host = self.host
        host[0, :n] = torch.tensor(toks)
        host[0, n:bucket] = 0
        host[1, :n] = torch.tensor([slot(table, p, block_size) for p in range(n)])
        host[1, n:bucket] = self.runner.scratch_slot
        host[0, -1] = n - 1
        self.ids[:bucket].copy_(host[0, :bucket], non_blocking=True)
        self.slots[:bucket].copy_(host[1, :bucket], non_blocking=True)
        self.row.copy_(host[0, -1:], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if self.graphs_on:
            graph, out = self.graphs[bucket]
            graph.replay()
            return out
        return self._step(bucket, self._meta(bucket))
