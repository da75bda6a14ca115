"""The front end's view of the engine replicas: dispatch, results as text, load and failures.

`Replicas` owns the sockets towards every replica (see ptp.ipc), picks a replica for each request
(--load-balance-method), turns each step's token ids into text (ptp.detokenize) and hands every
sample's update to the request's sink. It runs in whichever process holds the tokenizer: the
server's front-end process, or the caller of `ptp.LLM(dp_size=N)`.

Threads: a reader thread receives the replicas' messages and passes them to `deliver` (the server
hops onto its event loop; `ptp.LLM` puts them on a queue); everything else — sending, state — runs
on that one consuming thread.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable

import zmq

from ptp import ipc
from ptp.detokenize import RequestText
from ptp.errors import PtpError, RankFailedError
from ptp.outputs import ModelLimits, SeqUpdate

log = logging.getLogger("ptp")
PREFIX_CHUNK = 16          # tokens per hashed piece of a prompt (prefix_aware dispatch)
PREFIX_CHUNKS = 256        # pieces looked at per prompt (the first 4,096 tokens)
PREFIX_MEMORY = 200_000    # pieces remembered per replica (least recently sent forgotten first)
PREFIX_SLACK = 8           # a replica may carry this many more requests than the least loaded one and still win


def prefix_keys(prompt_ids: list[int]) -> list[int]:
    """Chained hashes of the prompt's whole 16-token pieces: key i stands for tokens [0, 16·(i+1))."""
    keys, h = [], 0
    for i in range(min(len(prompt_ids) // PREFIX_CHUNK, PREFIX_CHUNKS)):
        h = hash((h, tuple(prompt_ids[i * PREFIX_CHUNK: (i + 1) * PREFIX_CHUNK])))
        keys.append(h)
    return keys


class ReplicaFailed(RankFailedError):
    """A replica stopped: one of its ranks died or hung, or it failed to start."""


@dataclasses.dataclass
class Tracked:
    replica: int
    text: RequestText
    sink: Callable  # sink(SeqUpdate) for each update; sink(Exception) if it cannot finish
    arrival: float
    last_token: dict[int, float] = dataclasses.field(default_factory=dict)


class Replicas:
    def __init__(self, args, tokenizer, spawn: bool = True, warm: bool = False, metrics=None,
                 addresses: tuple[str, str] | None = None):
        self.n = args.dp_size
        self.method = args.load_balance_method
        self.tokenizer, self.metrics = tokenizer, metrics
        self.addresses = addresses or ipc.new_addresses()
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.bind(self.addresses[0])
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.bind(self.addresses[1])
        self.procs = None
        if spawn:
            from ptp.replica import ReplicaProcesses
            self.procs = ReplicaProcesses(args, self.addresses, warm)
        self.loads = [ipc.Load() for _ in range(self.n)]
        self.sent_since_load = [0] * self.n
        self.served = [0] * self.n  # requests each replica was given
        self.pids: list[list[int]] = [[] for _ in range(self.n)]
        self.requests: dict[str, Tracked] = {}
        self.error: str | None = None
        self.limits: ModelLimits | None = None
        self.stopped: set[int] = set()
        self.failed: set[int] = set()  # replicas that said they failed: they will not say Stopped
        self._rr = itertools.cycle(range(self.n))
        # prefix_aware: which prompt prefixes each replica was sent (its prefix cache probably holds them)
        self.sent_prefixes = [collections.OrderedDict() for _ in range(self.n)]
        self._reader: threading.Thread | None = None
        self._closing = False

    # --- start-up ------------------------------------------------------------------------------
    def wait_ready(self, timeout: float) -> ModelLimits:
        """Block until every replica says it is ready; raise ReplicaFailed naming the one that is not."""
        ready: dict[int, ipc.Ready] = {}
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.pull, zmq.POLLIN)
        deadline = time.time() + timeout
        while len(ready) < self.n:
            events = dict(poller.poll(200))
            if self.router in events:
                _, payload = self.router.recv_multipart()
                msg = ipc.decode_from_replica(payload)
                if isinstance(msg, ipc.Ready):
                    ready[msg.replica] = msg
            if self.pull in events:
                msg = ipc.decode_from_replica(self.pull.recv())
                if isinstance(msg, ipc.Failed):
                    self.close()
                    raise ReplicaFailed(f"replica {msg.replica} failed to start: {msg.message}")
            dead = self.procs.dead() if self.procs else []
            if dead and not self.pull.poll(500):
                r, code = dead[0]
                self.close()
                raise ReplicaFailed(f"replica {r} exited with code {code} while starting (its output above says why).")
            if time.time() > deadline:
                missing = sorted(set(range(self.n)) - set(ready))
                self.close()
                raise ReplicaFailed(f"replicas {missing} were not ready within {timeout:.0f} s (--dist-timeout).")
        first = ready[0]
        self.limits = ModelLimits(first.vocab_size, first.max_model_len,
                                  min(r.kv_capacity_tokens for r in ready.values()))
        self.pids = [ready[r].pids for r in range(self.n)]
        return self.limits

    def start_reader(self, deliver: Callable[[object], None]) -> None:
        """Receive the replicas' messages on a thread of their own; `deliver(msg)` each to the consumer."""
        def read():
            while not self._closing:
                try:
                    if self.pull.poll(200):
                        msg = ipc.decode_from_replica(self.pull.recv())
                        if isinstance(msg, ipc.Stopped):
                            self.stopped.add(msg.replica)
                        elif isinstance(msg, ipc.Failed):
                            self.failed.add(msg.replica)
                        deliver(msg)
                        continue
                except (zmq.ZMQError, RuntimeError):  # closed, or the consumer's loop is gone
                    return
                for r, code in (self.procs.dead() if self.procs else []):
                    if r not in self.stopped:
                        deliver(ipc.Failed(r, f"its process exited with code {code}"))
                        return
        self._reader = threading.Thread(target=read, name="ptp-replica-reader", daemon=True)
        self._reader.start()

    # --- requests (on the consuming thread) ----------------------------------------------------
    def pick(self, prompt_ids: list[int]) -> int:
        """round_robin; shortest_queue (fewest running + waiting, from the replicas' load reports plus
        what was sent since); prefix_aware (the replica that was sent the longest prefix of this prompt,
        unless it carries more than PREFIX_SLACK requests beyond the least loaded one; else as
        shortest_queue), approximating where each replica's prefix cache holds the prompt."""
        if self.method == "round_robin" or self.n == 1:
            r = next(self._rr)
        else:
            scores = [lo.running + lo.waiting + sent for lo, sent in zip(self.loads, self.sent_since_load)]
            r = min(range(self.n), key=lambda i: (scores[i], self.served[i]))
            if self.method == "prefix_aware":
                keys = prefix_keys(prompt_ids)
                best = max(range(self.n), key=lambda i: (self._matched(i, keys), -scores[i]))
                if self._matched(best, keys) and scores[best] <= scores[r] + PREFIX_SLACK:
                    r = best
        if self.method == "prefix_aware":
            memory = self.sent_prefixes[r]
            for key in prefix_keys(prompt_ids):
                memory[key] = None
                memory.move_to_end(key)
            while len(memory) > PREFIX_MEMORY:
                memory.popitem(last=False)
        return r

    def _matched(self, replica: int, keys: list[int]) -> int:
        memory, n = self.sent_prefixes[replica], 0
        for key in keys:
            if key not in memory:
                break
            n += 1
        return n

    def submit(self, request_id: str, prompt: str | None, prompt_ids: list[int], params, sink: Callable) -> None:
        if self.error is not None:
            raise ReplicaFailed(self.error)
        r = self.pick(prompt_ids)
        self.requests[request_id] = Tracked(r, RequestText(self.tokenizer, prompt, prompt_ids, params), sink,
                                            time.perf_counter())
        self.sent_since_load[r] += 1
        self.served[r] += 1
        self._send(r, ipc.Add(request_id, prompt_ids, params))
        if self.metrics is not None:
            self.metrics.prompt_tokens.labels(str(r)).inc(len(prompt_ids) * params.n)

    def abort(self, request_id: str) -> None:
        t = self.requests.pop(request_id, None)
        if t is not None and self.error is None:
            self._send(t.replica, ipc.Abort(request_id))
            if self.metrics is not None:
                self.metrics.finished(t.replica, "abort", time.perf_counter() - t.arrival)

    def _send(self, replica: int, msg) -> None:
        try:
            self.router.send_multipart([f"replica-{replica}".encode(), ipc.encode(msg)])
        except zmq.ZMQError as e:
            raise ReplicaFailed(f"replica {replica} cannot be reached: {e}") from None

    def handle(self, msg) -> None:
        """Apply one message from a replica (on the consuming thread)."""
        if isinstance(msg, ipc.Outputs):
            self.loads[msg.replica] = msg.load
            self.sent_since_load[msg.replica] = 0
            if self.metrics is not None:
                self.metrics.load(msg.replica, msg.load)
            now = time.perf_counter()
            for u in msg.updates:
                self._update(u, now)
            for request_id, why in msg.rejected:
                t = self.requests.pop(request_id, None)
                if t is not None:
                    t.sink(PtpError(why))
        elif isinstance(msg, ipc.Failed):
            self.fail(f"replica {msg.replica}: {msg.message}")
        elif isinstance(msg, ipc.Stopped):
            self.stopped.add(msg.replica)

    def _update(self, u: SeqUpdate, now: float) -> None:
        t = self.requests.get(u.request_id)
        if t is None:
            return  # aborted meanwhile
        engine_finished = u.finish_reason is not None
        u = t.text.update(u)
        if not u.token_ids and u.finish_reason is None:
            return
        if u.finish_reason is not None and not engine_finished:  # a stop string: the engine still runs it
            self._send(t.replica, ipc.Abort(u.request_id, u.index))
        m = self.metrics
        if m is not None and u.token_ids:
            last = t.last_token.get(u.index)
            if last is None:
                m.ttft.observe(now - t.arrival)
            else:
                m.itl.observe(now - last)
            t.last_token[u.index] = now
            m.generation_tokens.labels(str(t.replica)).inc(len(u.token_ids))
        t.sink(u)
        if t.text.finished:
            del self.requests[u.request_id]
            if m is not None:
                reasons = [s.finish_reason for s in t.text.samples]
                m.finished(t.replica, reasons[0], now - t.arrival)
            t.sink(None)

    def abort_all(self) -> int:
        """End every open request now (a shutdown whose --graceful-timeout has passed): each unfinished
        sample gets a last update with finish_reason "abort", so that its client receives a complete
        answer; the replicas are told to drop them. Returns how many requests were open."""
        now, open_ = time.perf_counter(), list(self.requests.items())
        for request_id, t in open_:
            if self.error is None:
                self._send(t.replica, ipc.Abort(request_id))
            for i, s in enumerate(t.text.samples):
                if s.finish_reason is None and request_id in self.requests:
                    self._update(SeqUpdate(request_id, i, "", [], None, "abort"), now)
        return len(open_)

    def fail(self, message: str) -> None:
        """A replica is gone: every open request fails with `message`; new ones are refused."""
        if self.error is None:
            self.error = message
            log.error("engine stopped: %s", message)
        for t in self.requests.values():
            t.sink(ReplicaFailed(message))
        self.requests.clear()

    # --- shutdown ------------------------------------------------------------------------------
    def stop(self, timeout: float = 30.0) -> list[tuple[int, int | None]]:
        """Tell every replica to stop and wait for them; returns (replica, exit code) of spawned ones."""
        for r in range(self.n):
            try:
                self._send(r, ipc.Stop())
            except ReplicaFailed:
                pass
        codes = []
        if self.procs is not None:
            codes = self.procs.stop(timeout)
        else:  # torchrun's replicas: wait for their word
            deadline = time.time() + timeout
            while len(self.stopped | self.failed) < self.n and time.time() < deadline:
                if self._reader is None and self.pull.poll(200):
                    msg = ipc.decode_from_replica(self.pull.recv())
                    if isinstance(msg, ipc.Stopped):
                        self.stopped.add(msg.replica)
                    elif isinstance(msg, ipc.Failed):
                        self.failed.add(msg.replica)
                else:
                    time.sleep(0.05)
        self.close()
        return codes

    def close(self) -> None:
        self._closing = True
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(1.0)
        if self.procs is not None and not self.procs.closing:
            self.procs.stop(timeout=2.0)
        self.router.close()
        self.pull.close()
        self.ctx.term()

