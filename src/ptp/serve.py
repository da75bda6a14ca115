"""`python -m ptp.serve`: an OpenAI-compatible server (Litestar on uvicorn).

    python -m ptp.serve --model Qwen/Qwen2.5-0.5B-Instruct --tp 2 --port 30000
    python -m ptp.serve --model ./ckpt --tp 2 --dp-size 2          # two replicas of two ranks each
    torchrun --nproc-per-node 4 -m ptp.serve --model ./ckpt --tp 2 --dp-size 2

Processes: this one is the front end (HTTP, tokenizing, chat templates, detokenizing, SSE); each
data-parallel replica runs in processes of its own (its leader schedules; its other ranks follow)
and talks to the front end over ZeroMQ (ptp.ipc). Under torchrun the replicas are torchrun's
processes and global rank 0 starts the front end as a child process.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import msgspec
import logging
import multiprocessing as mp
import os
import re
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.response import Stream

from ptp.args import SERVER_FLAGS, EngineArgs
from ptp.errors import ConfigError, PtpError
from ptp.log import setup_logging
from ptp.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("ptp")
_json = msgspec.json.Encoder().encode
MAX_BODY_BYTES = 8 << 20
# A prefill step of at most this many prompt tokens still replays a captured CUDA graph (see
# graphs.PrefillGraphs), so a running stream waits for one short step at a time.
SERVE_PREFILL_TOKENS_WHILE_DECODING = 512


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ptp.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(parser.add_argument_group("server"))
    EngineArgs.add_cli_args(parser.add_argument_group("engine"))
    return parser.parse_args(argv)


def add_server_args(group) -> None:
    for name, kwargs in SERVER_FLAGS:
        group.add_argument(name, **kwargs)


# --- OpenAI formatting --------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def unavailable(why) -> ApiError:
    return ApiError(503, f"the engine is not running: {why}", kind="service_unavailable")


SHUTTING_DOWN = ApiError(503, "the server is shutting down and takes no new requests; retry on another server or "
                              "after it restarts.", kind="service_unavailable")


class ClientGone(Exception):
    """The client closed its connection before a non-streaming answer was ready."""


def top_entries(entry: dict[int, float], n: int) -> list[tuple[int, float]]:
    """The n most likely tokens of an entry (the sampler's entry holds the chosen token and the top n)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:n]


class Formatter:
    """OpenAI response bodies: token text, logprobs, usage, server-sent events."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id]) if self.tok is not None else f"<{token_id}>"

    def completion_logprobs(self, entries, token_ids, top: int, offset0: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = offset0
        for token, entry in zip(token_ids, entries or []):
            text = self.token_text(token)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            if entry is None:  # the prompt's first token (echo): nothing before it to predict it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(entry[token])
            tops = {}
            for t, lp in top_entries(entry, top):
                key = self.token_text(t)  # two tokens with the same text (partial bytes) keep both entries
                tops["token_id:%d" % t if key in tops else key] = lp
            out["top_logprobs"].append(tops)
        return out

    def echo_text(self, prompt: str | None, prompt_ids: list[int]) -> str:
        """The prompt as echoed: its own text, or its token ids decoded."""
        if prompt is not None:
            return prompt
        return self.tok.decode(prompt_ids) if self.tok is not None else "".join(f"<{t}>" for t in prompt_ids)

    def chat_logprobs(self, entries, token_ids, top: int) -> dict:
        content = []
        for token, entry in zip(token_ids, entries or []):
            text = self.token_text(token)
            content.append({
                "token": text, "logprob": entry[token], "bytes": list(text.encode()),
                "top_logprobs": [{"token": self.token_text(t), "logprob": lp,
                                  "bytes": list(self.token_text(t).encode())} for t, lp in top_entries(entry, top)],
            })
        return {"content": content}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached}}

    @staticmethod
    def sse(obj) -> bytes:
        return b"data: " + _json(obj) + b"\n\n"


# --- the front end ------------------------------------------------------------------------------------

class FrontEnd:
    """What the handlers share: the tokenizer, the replicas, the limits a request must fit."""

    def __init__(self, replicas, tokenizer, model_name: str, metrics):
        self.replicas, self.tok, self.model_name, self.metrics = replicas, tokenizer, model_name, metrics
        self.fmt = Formatter(tokenizer)
        self.limits = replicas.limits
        self.started = time.time()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False  # shutting down: requests in flight finish, new ones get 503
        self.in_flight = 0     # requests submitted to the replicas and not yet finished or aborted

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take the replicas' messages on this event loop from now on."""
        self.loop = loop
        self.replicas.start_reader(lambda msg: loop.call_soon_threadsafe(self.replicas.handle, msg))

    @property
    def error(self) -> str | None:
        return self.replicas.error

    def check_common(self, req) -> None:
        if req.model != self.model_name:
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")
        bad = req.unsupported()
        if bad:
            raise ApiError(400, bad[1], param=bad[0])
        if self.error is not None:
            raise unavailable(self.error)
        if self.draining:
            raise SHUTTING_DOWN

    def sampling(self, req, max_tokens, logprobs, prompts: list[list[int]]):
        try:
            params = req.sampling_params(max_tokens, logprobs)
            for ids in prompts:
                self.limits.check(ids, params)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        return params

    async def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tok is None:
                raise ApiError(400, "this model was loaded without a tokenizer: send prompts as token ids.",
                               param="prompt")
            return await asyncio.to_thread(self.tok.encode, prompt)  # off the event loop: prompts can be long
        return list(prompt)

    async def run(self, prompts: list[tuple[str | None, list[int]]], params):
        """Yield (prompt index, SeqUpdate) for every step of every prompt; abort what is open on exit."""
        queue: asyncio.Queue = asyncio.Queue()
        ids = []
        from ptp.frontend import ReplicaFailed
        if self.draining:  # it began shutting down while this request was being tokenized
            raise SHUTTING_DOWN
        try:
            for i, (text, prompt_ids) in enumerate(prompts):
                rid = uuid.uuid4().hex
                self.replicas.submit(rid, text, prompt_ids, params, lambda item, i=i: queue.put_nowait((i, item)))
                ids.append(rid)
        except ReplicaFailed as e:
            for rid in ids:
                self.replicas.abort(rid)
            raise unavailable(e) from None
        open_, finished = len(prompts), set()
        self.in_flight += 1
        try:
            while open_:
                i, item = await queue.get()
                if item is None:
                    open_ -= 1
                    finished.add(i)
                elif isinstance(item, ReplicaFailed):
                    raise ApiError(503, f"the engine stopped: {item}", kind="service_unavailable")
                elif isinstance(item, Exception):
                    raise ApiError(400, str(item))
                else:
                    yield i, item
        finally:
            self.in_flight -= 1
            for i, rid in enumerate(ids):
                if i not in finished:
                    self.replicas.abort(rid)


def _front(request) -> FrontEnd:
    return request.app.state.frontend


def _collect(updates, n: int):
    """Gather a non-streaming request's updates per choice."""
    choices = {}
    for i, u in updates:
        c = choices.setdefault(i * n + u.index, {"text": "", "ids": [], "lps": [], "finish": None, "cached": 0,
                                                 "prompt_lps": None})
        if u.prompt_logprobs is not None and c["prompt_lps"] is None:
            c["prompt_lps"] = u.prompt_logprobs
        c["cached"] = max(c["cached"], u.num_cached_tokens)
        c["text"] += u.text
        c["ids"] += u.token_ids
        c["lps"] += u.logprobs or []
        c["finish"] = u.finish_reason
    return choices


# --- handlers ------------------------------------------------------------------------------------------

@post("/v1/completions", status_code=200)
async def completions(request: Request, data: CompletionRequest) -> Response:
    fe = _front(request)
    fe.check_common(data)
    try:
        texts = data.prompts()
    except ValueError as e:
        raise ApiError(400, str(e), param="prompt") from None
    prompts = [(t if isinstance(t, str) else None, await fe.encode(t)) for t in texts]
    top = data.logprobs
    params = fe.sampling(data, data.max_tokens, top, [ids for _, ids in prompts])
    echo = data.echo
    if echo and top is not None:  # the prompt's own logprobs, as lm-evaluation-harness scores choices
        params = dataclasses.replace(params, prompt_logprobs=top)
    rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params.n
    prompt_tokens = sum(len(ids) for _, ids in prompts) * n
    base = {"id": rid, "object": "text_completion", "created": created, "model": fe.model_name}
    fmt = fe.fmt

    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        updates = fe.run(prompts, params)
        first = await _first(updates)  # errors before the first token are answered with a status

        async def events():
            generated, offsets, cached = 0, {}, {}
            async for i, u in _chain(first, updates):
                index = i * n + u.index
                generated += len(u.token_ids)
                cached[index] = max(cached.get(index, 0), u.num_cached_tokens)
                text, ids, entries = u.text, u.token_ids, u.logprobs
                if echo and index not in offsets:  # the first chunk of a choice starts with its prompt
                    p_text, p_ids = prompts[i]
                    text = fmt.echo_text(p_text, p_ids) + text
                    ids = p_ids + ids
                    entries = (u.prompt_logprobs or []) + (entries or []) if top is not None else None
                lp = None
                if top is not None:
                    lp = fmt.completion_logprobs(entries, ids, top, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + len(text)
                yield fmt.sse({**base, "choices": [{"index": index, "text": text, "logprobs": lp,
                                                     "finish_reason": u.finish_reason}]})
            if include_usage:
                yield fmt.sse({**base, "choices": [], "usage": fmt.usage(prompt_tokens, generated,
                                                                            sum(cached.values()))})
            yield b"data: [DONE]\n\n"

        return Stream(_until_error(events(), fmt), media_type="text/event-stream")

    choices = _collect(await _unless_client_leaves(request, fe.run(prompts, params)), n)
    out = []
    for k, c in sorted(choices.items()):
        text, ids, entries = c["text"], c["ids"], c["lps"]
        if echo:
            p_text, p_ids = prompts[k // n]
            text, ids, entries = fmt.echo_text(p_text, p_ids) + text, p_ids + ids, (c["prompt_lps"] or []) + entries
        out.append({"index": k, "text": text, "finish_reason": c["finish"],
                    "logprobs": fmt.completion_logprobs(entries, ids, top, 0) if top is not None else None})
    generated = sum(len(c["ids"]) for c in choices.values())
    cached = sum(c["cached"] for c in choices.values())
    return Response({**base, "choices": out, "usage": fmt.usage(prompt_tokens, generated, cached)})

@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request, data: ChatCompletionRequest) -> Response:
    fe = _front(request)
    fe.check_common(data)
    tok = fe.tok
    if tok is None or not getattr(tok, "chat_template", None):
        raise ApiError(400, "this model has no chat template; use /v1/completions.")
    messages = [m.as_template_input() for m in data.messages]
    from ptp.tool_parsers import ToolPlan, ToolStream, parser_for
    try:
        plan = ToolPlan(data.tool_dicts(), data.tool_choice_json(), data.parallel_tool_calls is not False,
                        parser_for(tok.chat_template, None, getattr(fe, "tool_call_parser", None)))
    except (ValueError, ConfigError) as e:
        raise ApiError(400, str(e), param="tool_choice") from None
    extra = {"tools": data.tool_dicts()} if data.tools else {}

    def render():
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=data.add_generation_prompt,
                                       **extra)
        return tok.encode(text, add_special_tokens=False)
    try:
        prompt = await asyncio.to_thread(render)
    except Exception as e:
        raise ApiError(400, f"the chat template rejected these messages: {e}", param="messages") from None
    top = (data.top_logprobs or 0) if data.logprobs else None
    params = fe.sampling(data, data.max_completion_tokens or data.max_tokens, top, [prompt])
    if plan.grammar is not None:  # tool_choice "required" or a named function: the calls' JSON, enforced
        params = dataclasses.replace(params, grammar=plan.grammar)
    rid, created, n = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), params.n
    base = {"id": rid, "created": created, "model": fe.model_name}
    fmt = fe.fmt

    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        updates = fe.run([(None, prompt)], params)
        first = await _first(updates)

        async def events():
            chunk = {**base, "object": "chat.completion.chunk"}
            for i in range(n):
                yield fmt.sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]})
            generated, cached = 0, {}
            calls = {i: ToolStream(plan) for i in range(n)} if plan.active else None
            async for _, u in _chain(first, updates):
                generated += len(u.token_ids)
                cached[u.index] = max(cached.get(u.index, 0), u.num_cached_tokens)
                lp = fmt.chat_logprobs(u.logprobs, u.token_ids, top) if top is not None else None
                finish = u.finish_reason
                if calls is not None:  # content, or tool calls' names and arguments as they are written
                    deltas = calls[u.index].feed(u.text)
                else:
                    deltas = [{"content": u.text}] if u.text else []
                if lp and not deltas:
                    deltas = [{"content": ""}]
                for j, delta in enumerate(deltas):
                    yield fmt.sse({**chunk, "choices": [{"index": u.index, "delta": delta,
                                                          "logprobs": lp if j == 0 else None, "finish_reason": None}]})
                if finish:
                    if calls is not None:
                        for delta in calls[u.index].finish():
                            yield fmt.sse({**chunk, "choices": [{"index": u.index, "delta": delta,
                                                                  "logprobs": None, "finish_reason": None}]})
                        finish = calls[u.index].finish_reason(finish)
                    yield fmt.sse({**chunk, "choices": [{"index": u.index, "delta": {}, "logprobs": None,
                                                          "finish_reason": finish}]})
            if include_usage:
                yield fmt.sse({**chunk, "choices": [], "usage": fmt.usage(len(prompt) * n, generated,
                                                                           sum(cached.values()))})
            yield b"data: [DONE]\n\n"

        return Stream(_until_error(events(), fmt), media_type="text/event-stream")

    choices = _collect(await _unless_client_leaves(request, fe.run([(None, prompt)], params)), n)
    out = []
    for k, c in sorted(choices.items()):
        message, finish = {"role": "assistant", "content": c["text"]}, c["finish"]
        if plan.active:
            parsed = plan.parse(c["text"])
            if parsed.tool_calls:
                message = {"role": "assistant", "content": parsed.content,
                           "tool_calls": [call.openai() for call in parsed.tool_calls]}
                finish = "tool_calls"
        out.append({"index": k, "message": message, "finish_reason": finish,
                    "logprobs": fmt.chat_logprobs(c["lps"], c["ids"], top) if top is not None else None})
    generated = sum(len(c["ids"]) for c in choices.values())
    return Response({**base, "object": "chat.completion", "choices": out,
                     "usage": fmt.usage(len(prompt) * n, generated, sum(c["cached"] for c in choices.values()))})

