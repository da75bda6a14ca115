"""An engine replica: one scheduler with its ranks, fed by the front end over ZeroMQ.

    front end ──Add/Abort/Stop──► replica r (leader: Engine; followers: its other ranks)
              ◄──Outputs (one per step: new tokens of every sample, load)──

`run_replica` is the leader's loop. It never tokenizes, detokenizes or touches HTTP: requests
arrive as token ids, results leave as token ids. `ReplicaProcesses` starts --dp-size replicas as
processes of their own (replica r on GPUs r·tp … r·tp+tp−1), each starting its own follower
ranks; under torchrun the replicas are torchrun's processes instead.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback

import zmq

from ptp import ipc
from ptp.errors import ConfigError, PtpError, RankFailedError

log = logging.getLogger("ptp")
SLOW_STEP_SECONDS = 0.25  # a step longer than this is logged at debug level


def load_of(engine) -> ipc.Load:
    s = engine.scheduler
    a = s.allocator
    return ipc.Load(len(s.running), len(s.waiting), a.num_blocks - a.num_free, a.num_blocks, s.num_preemptions,
                    engine.num_finished, s.prefix_query_tokens, s.prefix_hit_tokens)


class ReplicaSockets:
    """The replica's two sockets: a DEALER it receives on, a PUSH it sends on."""

    def __init__(self, index: int, addresses: tuple[str, str]):
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.DEALER)
        self.inbox.setsockopt(zmq.IDENTITY, f"replica-{index}".encode())
        self.inbox.setsockopt(zmq.LINGER, 0)
        self.inbox.connect(addresses[0])
        self.outbox = self.ctx.socket(zmq.PUSH)
        self.outbox.setsockopt(zmq.LINGER, 2000)
        self.outbox.connect(addresses[1])

    def send(self, msg) -> None:
        self.outbox.send(ipc.encode(msg))

    def close(self) -> None:
        self.inbox.close()
        self.outbox.close()
        self.ctx.term()


def warm_up(engine) -> None:
    """Short generations through every rank, so that the replica says it is ready only when a request
    can run: one prompt alone, then two at once (a batched prefill step's attention takes another
    kernel, whose first call initialises cuDNN, else paid by the first burst of users), then a
    one-token prompt beside a longer one: a step that mixes single-token rows with prompt chunks,
    which the compiled prefill layer compiles apart (seconds, else paid by the first request whose
    prompt is cached but for its last token)."""
    from ptp.sampling import SamplingParams

    params = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0)
    for prompts in ([[0, 1, 2]], [[0, 1, 2], [3, 4, 5, 6]], [[7], [8, 9, 10, 11]]):
        for p in prompts:
            engine.add_request(p, params)
        while engine.has_unfinished():
            engine.step()


def run_replica(engine, index: int, sockets: ReplicaSockets, pids: list[int]) -> int:
    """The leader's loop: take requests, step, send each step's tokens. Returns the exit status."""
    # Ready goes over the DEALER: the front end's ROUTER learns this replica's address from it
    sockets.inbox.send(ipc.encode(ipc.Ready(index, engine.config.vocab_size, engine.max_model_len,
                                            engine.kv_capacity_tokens, pids)))
    inbox, last_load = sockets.inbox, None
    try:
        while True:
            rejected, stop = [], False
            timeout = 0 if engine.has_unfinished() else 100
            while inbox.poll(timeout):
                timeout = 0
                msg = ipc.decode_to_replica(inbox.recv())
                if isinstance(msg, ipc.Add):
                    try:
                        engine.add_request(msg.prompt_ids, msg.params, request_id=msg.request_id)
                    except ConfigError as e:  # the front end checks first; a mismatch still gets an answer
                        rejected.append((msg.request_id, str(e)))
                elif isinstance(msg, ipc.Abort):
                    engine.abort(msg.request_id, msg.index)
                else:
                    stop = True
                    break
            if stop:
                break
            spawned = engine.spawned
            if spawned is not None and spawned.failure is not None:  # a rank died while this replica idled
                spawned.raise_failure(RuntimeError("a follower rank exited"))
            updates = []
            if engine.has_unfinished():
                t = time.perf_counter()
                updates = engine.step()
                t = time.perf_counter() - t
                if t > SLOW_STEP_SECONDS:  # one-off work (a first compile or kernel set-up) shows here
                    log.debug("replica %d: a step took %.2f s (%d running, %d waiting)", index, t,
                              len(engine.scheduler.running), len(engine.scheduler.waiting))
            load = load_of(engine)
            if updates or rejected or load != last_load:
                sockets.send(ipc.Outputs(index, updates, load, rejected))
                last_load = load
    except RankFailedError as e:
        sockets.send(ipc.Failed(index, str(e)))
        return 1
    except Exception as e:  # a bug: say what, and stop rather than hang the requests
        log.exception("replica %d failed", index)
        sockets.send(ipc.Failed(index, f"{e.__class__.__name__}: {e}"))
        return 1
    engine.shutdown()
    sockets.send(ipc.Stopped(index))
    return 0


