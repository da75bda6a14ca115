"""Starting, following and stopping the ranks of a replica (pp × tp of them).

Rank 0 runs the engine; the other ranks run `follow`: receive each step's batch, run their part
of it (the same forward, or their pipeline stage's), repeat until rank 0 sends None. Under
torchrun the ranks are torchrun's; otherwise each node's main process spawns that node's other
ranks and watches them (node n's main process is global rank n · ranks-per-node and, for n > 0,
only follows): a rank that dies surfaces as a RankFailedError naming it and its stage, and if the
main process is stuck in a collective with the dead rank, the watchdog ends the process with an
error after a grace period rather than hang.
"""
from __future__ import annotations

import contextlib
import faulthandler
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

from ptp.errors import PtpError, RankFailedError
from ptp.parallel.mesh import Dist, StepChannel, init_distributed, teardown_together

log = logging.getLogger("ptp")
HANG_GRACE_SECONDS = 20.0
LOCAL_START_SECONDS = 60.0


def build_runner(args, rank: int, init_method: str | None, before_join=None):
    """Join the group as `rank`, load this rank's shard, build its KV cache. Returns (Dist, runner, config, files)."""
    from ptp.hub import resolve_model
    from ptp.runner import ModelRunner

    cpus = os.cpu_count() or 1
    local_ranks = args.tp * args.pp_size * args.dp_size // args.nnodes
    if local_ranks > 1 and args.device != "cuda":
        torch.set_num_threads(max(1, cpus // local_ranks))
    if before_join is not None:
        before_join()
    d = init_distributed(args.tp, rank, args.device, init_method, args.dist_timeout, dp=args.dp_size, pp=args.pp_size,
                         nnodes=args.nnodes, flags=agreed_flags(args))
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
        pp_partition=args.layer_partition(),
        pipelined=args.micro_batches() > 1,
    )
    return d, runner, config, files


def agreed_flags(args) -> dict:
    """What every node must agree on (checked when the ranks meet), by flag name."""
    import ptp

    return {"--model": args.model, "--revision": args.revision, "--tp": args.tp, "--pp-size": args.pp_size,
            "--pp-layer-partition": args.pp_layer_partition,
            "--pp-micro-batches": args.micro_batches(), "--dp-size": args.dp_size, "--nnodes": args.nnodes,
            "--dtype": args.dtype, "--load-format": args.load_format, "--max-model-len": args.max_model_len,
            "ptp version": ptp.__version__}


def resolve_dtype(name: str, config, files, device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if files is not None and files.gguf_file is not None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.dtype.replace("torch.", ""), torch.float32)
    return dtype


def follow(d: Dist, runner, before_exit=None, progress: "Progress | None" = None) -> None:
    """The loop of the ranks other than rank 0. When rank 0 says stop, the process ends here with
    status 0 (after `before_exit()`, given: a node's main process waits for the ranks it spawned).

    First every rank releases its memory and destroys the process group together with rank 0
    (parallel/mesh.teardown_together); then the process ends with os._exit, skipping interpreter
    teardown (gloo's and NCCL's destructors, run alone, have aborted or hung processes).
    """
    channel = StepChannel(d)
    mark = progress.mark if progress is not None else (lambda phase, step=None: None)
    step = 0
    while True:
        mark(WAITING, step)
        batch = channel.receive()
        if batch is None:
            break
        step += 1
        mark(RUNNING, step)
        runner.execute(batch)
        # rank 0 drew this step's tokens on the device: they feed the next step on the first stage's ranks
        if batch.share_tokens and runner.stage.first and d.tp_size > 1:
            mark(TOKENS, step)
            runner.receive_last_tokens(sum(batch.sample))
    mark(TEARDOWN, step)
    try:  # rank 0 tears down at the same time (Engine.shutdown)
        teardown_together(d, runner)
    except Exception as e:
        logging.getLogger("ptp").warning("rank %d: process-group teardown failed: %s", d.rank, e)
    if before_exit is not None:
        before_exit()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker_main(args, rank: int, init_method: str, errors, ready, parent_pid: int, progress: "Progress") -> None:
    exit_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # rank 0 stops the ranks; Ctrl-C reaches it too
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    faulthandler.register(STACK_SIGNAL, all_threads=True)  # the watchdog asks every rank for its stack
    progress.start_heartbeat()
    try:
        d, runner, _, _ = build_runner(args, rank, init_method, before_join=ready.set)
        follow(d, runner, progress=progress)
    except BaseException as e:  # report to rank 0, then die so its collectives fail fast
        # a PtpError is a message for people: its traceback through the libraries below would bury it
        errors.put((rank, f"{e.__class__.__name__}: {e}", "" if isinstance(e, PtpError) else traceback.format_exc()))
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


# What a rank is doing, as the watchdog reports it.
IDLE, WAITING, RUNNING, TOKENS, TEARDOWN = 0, 1, 2, 3, 4
PHASES = {
    IDLE: "idle (no step pending)",
    WAITING: "waiting for rank 0's next step (gloo broadcast of the step, StepChannel.receive)",
    RUNNING: "running the step's forward (its tensor-parallel collectives / pipeline sends included)",
    TOKENS: "receiving the step's sampled tokens from rank 0 (broadcast, receive_last_tokens)",
    TEARDOWN: "tearing down the process group with the other ranks",
}
STACK_SIGNAL = signal.SIGUSR1
HEARTBEAT_SECONDS = 0.5


class Progress:
    """One rank's progress in memory shared with the node's main process: step, phase, time of the last
    phase change and a heartbeat that a thread of the rank renews every HEARTBEAT_SECONDS.

    A rank blocked in a collective keeps beating (the collective releases the GIL); a stopped (SIGSTOP)
    or frozen process does not: that is how the watchdog tells the cause of a hang from its victims."""

    def __init__(self, ctx):
        self.values = ctx.Array("d", 4, lock=False)   # step, phase, since, heartbeat (time.monotonic)
        self.values[3] = time.monotonic()

    def mark(self, phase: int, step: int | None = None) -> None:
        if step is not None:
            self.values[0] = step
        self.values[1] = phase
        self.values[2] = time.monotonic()

    @contextlib.contextmanager
    def busy(self):
        """A step: running from here to its end, then idle."""
        self.mark(RUNNING, self.step + 1)
        try:
            yield
        finally:
            self.mark(IDLE)

    def start_heartbeat(self) -> None:
        def beat():
            while True:
                self.values[3] = time.monotonic()
                time.sleep(HEARTBEAT_SECONDS)
        threading.Thread(target=beat, daemon=True, name="ptp-heartbeat").start()

    @property
    def step(self) -> int:
        return int(self.values[0])

    @property
    def phase(self) -> int:
        return int(self.values[1])

    def since(self) -> float:
        """Seconds in the current phase."""
        return time.monotonic() - self.values[2]

    def silent(self) -> float:
        """Seconds since the last heartbeat."""
        return time.monotonic() - self.values[3]


def report_hang(rank: int, step: int, timeout: float, cause: str, lines: list[str], fate: str) -> str:
    """The watchdog's account of a step that made no progress (every rank's state in `lines`), written
    to the log with this rank's Python stack; returned as the replica's failure."""
    failure = (
        f"watchdog: step {step} of rank {rank} made no progress for {timeout:g} s (--watchdog-timeout): "
        f"{cause}.\n  rank {rank} (pid {os.getpid()}): step {step}, {PHASES[RUNNING]}\n" + "\n".join(lines) +
        f"\nEvery rank's Python stack follows in the log; the ranks are {fate} and this replica fails.")
    print(f"ptp: {failure}", file=sys.stderr, flush=True)
    print(f"ptp: Python stack of rank {rank} (pid {os.getpid()}):", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(all_threads=True)
    return failure


def process_state(pid: int) -> str:
    """The kernel's word for a process's state ('stopped', 'running', ...), from /proc where there is one."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            code = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "unknown"
    return {"R": "running", "S": "sleeping", "D": "in uninterruptible wait", "T": "stopped (SIGSTOP)",
            "t": "stopped by a tracer", "Z": "exited (zombie)"}.get(code, code)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpawnedRanks:
    """This node's ranks other than its main process, as child processes of it, and a watchdog over them.

    Node n (of --nnodes) holds global ranks n · per_node … (n + 1) · per_node − 1; its main process is
    the first of them (`base_rank`), and the rank with local index i uses the node's GPU i."""

    def __init__(self, args):
        host, port = (args.dist_init_addr or f"127.0.0.1:{free_port()}").rsplit(":", 1)
        self.init_method = f"tcp://{host}:{port}"
        self.tp, self.pp = args.tp, args.pp_size
        per_node = args.dp_size * args.pp_size * args.tp // args.nnodes
        self.base_rank = args.node_rank * per_node
        self.ranks = list(range(self.base_rank + 1, self.base_rank + per_node))
        ctx = mp.get_context("spawn")
        self.errors = ctx.Queue()
        self.ready = [ctx.Event() for _ in self.ranks]
        self.closing = False
        self.failure: str | None = None
        self.acknowledged = threading.Event()
        self.describing = threading.Lock()
        self.watchdog_timeout = args.watchdog_timeout
        self.progress = Progress(ctx)   # this process's (the leader's): busy while a step runs
        self.rank_progress = [Progress(ctx) for _ in self.ranks]
        self.procs = [
            ctx.Process(target=_worker_main, args=(args, r, self.init_method, self.errors, ready, os.getpid(), pr),
                        name=f"ptp-rank{r}", daemon=True)
            for r, ready, pr in zip(self.ranks, self.ready, self.rank_progress)
        ]
        for p in self.procs:
            p.start()
        faulthandler.register(STACK_SIGNAL, all_threads=True)  # `kill -USR1 <pid>` writes rank 0's stacks too
        # starting python and torch is local work, not joining: a short --dist-timeout does not cut it short
        self._wait_until_ready(max(args.dist_timeout, LOCAL_START_SECONDS))
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
                raise RankFailedError(f"this node's other ranks did not start within {timeout:.0f} s.")
            time.sleep(0.05)

    def busy(self):
        """Around each step of rank 0: while one runs, the watchdog expects progress."""
        return self.progress.busy()

    def _watch(self) -> None:
        while not self.closing:
            time.sleep(0.25)
            if (self.failure is None and self.progress.phase == RUNNING
                    and self.progress.since() > self.watchdog_timeout and not self.closing):
                self._hung()
            dead = [(r, p.exitcode) for r, p in zip(self.ranks, self.procs) if p.exitcode not in (None, 0)]
            if dead and not self.closing:
                self.failure = self.describe_failure()
                if not self.acknowledged.wait(HANG_GRACE_SECONDS) and not self.closing:
                    print(f"ptp: {self.failure}\nptp: rank 0 is stuck waiting for it; exiting.",
                          file=sys.stderr, flush=True)
                    os._exit(1)
                return

    def _hung(self) -> None:
        """Rank 0's step made no progress for --watchdog-timeout seconds: name the rank that stopped and
        what every rank was doing, have every rank write its Python stack to the log, and kill the ranks,
        so that rank 0's collective fails and the replica reports the failure instead of hanging."""
        lines, culprits = [], []
        for r, p, pr in zip(self.ranks, self.procs, self.rank_progress):
            state = process_state(p.pid)
            frozen = pr.silent() > max(3 * HEARTBEAT_SECONDS, min(5.0, self.watchdog_timeout / 2))
            if frozen or state.startswith("stopped"):
                culprits.append(r)
            lines.append(f"  {self.name(r)} (pid {p.pid}, {state}): step {pr.step}, {PHASES[pr.phase]} for "
                         f"{pr.since():.1f} s, last heartbeat {pr.silent():.1f} s ago")
        step = self.progress.step
        if culprits:
            who = ", ".join(self.name(r) for r in culprits)
            cause = f"{who} stopped making progress (its process is stopped or frozen)"
        else:
            behind = min(pr.step for pr in self.rank_progress)
            who = ", ".join(self.name(r) for r, pr in zip(self.ranks, self.rank_progress) if pr.step == behind)
            cause = f"no rank is frozen; the furthest behind: {who} (step {behind})"
        self.failure = report_hang(self.base_rank, step, self.watchdog_timeout, cause, lines, "killed")
        for r, p in zip(self.ranks, self.procs):
            try:  # a stopped rank writes its stack once continued; it is killed right after
                os.kill(p.pid, STACK_SIGNAL)
                os.kill(p.pid, signal.SIGCONT)
            except OSError:
                pass
        time.sleep(1.0)
        for r in culprits + [r for r in self.ranks if r not in culprits]:
            p = self.procs[self.ranks.index(r)]
            if p.exitcode is None:
                p.kill()
        for p in self.procs:
            p.join(5.0)

    def name(self, rank: int) -> str:
        """'rank r', with its pipeline stage under pipeline parallelism."""
        if self.pp == 1:
            return f"rank {rank}"
        return f"rank {rank} (pipeline stage {rank // self.tp % self.pp} of {self.pp}, tp rank {rank % self.tp})"

    def describe_failure(self) -> str:
        """The first cause: a rank that died without a word (killed), else the first error a rank reported
        (ranks that failed only because a peer died report too, after it). Made once: the watchdog and the
        main thread may both ask, and the reports can be read only once."""
        with self.describing:
            if self.failure is None:
                self.failure = self._describe_failure()
            return self.failure

    def _describe_failure(self) -> str:
        deadline = time.time() + 3.0
        while time.time() < deadline and all(p.exitcode is None for p in self.procs):
            time.sleep(0.05)
        reported = []
        while True:
            try:
                reported.append(self.errors.get(timeout=0.5 if not reported else 0.05))
            except Exception:
                break
        dead = [(r, p.exitcode) for r, p in zip(self.ranks, self.procs) if p.exitcode not in (None, 0)]
        silent = [(r, code) for r, code in dead if r not in {rank for rank, _, _ in reported}]
        if silent:
            return "; ".join(f"{self.name(r)} exited with code {code} (its own output above says why)"
                             for r, code in silent)
        if reported:
            rank, message, tb = reported[0]
            return f"{self.name(rank)} failed: {message}" + (f"\n--- traceback of rank {rank} ---\n{tb}" if tb else "")
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


class TorchrunWatchdog:
    """The progress watchdog for ranks that torchrun started (ptp cannot share memory with them or signal
    them as its own children): every rank publishes its step, phase and a heartbeat count in torchrun's
    TCP store (a thread renews it every HEARTBEAT_SECONDS); the replica's leader reads them. When the
    leader's step makes no progress for --watchdog-timeout seconds, it names the rank whose heartbeat
    stopped (a SIGSTOPped or frozen process) and what each rank was doing, writes its own stack, asks
    every rank of the replica to write its stack and exit (a key in the store), and kills the ranks
    on its own host that cannot (stopped ones): its collective then fails and the replica reports it.

    It offers what Engine uses of SpawnedRanks: failure, busy(), peer_failed(), raise_failure(), stop()."""

    def __init__(self, args, d: Dist):
        self.d, self.rank, self.watchdog_timeout = d, d.rank, args.watchdog_timeout
        self.ranks = [r for r in range(d.leader, d.leader + d.replica_size) if r != d.leader]
        self.procs: list = []
        self.failure: str | None = None
        self.closing = False
        self.progress = _LocalProgress()
        prefix = f"ptp/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.key = lambda rank: f"{prefix}/progress/{rank}"
        self.abort_key = f"{prefix}/abort/{d.dp_rank}"
        self.store = self._connect()
        self.host = socket.gethostname()
        self.beats = 0
        faulthandler.register(STACK_SIGNAL, all_threads=True)
        threading.Thread(target=self._beat, daemon=True, name="ptp-heartbeat").start()
        if d.is_leader:
            threading.Thread(target=self._watch, daemon=True, name="ptp-watchdog").start()

    @staticmethod
    def _connect():
        import datetime

        import torch.distributed as dist
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=30), wait_for_workers=False)

    def _beat(self) -> None:
        """This rank's heartbeat; a rank that is not the leader also obeys the leader's stop."""
        import json

        while not self.closing:
            self.beats += 1
            p = self.progress
            try:
                self.store.set(self.key(self.rank), json.dumps(
                    {"pid": os.getpid(), "host": self.host, "step": p.step, "phase": p.phase,
                     "since": round(p.since(), 1), "beats": self.beats}))
                if not self.d.is_leader and self.store.check([self.abort_key]):
                    print(f"ptp: rank {self.rank}: stopped by the watchdog of rank {self.d.leader} "
                          f"({self.store.get(self.abort_key).decode()}); Python stack of rank {self.rank} "
                          f"(pid {os.getpid()}):", file=sys.stderr, flush=True)
                    faulthandler.dump_traceback(all_threads=True)
                    os._exit(1)
            except Exception:  # the store is gone: torchrun is stopping (and exit_with_parent ends this rank)
                pass
            time.sleep(HEARTBEAT_SECONDS)

    def busy(self):
        return self.progress.busy()

    def _watch(self) -> None:
        self.watch_store = store = self._connect()  # a connection of its own: the heartbeat thread uses the other
        seen: dict[int, tuple[int, float]] = {}  # rank -> (heartbeat count, when that count was first seen)
        while not self.closing and self.failure is None:
            time.sleep(0.25)
            now = time.monotonic()
            records = self._read_with(store)
            for r, rec in records.items():
                if seen.get(r, (None,))[0] != rec["beats"]:
                    seen[r] = (rec["beats"], now)
            if self.progress.phase == RUNNING and self.progress.since() > self.watchdog_timeout:
                self._hung(records, {r: now - t for r, (_, t) in seen.items()})

    def _read_with(self, store) -> dict[int, dict]:
        import json

        out = {}
        for r in self.ranks:
            try:
                if store.check([self.key(r)]):
                    out[r] = json.loads(store.get(self.key(r)))
            except Exception:
                pass
        return out

    def _hung(self, records: dict[int, dict], silent: dict[int, float]) -> None:
        """As SpawnedRanks._hung, for torchrun's ranks: name the stopped rank, have every rank write its
        stack and exit, kill the stopped ones on this host."""
        lines, culprits = [], []
        limit = max(3 * HEARTBEAT_SECONDS, min(5.0, self.watchdog_timeout / 2))
        for r in self.ranks:
            rec = records.get(r)
            if rec is None:
                culprits.append(r)
                lines.append(f"  rank {r}: no heartbeat ever seen")
                continue
            local = rec["host"] == self.host
            state = process_state(rec["pid"]) if local else f"on {rec['host']}"
            quiet = silent.get(r, 0.0)
            if quiet > limit or state.startswith("stopped"):
                culprits.append(r)
            lines.append(f"  rank {r} (pid {rec['pid']}, {state}): step {rec['step']}, {PHASES[rec['phase']]} for "
                         f"{rec['since']:.1f} s, last heartbeat {quiet:.1f} s ago")
        step = self.progress.step
        if culprits:
            who = ", ".join(f"rank {r}" for r in culprits)
            cause = f"{who} stopped making progress (its process is stopped or frozen)"
        else:
            cause = "no rank is frozen (a collective or the network is stuck)"
        self.failure = report_hang(self.rank, step, self.watchdog_timeout, cause, lines, "stopped")
        try:
            self.watch_store.set(self.abort_key, f"step {step} made no progress")
        except Exception:
            pass
        local = [records[r]["pid"] for r in culprits if r in records and records[r]["host"] == self.host]
        for pid in local:  # a stopped rank cannot read the store: it writes its stack once continued, then dies
            try:
                os.kill(pid, STACK_SIGNAL)
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        time.sleep(1.0)
        for pid in local:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def peer_failed(self, wait: float = 3.0) -> bool:
        deadline = time.time() + wait
        while self.failure is None and time.time() < deadline:
            time.sleep(0.05)
        return self.failure is not None

    def raise_failure(self, cause: BaseException) -> None:
        raise RankFailedError(self.failure or "a peer rank stopped answering") from cause

    def stop(self, timeout: float = 0.0) -> None:
        self.closing = True


class _LocalProgress(Progress):
    """Progress kept in this process only (TorchrunWatchdog publishes it through the store)."""

    def __init__(self):
        self.values = [0.0, IDLE, time.monotonic(), time.monotonic()]