@get("/v1/models")
async def models(request: Request) -> dict:
    fe = _front(request)
    return {"object": "list", "data": [{
        "id": fe.model_name, "object": "model", "created": int(fe.started), "owned_by": "ptp",
        "max_model_len": fe.limits.max_model_len,
    }]}

@get("/health")
async def health(request: Request) -> Response:
    fe = _front(request)
    if fe.error is None and fe.draining:  # load balancers: send new requests elsewhere
        return Response({"status": "draining"}, status_code=503)
    if fe.error is None:
        return Response({"status": "ok"}, status_code=200)
    return Response({"status": "error", "error": fe.error}, status_code=503)

@get("/metrics", media_type=MediaType.TEXT)
async def metrics(request: Request) -> Response:
    from ptp.metrics import CONTENT_TYPE
    return Response(_front(request).metrics.render(), media_type=CONTENT_TYPE)


@get(["/openapi.json", "/schema/openapi.json"], include_in_schema=False)
async def openapi(request: Request) -> Response:
    fe = _front(request)
    if getattr(fe, "openapi", None) is None:
        from ptp import __version__
        from ptp.openapi import openapi_document

        fe.openapi = openapi_document(fe.model_name, fe.limits.vocab_size, __version__)
    return Response(fe.openapi, media_type=MediaType.JSON)


