"""The one all-reduce of ptp, and the gather of vocabulary-parallel logits.

Row-parallel layers leave each rank a partial sum; `all_reduce` completes it. It is a custom op
(`ptp::all_reduce`) so torch.compile traces it as one node and CUDA graphs capture it. On CUDA it
picks, by message size, torch symmetric memory (one-shot or two-shot, over NVLink peer-to-peer,
never multicast) or NCCL; the size thresholds come from a measurement at start-up, cached per GPU
model, world size and torch version. gloo on CPU.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("ptp")
SIZES = [1 << k for k in range(10, 27, 2)]  # 1 KiB .. 64 MiB
_state = {"group": None, "size": 1, "symm": None, "fixed_order": False}


def set_tp_group(group: dist.ProcessGroup | None) -> None:
    _state["group"] = group
    _state["size"] = 1 if group is None else dist.get_world_size(group)
    _state["symm"] = None


class SymmetricAllReduce:
    """A symmetric-memory buffer shared by the ranks, and the size table that picks the method."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.world = dist.get_world_size(group)
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)
        self.max_bytes = max_bytes
        self.table: list[tuple[int, str]] = [(max_bytes, "two_shot")]  # (largest size, method), ascending

    def method(self, nbytes: int, dtype: torch.dtype) -> str:
        if dtype not in (torch.bfloat16, torch.float32):  # the symmetric-memory kernels' dtypes
            return "nccl"
        for limit, name in self.table:
            if nbytes <= limit:
                return name
        return "nccl"

    def run(self, x: torch.Tensor, method: str) -> torch.Tensor:
        flat = x.reshape(-1)
        buf = self.buffer[: flat.numel() * flat.element_size()].view(flat.dtype)
        if method == "one_shot":
            out = torch.ops.symm_mem.one_shot_all_reduce_copy(buf, flat, "sum", self.group_name)
        elif method == "two_shot":
            buf.copy_(flat)
            if self.world in (2, 4, 8):
                out = torch.ops.symm_mem.two_shot_all_reduce_out(buf, "sum", self.group_name, torch.empty_like(flat))
            else:
                out = torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", self.group_name).clone()
        else:
            out = flat.clone()
            dist.all_reduce(out, group=_state["group"])
        return out.view(x.shape)


def set_fixed_order(on: bool) -> None:
    """Deterministic mode: sum the ranks' partials in rank order (see `_sum_in_rank_order`)."""
    _state["fixed_order"] = bool(on)


def _sum_in_rank_order(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x gathered, then summed rank 0 first, rank 1 next, ...: each element is the same
    chain of additions whatever the message size (ring and two-shot all-reduces start each chunk's
    sum at another rank, and pick their algorithm by size), so repeated runs give the same bits."""
    group, size = _state["group"], _state["size"]
    flat = x.contiguous().reshape(-1)
    parts = [torch.empty_like(flat) for _ in range(size)]
    dist.all_gather(parts, flat, group=group)
    out = parts[0].clone()
    for part in parts[1:]:
        out += part
    return out.view(x.shape)


@torch.library.custom_op("ptp::all_reduce", mutates_args=())
def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _state["fixed_order"]:
        return _sum_in_rank_order(x)
    symm = _state["symm"]
    if symm is not None:
        return symm.run(x, symm.method(x.numel() * x.element_size(), x.dtype))
    out = x.contiguous().clone()
    dist.all_reduce(out, group=_state["group"])
    return out


@_all_reduce.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel ranks (identity on one rank)."""
    if _state["size"] == 1:
        return x
    return torch.ops.ptp.all_reduce(x)


def broadcast_from_first(x: torch.Tensor) -> None:
    """Overwrite x on every tensor-parallel rank with the first rank's x (in place)."""
    group = _state["group"]
    dist.broadcast(x, src=dist.get_global_rank(group, 0), group=group)


def gather_vocab(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Join each rank's vocabulary slice [N, V/tp] into [N, V] (slices may be uneven by one chunk)."""
    size = _state["size"]
    if size == 1:
        return local_logits
    chunk = -(-vocab_size // size)
    padded = torch.nn.functional.pad(local_logits, (0, chunk - local_logits.shape[1]))
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous(), group=_state["group"])
    return torch.cat(parts, dim=-1)[:, :vocab_size]


# --- set-up ----------------------------------------------------------------------------------------

def peer_access_problems(world: int, real_copy: bool) -> list[str]:
    """GPU pairs among the first `world` devices without peer access (with real_copy: a copy test too)."""
    bad = []
    for i in range(world):
        for j in range(world):
            if i == j:
                continue
            if not torch.cuda.can_device_access_peer(i, j):
                bad.append(f"GPU {i} -> GPU {j}: no peer access")
            elif real_copy:
                src = torch.arange(1 << 16, device=f"cuda:{i}", dtype=torch.float32)
                if not torch.equal(src.to(f"cuda:{j}").cpu(), src.cpu()):
                    bad.append(f"GPU {i} -> GPU {j}: peer copy gave wrong data")
    return bad


def setup_custom_all_reduce(group, device: torch.device, rank: int, cpu_group, max_bytes: int,
                            p2p_check: bool) -> SymmetricAllReduce | None:
    """Allocate the symmetric buffer and settle the size table (measured, or from the cache). The group's
    first rank decides and tells the others over the group itself (with dp or pp > 1, `cpu_group` spans
    several tensor-parallel groups)."""
    world = dist.get_world_size(group)
    first, rank = dist.get_global_rank(group, 0), dist.get_rank(group)
    problems = [None]
    if rank == 0:
        problems[0] = peer_access_problems(world, real_copy=p2p_check)
    dist.broadcast_object_list(problems, src=first, group=group)
    if problems[0]:
        log.warning("custom all-reduce off, NCCL only: %s", "; ".join(problems[0]))
        return None
    symm = SymmetricAllReduce(group, device, max_bytes)
    path = _cache_path(world)
    cached = [json.loads(path.read_text()) if rank == 0 and path.exists() else None]
    dist.broadcast_object_list(cached, src=first, group=group)
    if cached[0] is None:
        start = time.perf_counter()
        timings = measure(symm, group)
        table = table_from_timings(timings, max_bytes)
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"table": table, "timings_us": timings}, indent=1))
        log.info("all-reduce size table measured in %.1f s, cached in %s", time.perf_counter() - start, path)
    else:
        table = cached[0]["table"]
    symm.table = [tuple(row) for row in table]
    _state["symm"] = symm
    log.info("all-reduce methods by size: %s", ", ".join(f"<= {_fmt(s)}: {m}" for s, m in symm.table))
    return symm


