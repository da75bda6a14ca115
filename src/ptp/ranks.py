"""Starting, following and stopping the tensor-parallel ranks.

Rank 0 runs the engine; ranks 1..tp-1 run `follow`: receive each step's batch, run the same
forward, repeat until rank 0 sends None. Under torchrun the ranks are torchrun's; otherwise
rank 0 spawns the others and watches them: a rank that dies surfaces on rank 0 as a
RankFailedError naming it, and if rank 0 is stuck in a collective with the dead rank, the
watchdog ends the process with an error after a grace period rather than hang.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback

import torch

from ptp.errors import RankFailedError
from ptp.parallel.mesh import Dist, StepChannel, init_distributed, teardown_together

log = logging.getLogger("ptp")
HANG_GRACE_SECONDS = 20.0


def build_runner(args, rank: int, init_method: str | None, before_join=None):
    """Join the group as `rank`, load this rank's shard, build its KV cache. Returns (Dist, runner, config, files)."""
    from ptp.engine import resolve_model
    from ptp.runner import ModelRunner

    cpus = os.cpu_count() or 1
    if args.tp > 1 and args.device != "cuda":
        torch.set_num_threads(max(1, cpus // args.tp))
    if before_join is not None:
        before_join()
    d = init_distributed(args.tp, rank, args.device, init_method, args.dist_timeout, dp=args.dp_size, pp=args.pp_size)
    if args.enable_deterministic_inference:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    files, config, max_len = resolve_model(args, d.device)
    compile_decode = args.torch_compile in ("on", "tuned") or (args.torch_compile == "auto" and d.device.type == "cuda")
    runner = ModelRunner(
        config, files, dtype=resolve_dtype(args.dtype, config, files, d.device), d=d,
        load_format=args.load_format, max_model_len=max_len, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, mem_fraction_static=args.mem_fraction_static,
        attention_backend=args.attention_backend, seed=args.seed,
        compile_decode=compile_decode,
        compile_tuned=args.torch_compile == "tuned",
        cuda_graphs=d.device.type == "cuda" and not args.disable_cuda_graph,
        cuda_graph_max_bs=min(args.cuda_graph_max_bs, args.max_running_requests), max_seqs=args.max_running_requests,
        custom_all_reduce=not args.disable_custom_all_reduce, p2p_check=args.enable_p2p_check,
        max_step_tokens=args.chunked_prefill_size if args.chunked_prefill_size > 0 else 1 << 30,
        compile_prefill=args.torch_compile_prefill == "on" or (args.torch_compile_prefill == "auto" and compile_decode)
        or (args.enable_deterministic_inference and compile_decode),  # one compiler for every step's layers
        deterministic=args.enable_deterministic_inference,
    )
    return d, runner, config, files


def resolve_dtype(name: str, config, files, device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if files is not None and files.gguf_file is not None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.dtype.replace("torch.", ""), torch.float32)
    return dtype


def follow(d: Dist, runner) -> None:
    """The loop of ranks 1..tp-1. When rank 0 says stop, the process ends here with status 0.

    First every rank releases its memory and destroys the process group together with rank 0
    (parallel/mesh.teardown_together); then the process ends with os._exit, skipping interpreter
    teardown (gloo's and NCCL's destructors, run alone, have aborted or hung processes).
    """
    channel = StepChannel(d)
    while True:
        batch = channel.receive()
        if batch is None:
            break
        runner.execute(batch)
        if batch.share_tokens:  # rank 0 drew this step's tokens on the device: they feed the next step
            runner.receive_last_tokens(sum(batch.sample))
    try:  # rank 0 tears down at the same time (Engine.shutdown)
        teardown_together(d, runner)
    except Exception as e:
        logging.getLogger("ptp").warning("rank %d: process-group teardown failed: %s", d.rank, e)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker_main(args, rank: int, init_method: str, errors, ready, parent_pid: int) -> None:
    exit_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # rank 0 stops the ranks; Ctrl-C reaches it too
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        d, runner, _, _ = build_runner(args, rank, init_method, before_join=ready.set)
        follow(d, runner)
    except BaseException as e:  # report to rank 0, then die so its collectives fail fast
        errors.put((rank, f"{e.__class__.__name__}: {e}", traceback.format_exc()))
        time.sleep(0.2)
        os._exit(1)


def exit_with_parent(parent_pid: int) -> None:
    """End this process when its parent dies, however it dies (SIGKILL too): the kernel's parent-death
    signal on Linux, and a watch on the parent's pid everywhere."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # it died before the signal was armed
        os._exit(1)
    threading.Thread(target=_exit_if_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_if_orphaned(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpawnedRanks:
    """Ranks 1..tp-1 as child processes of this one, and a watchdog over them."""

    def __init__(self, args):
        host, port = (args.dist_init_addr or f"127.0.0.1:{free_port()}").rsplit(":", 1)
        self.init_method = f"tcp://{host}:{port}"
        ctx = mp.get_context("spawn")
        self.errors = ctx.Queue()
        self.ready = [ctx.Event() for _ in range(1, args.tp)]
        self.closing = False
        self.failure: str | None = None
        self.acknowledged = threading.Event()
        self.procs = [
            ctx.Process(target=_worker_main, args=(args, r, self.init_method, self.errors, self.ready[r - 1], os.getpid()),
                        name=f"ptp-rank{r}", daemon=True)
            for r in range(1, args.tp)
        ]
        for p in self.procs:
            p.start()
        self._wait_until_ready(args.dist_timeout)
        threading.Thread(target=self._watch, daemon=True, name="ptp-watchdog").start()

    def _wait_until_ready(self, timeout: float) -> None:
        """Wait until every rank is about to join the group; a rank that dies first is reported."""
        deadline = time.time() + timeout
        while not all(e.is_set() for e in self.ready):
            if any(p.exitcode is not None for p in self.procs):
                self.stop(timeout=1.0)
                raise RankFailedError(self.describe_failure())
            if time.time() > deadline:
                self.stop(timeout=1.0)
                raise RankFailedError(f"the other ranks did not start within {timeout:.0f} s (--dist-timeout).")
            time.sleep(0.05)

    def _watch(self) -> None:
        while not self.closing:
            time.sleep(0.25)
            dead = [(r, p.exitcode) for r, p in enumerate(self.procs, 1) if p.exitcode not in (None, 0)]
            if dead and not self.closing:
                self.failure = self.describe_failure()
                if not self.acknowledged.wait(HANG_GRACE_SECONDS) and not self.closing:
                    print(f"ptp: {self.failure}\nptp: rank 0 is stuck waiting for it; exiting.",
                          file=sys.stderr, flush=True)
                    os._exit(1)
                return

    def describe_failure(self) -> str:
        deadline = time.time() + 3.0
        while time.time() < deadline and all(p.exitcode is None for p in self.procs):
            time.sleep(0.05)
        reported = []
        while True:
            try:
                reported.append(self.errors.get(timeout=0.5 if not reported else 0.05))
            except Exception:
                break
        if reported:
            rank, message, tb = reported[0]
            return f"rank {rank} failed: {message}\n--- traceback of rank {rank} ---\n{tb}"
        dead = [(r, p.exitcode) for r, p in enumerate(self.procs, 1) if p.exitcode not in (None, 0)]
        if dead:
            return "; ".join(f"rank {r} exited with code {code} (its own output above says why)" for r, code in dead)
        return "a peer rank stopped answering"

    def peer_failed(self, wait: float = 3.0) -> bool:
        """Whether a spawned rank died (waiting up to `wait` s for the death that caused an error)."""
        deadline = time.time() + wait
        while True:
            if self.failure is not None or any(p.exitcode not in (None, 0) for p in self.procs):
                return True
            if time.time() > deadline:
                return False
            time.sleep(0.05)

    def raise_failure(self, cause: BaseException) -> None:
        """Called by rank 0 when a collective failed: raise a RankFailedError naming the rank."""
        message = self.failure or self.describe_failure()
        self.acknowledged.set()
        raise RankFailedError(message) from cause

    def stop(self, timeout: float = 10.0) -> None:
        self.closing = True
        for p in self.procs:
            p.join(timeout)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