HANDLERS = [completions, chat_completions, models, health, metrics, openapi]


async def _first(updates):
    """The first update of a stream, awaited before the response starts (so errors get a status)."""
    try:
        return await updates.__anext__()
    except StopAsyncIteration:
        return None


async def _unless_client_leaves(request: Request, updates) -> list:
    """Every update of a non-streaming request; if its client disconnects first, the request is aborted
    at once (run's cleanup) and ClientGone is raised: nobody is left to answer."""
    async def collect():
        return [x async for x in updates]

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":  # the body was read: only this can come
            pass

    work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await gone
    try:
        return await work
    except asyncio.CancelledError:
        if not gone.cancelled() and gone.done():  # the client left (not this handler being cancelled)
            await updates.aclose()
            raise ClientGone() from None
        raise


async def _chain(first, rest):
    try:
        if first is not None:
            yield first
            async for x in rest:
                yield x
    finally:
        await rest.aclose()  # a client that left: its requests are aborted now


async def _until_error(events, fmt: Formatter):
    """A stream that fails after it started ends with an error event and [DONE], not a cut connection."""
    try:
        async for e in events:
            yield e
    except ApiError as err:
        yield fmt.sse(err.body())
        yield b"data: [DONE]\n\n"


def build_app(frontend: FrontEnd) -> Litestar:
    def error_response(err: ApiError) -> Response:
        return Response(err.body(), status_code=err.status, media_type=MediaType.JSON)

    def on_validation(_: Request, exc: ValidationException) -> Response:
        extra = [e for e in (exc.extra if isinstance(exc.extra, list) else []) if isinstance(e, dict)]
        if not extra:  # the body did not parse at all
            return error_response(ApiError(400, f"the request body is not valid JSON: {exc.detail}"))
        detail = "; ".join(str(e.get("message", e)) for e in extra)
        named = re.search(r"(?:unknown|missing required) field `([^`]+)`", detail)
        param = named.group(1) if named else next((e.get("key") for e in extra if e.get("key") != "data"), None)
        return error_response(ApiError(400, f"invalid request: {detail}", param=param))

    def on_http(_: Request, exc: HTTPException) -> Response:
        if exc.status_code == 413:  # refused by its size (Content-Length, or bytes counted), before parsing
            return error_response(ApiError(413, f"the request body is larger than the server's limit of "
                                           f"{MAX_BODY_BYTES >> 20} MiB; send a shorter prompt or fewer messages."))
        response = error_response(ApiError(exc.status_code, exc.detail, kind="invalid_request_error"))
        response.headers.update(exc.headers or {})  # e.g. Allow, with a 405
        return response

    def on_api(_: Request, exc: ApiError) -> Response:
        return error_response(exc)

    def on_client_gone(_: Request, exc: ClientGone) -> Response:
        return Response(None, status_code=499)  # nginx's "client closed request": no one reads it

    return Litestar(
        route_handlers=HANDLERS,
        exception_handlers={ValidationException: on_validation, ApiError: on_api, HTTPException: on_http,
                            ClientGone: on_client_gone},
        state=State({"frontend": frontend}),
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=None,  # the published schema is ptp.openapi's, built from the request types
        debug=False,
        logging_config=None,
    )


