"""The engine loop on a thread of its own, with asyncio queues towards the HTTP handlers.

HTTP handlers (event loop) → `submit`/`abort` → inbox (thread-safe) → engine thread: add/abort,
step, and hand each step's updates back to the handler's asyncio.Queue via call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from ptp.engine import Engine
from ptp.errors import RankFailedError
from ptp.metrics import EngineMetrics
from ptp.outputs import SeqUpdate
from ptp.sampling import SamplingParams

log = logging.getLogger("ptp")


class EngineDead(Exception):
    pass


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, n: int):
        self.loop, self.queue = loop, asyncio.Queue()
        self.arrival = time.perf_counter()
        self.last_token: dict[int, float] = {}
        self.open = n

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.metrics = EngineMetrics(engine)
        self.inbox: queue.Queue = queue.Queue()
        self.streams: dict[str, _Stream] = {}
        self.error: str | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="ptp-engine", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.error is None and self.thread.is_alive()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, asyncio.Queue]:
        """Queue a request (already checked with engine.check_prompt); its updates arrive on the queue."""
        if not self.alive:
            raise EngineDead(self.error or "the engine has stopped")
        request_id = self.engine.new_request_id()
        stream = _Stream(asyncio.get_running_loop(), params.n)
        self.streams[request_id] = stream
        self.inbox.put(("add", request_id, prompt_ids, params))
        return request_id, stream.queue

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id, None, None))

    def stop(self) -> None:
        self.stopping = True
        self.inbox.put(("stop", None, None, None))
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self.stopping:
                self._drain(block=not engine.has_unfinished())
                if engine.has_unfinished():
                    self._dispatch(engine.step())
        except RankFailedError as e:
            self.error = str(e)
            log.error("engine stopped: %s", e)
        except Exception as e:  # a bug: fail every request rather than hang them
            self.error = f"{e.__class__.__name__}: {e}"
            log.exception("engine loop failed")
        finally:
            for stream in self.streams.values():
                stream.put(EngineDead(self.error or "the server is shutting down"))

    def _drain(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, request_id, prompt_ids, params = item
            if kind == "add" and request_id in self.streams:
                self.engine.add_request(prompt_ids, params, request_id=request_id)
                self.metrics.prompt_tokens.inc(len(prompt_ids) * params.n)
            elif kind == "abort" and request_id in self.engine.requests:
                self.engine.abort(request_id)
                self.streams.pop(request_id, None)
                self.metrics.requests.inc(finish_reason="abort")
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, updates: list[SeqUpdate]) -> None:
        now = time.perf_counter()
        for u in updates:
            stream = self.streams.get(u.request_id)
            if stream is None:
                continue
            last = stream.last_token.get(u.index)
            if last is None:
                self.metrics.ttft.observe(now - stream.arrival)
            else:
                self.metrics.itl.observe(now - last)
            stream.last_token[u.index] = now
            self.metrics.generation_tokens.inc(len(u.token_ids))
            stream.put(u)
            if u.finish_reason is not None:
                stream.open -= 1
                if stream.open == 0:
                    self.metrics.requests.inc(finish_reason=u.finish_reason)
                    self.metrics.e2e.observe(now - stream.arrival)
                    self.engine.result(u.request_id)  # forget it
                    del self.streams[u.request_id]
                    stream.put(None)