# --- replicas as processes of their own --------------------------------------------------------------

def _replica_main(args, index: int, addresses, parent_pid: int, warm: bool, slice_gpus: bool) -> None:
    from ptp.log import setup_logging
    from ptp.ranks import exit_with_parent

    exit_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the front end stops the replicas
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging()
    if slice_gpus and args.device != "cpu":  # replica r owns GPUs r·tp … r·tp+tp−1 (its ranks count from 0 there)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else None
        per = args.tp * args.pp_size
        chosen = range(index * per, (index + 1) * per)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i] if gpus else str(i) for i in chosen
                                                      if gpus is None or i < len(gpus))
    sockets = ReplicaSockets(index, addresses)
    status = 1
    try:
        from ptp.engine import Engine

        engine = Engine(args)
        if warm:
            warm_up(engine)
        pids = [os.getpid()] + ([p.pid for p in engine.spawned.procs] if engine.spawned else [])
        status = run_replica(engine, index, sockets, pids)
    except BaseException as e:
        detail = str(e) if isinstance(e, PtpError) else f"{e.__class__.__name__}: {e}\n{traceback.format_exc()}"
        sockets.send(ipc.Failed(index, detail))
    finally:
        sockets.close()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def distinct_free_ports(n: int) -> list[int]:
    """n free local ports, all different (each held until the last is chosen)."""
    import socket

    held = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


class ReplicaProcesses:
    """--dp-size replicas as child processes, each with its own ranks; watches that they live."""

    def __init__(self, args, addresses, warm: bool):
        """Each replica forms its own process group: at --dist-init-addr's port + r, or at a port chosen here
        (all distinct: chosen while the others are still held)."""
        if mp.current_process().name.startswith("ptp-"):
            raise ConfigError(
                f"ptp ran again inside its own {mp.current_process().name}: starting a replica re-imports your "
                "script, and the script builds the LLM at import time. Build it under `if __name__ == \"__main__\":`."
            )
        if args.dist_init_addr:
            host, port = args.dist_init_addr.rsplit(":", 1)
            meeting = [f"{host}:{int(port) + r}" for r in range(args.dp_size)]
        else:
            meeting = [f"127.0.0.1:{port}" for port in distinct_free_ports(args.dp_size)] if args.dp_size > 1 else [None]
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_replica_main, args=(dataclasses.replace(args, dp_size=1, dist_init_addr=addr),
                                                              r, addresses, os.getpid(), warm, args.dp_size > 1),
                                  name=f"ptp-replica{r}", daemon=False)
                      for r, addr in enumerate(meeting)]
        for p in self.procs:
            p.start()
        self.closing = False

    def dead(self) -> list[tuple[int, int]]:
        """(replica, exit code) of replicas that exited while they were meant to run."""
        if self.closing:
            return []
        return [(r, p.exitcode) for r, p in enumerate(self.procs) if p.exitcode is not None]

    def stop(self, timeout: float = 30.0) -> list[tuple[int, int | None]]:
        """Wait for the replicas (told to stop) to exit; kill what is left. Returns (replica, exit code)."""
        self.closing = True
        deadline = time.time() + timeout
        for p in self.procs:
            p.join(max(0.1, deadline - time.time()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(2.0)
        return [(r, p.exitcode) for r, p in enumerate(self.procs)]