# --- processes -----------------------------------------------------------------------------------------

def default_model_name(model: str | None) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct"
    path = Path(model)
    return path.stem if model.endswith(".gguf") else model


FLUSH_SECONDS = 5.0  # after the drain: for finished responses to be written out before connections close


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn, stopped ptp's way. The first SIGTERM or Ctrl-C starts `on_stop` (the drain) on the
        event loop instead of uvicorn's own stop, and uvicorn stops when the drain is done; a second
        Ctrl-C calls `on_force` (exit now). Further SIGTERMs are ignored: under torchrun the front end
        receives the same stop twice (torchrun signals every process of a worker's group, and rank 0
        passes its own signal on)."""

        on_stop = on_force = None

        def handle_exit(self, sig, frame) -> None:
            if self.stopping is None:
                self.stopping = signal.Signals(sig).name
                self.loop.call_soon_threadsafe(self.on_stop, self.stopping)
            elif sig == signal.SIGINT:
                self.on_force()

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            self.stopping, self.loop = None, asyncio.get_running_loop()
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return GracefulServer


async def drain(frontend: FrontEnd, server, why: str, timeout: float) -> None:
    """Stop taking requests (503), let those in flight finish for up to `timeout` s, end the rest with
    finish_reason "abort" (streams still end with their last chunk and [DONE]), then stop uvicorn."""
    frontend.draining = True
    log.warning("%s: draining %d request(s) for up to %g s (--graceful-timeout); new requests get 503; "
                "Ctrl-C again exits at once", why, frontend.in_flight, timeout)
    deadline = time.monotonic() + timeout
    while frontend.in_flight and time.monotonic() < deadline and frontend.error is None:
        await asyncio.sleep(0.05)
    if frontend.in_flight and frontend.error is None:
        n = frontend.replicas.abort_all()
        log.warning("--graceful-timeout (%g s) passed: %d request(s) aborted", timeout, n)
    server.should_exit = True


def exit_now(replicas) -> None:
    """A second Ctrl-C: kill the replicas' processes (their ranks follow them: parent-death signal) and
    exit at once, without tracebacks."""
    print("ptp: second Ctrl-C: exiting now", file=sys.stderr, flush=True)
    for p in (replicas.procs.procs if replicas.procs is not None else []):
        with contextlib.suppress(OSError):
            os.kill(p.pid, signal.SIGKILL)
    os._exit(130)


def run_frontend(ns: argparse.Namespace, args: EngineArgs, spawn: bool, addresses=None) -> int:
    """The front end: start (or meet) the replicas, serve HTTP until told to stop, stop the replicas."""
    import uvicorn

    from ptp.hub import load_tokenizer, resolve_model
    from ptp.frontend import Replicas, ReplicaFailed
    from ptp.metrics import ServerMetrics

    model_name = ns.served_model_name or default_model_name(args.model)
    metrics = ServerMetrics(args.dp_size)
    files, _, _ = resolve_model(args, None)  # refuses a bad model or tp before any replica starts
    start = time.perf_counter()
    replicas = Replicas(args, None, spawn=spawn, warm=True, metrics=metrics, addresses=addresses)
    try:  # while the replicas start: importing transformers and reading the tokenizer take seconds
        tokenizer = replicas.tokenizer = load_tokenizer(args, files)
    except BaseException:
        replicas.close()
        raise
    try:
        replicas.wait_ready(timeout=max(600.0, args.dist_timeout))
    except ReplicaFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    log.info("%d replica(s) ready in %.1f s", args.dp_size, time.perf_counter() - start)
    frontend = FrontEnd(replicas, tokenizer, model_name, metrics)
    frontend.tool_call_parser = ns.tool_call_parser
    config = uvicorn.Config(build_app(frontend), host=ns.host, port=ns.port, log_level="warning",
                            timeout_graceful_shutdown=int(FLUSH_SECONDS), access_log=False)
    server = _graceful_server_class()(config)

    def on_stop(why: str) -> None:  # the task is kept: a task nobody holds may be collected while it runs
        server.drainer = asyncio.ensure_future(drain(frontend, server, why, ns.graceful_timeout))
    server.on_stop = on_stop
    server.on_force = lambda: exit_now(replicas)

    async def watch():
        while not server.should_exit:
            await asyncio.sleep(0.5)
            if frontend.error is not None:
                log.error("%s; /health answers 503, exiting", frontend.error)
                await asyncio.sleep(2.0)
                server.should_exit = True

    async def main():
        frontend.attach(asyncio.get_running_loop())
        watcher = asyncio.create_task(watch())
        await server.serve()
        watcher.cancel()

    log.info("serving %s (dp=%d, tp=%d, KV cache %d tokens per replica) at http://%s:%d/v1", model_name,
             args.dp_size, args.tp, frontend.limits.kv_capacity_tokens, ns.host, ns.port)
    asyncio.run(main())
    failed = frontend.error
    codes = replicas.stop(timeout=30.0)
    bad = [(r, c) for r, c in codes if c != 0]
    if bad and failed is None:
        failed = "; ".join(f"replica {r} exited with status {c}" for r, c in bad)
    if failed:
        print(f"ptp: {failed}", file=sys.stderr, flush=True)
    log.info("stopped")
    return 1 if failed else 0


def _frontend_main(ns, args, addresses, parent_pid: int) -> None:
    """The front end as a child of torchrun's global rank 0."""
    from ptp.ranks import exit_with_parent

    exit_with_parent(parent_pid)
    setup_logging()
    os._exit(run_frontend(ns, args, spawn=False, addresses=addresses))