def machine_cache_file(kind: str) -> Path:
    """Where measurements of this GPU model and torch version are kept: $PTP_CACHE_DIR or ~/.cache/ptp."""
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    root = Path(os.environ.get("PTP_CACHE_DIR", Path.home() / ".cache" / "ptp"))
    return root / f"{kind}-{gpu}-torch{torch.__version__.split('+')[0]}.json"


def load_machine_cache(kind: str) -> dict:
    """The measurements kept in machine_cache_file(kind); {} where there are none or they cannot be read."""
    path = machine_cache_file(kind)
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def save_machine_cache(kind: str, data: dict) -> None:
    """Keep data in machine_cache_file(kind); a cache that cannot be written is a warning, not an error."""
    path = machine_cache_file(kind)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)  # ranks of one machine may write at once: each write is whole
    except OSError as e:
        log.warning("could not cache the %s measurements in %s: %s", kind, path, e)


def _cache_path(world: int) -> Path:
    return machine_cache_file(f"allreduce-x{world}")


def _fmt(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


@torch.inference_mode()
def measure(symm: SymmetricAllReduce, group, iters: int = 50) -> dict[str, dict[str, float]]:
    """Microseconds per all-reduce of bf16 messages, per method and size, replayed in CUDA graphs.

    Every rank measures; the slowest rank's time counts (all ranks then agree on the table)."""
    out: dict[str, dict[str, float]] = {}
    for nbytes in [s for s in SIZES if s <= symm.max_bytes]:
        x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=symm.buffer.device)
        row = {}
        for method in ("nccl", "one_shot", "two_shot"):
            row[method] = time_in_graph(lambda: symm.run(x, method), iters)
        t = torch.tensor([row[m] for m in ("nccl", "one_shot", "two_shot")], device=x.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        out[str(nbytes)] = dict(zip(("nccl", "one_shot", "two_shot"), t.tolist()))
    return out


def time_in_graph(fn, iters: int) -> float:
    """Mean microseconds of fn() over `iters` calls captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def table_from_timings(timings: dict[str, dict[str, float]], max_bytes: int, tie: float = 0.1) -> list[list]:
    """Fastest method per measured size; each size range up to the next measured size uses it.

    Within `tie` (10%) of the fastest, the method already in use for smaller sizes (first: one-shot)
    is kept: start-up timings of a few microseconds are noisy, and a flip there gains nothing."""
    rows = []
    for nbytes in sorted(int(k) for k in timings):
        t = timings[str(nbytes)]
        fastest = min(t.values())
        keep = rows[-1][1] if rows else "one_shot"
        best = keep if t.get(keep, float("inf")) <= fastest * (1 + tie) else min(t, key=t.get)
        if rows and rows[-1][1] == best:
            rows[-1][0] = nbytes
        else:
            rows.append([nbytes, best])
    rows[-1][0] = max_bytes
    return rows
