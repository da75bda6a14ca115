"""The CUDA graphs of the two kinds of step that are bound by the host launching kernels.

`DecodeGraphs`: the decode step (one token per sequence), compiled once with a dynamic batch size
and captured per batch-size bucket (1, 2, 4, then every 8), the batch padded to the next bucket.
`PrefillGraphs`: the prefill of one whole prompt from position 0, captured per length bucket
(16, 32, ..., 512 tokens), the prompt padded at its end. Both run without graphs on CPU (or with
--disable-cuda-graphs), through the same padded inputs.
"""
from __future__ import annotations

import logging
import time

import torch

from ptp.attention import DecodeMeta
from ptp.attention.meta import PrefillMeta
from ptp.kernels import pdl_enabled
from ptp.kv_cache import slot, table_rows
from ptp.step import StepBatch

log = logging.getLogger("ptp")


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

    def __init__(self, runner, compile_: bool, graphs: bool, max_bs: int, tuned: bool = False):
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
        # Every graph writes its float32 logits here (the last stage). A graph's own output would stay
        # allocated for its life: at 8-row buckets up to 512 rows, 8.5 GB of 8B-shape logits that the
        # KV cache could hold instead (34 GB up to 1,024). Steps read their logits before the next replay.
        self.logits = torch.empty(max_bs, runner.config.vocab_size, dtype=torch.float32, device=device) \
            if runner.stage.last else None
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
            log.info("%scapturing the decode step's CUDA graphs for %d batch sizes up to %d",
                     "compiling and " if compile_ else "", len(self.buckets), max_bs)
            self._capture()
        elif compile_:
            log.info("the decode step compiles on its first step")

    def _step(self, ids, pos, slots, tables, lens, *hidden):
        out = self.runner.forward_logits(ids, pos, DecodeMeta(slots, tables, lens), hidden=hidden or None)
        if self.logits is None:
            return out
        logits = self.logits[: ids.shape[0]]
        logits.copy_(out)
        return logits

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
        if self.copied is not None:
            # The pinned staging buffers are copied asynchronously; a rank that never waits for its GPU
            # (ranks > 0) must not overwrite them before the previous step's copies have run.
            self.copied.synchronize()
        vec, v = self.host_vec, self.host_vec.numpy()  # numpy writes: far less host time than torch.tensor of lists
        v[0, :n] = [t[0] for t in batch.token_ids]
        v[1, :n] = starts
        v[2, :n] = slots
        v[3, :n] = v[1, :n] + 1
        v[:, n:bs] = 0
        v[2, n:bs] = self.runner.scratch_slot
        width = max(len(t) for t in batch.block_tables)
        self.host_tables.numpy()[:n, :width] = table_rows(batch.block_tables, width)
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

    def __init__(self, runner, graphs: bool, largest: int):
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
            log.info("capturing the prefill's CUDA graphs for %d prompt lengths up to %d tokens", len(self.buckets),
                     self.buckets[-1])
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
        host, h = self.host, self.host.numpy()
        h[0, :n] = toks
        h[0, n:bucket] = 0
        h[1, :n] = [slot(table, p, block_size) for p in range(n)]
        h[1, n:bucket] = self.runner.scratch_slot
        h[0, -1] = n - 1
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