def serve_under_torchrun(ns: argparse.Namespace, args: EngineArgs) -> int:
    """Every torchrun process: build its part of the engine; replica leaders serve the front end's
    requests, the other ranks follow; global rank 0 also starts the front end."""
    import torch.distributed as dist

    from ptp import ipc
    from ptp.engine import Engine
    from ptp.ranks import exit_with_parent
    from ptp.replica import ReplicaSockets, run_replica, warm_up

    exit_with_parent(os.getppid())  # torchrun killed (SIGKILL too): every rank ends with it
    engine = Engine(args)
    d = engine.d
    addresses = [ipc.new_addresses() if d.rank == 0 else None]
    if d.world_size > 1:
        dist.broadcast_object_list(addresses, src=0)
    if not engine.is_leader:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the replica's leader decides when its ranks stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        engine.follow()  # does not return
    front = None
    if d.rank == 0:
        front = mp.get_context("spawn").Process(target=_frontend_main, args=(ns, args, addresses[0], os.getpid()),
                                                name="ptp-frontend")
        front.start()
        for s in (signal.SIGTERM, signal.SIGINT):  # the front end stops the replicas, this one included
            signal.signal(s, lambda *_: os.kill(front.pid, signal.SIGTERM) if front.pid else None)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    warm_up(engine)
    sockets = ReplicaSockets(d.dp_rank, addresses[0])
    status = run_replica(engine, d.dp_rank, sockets, [os.getpid()])
    sockets.close()
    if front is not None:
        front.join(60)
        status = status or (front.exitcode or 0)
    return status


def main(argv=None) -> int:
    setup_logging()
    ns = parse(argv)
    from ptp.parallel.mesh import under_torchrun

    try:
        args = EngineArgs.from_cli(ns)
        if args.max_prefill_tokens_while_decoding is None:  # streams wait for prefill steps: keep those short
            args.max_prefill_tokens_while_decoding = SERVE_PREFILL_TOKENS_WHILE_DECODING
        if under_torchrun():
            return serve_under_torchrun(ns, args)
        if args.node_rank > 0:  # nodes other than 0 run follower ranks only; node 0 serves
            from ptp.engine import Engine

            engine = Engine(args)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # node 0's leader decides when the ranks stop
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            engine.follow()  # does not return
        return run_frontend(ns, args, spawn=True)
    except PtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
