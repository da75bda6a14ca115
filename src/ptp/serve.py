"""`python -m ptp.serve`: an OpenAI-compatible server (Litestar on uvicorn) on rank 0.

    python -m ptp.serve --model Qwen/Qwen2.5-0.5B-Instruct --tp 2 --port 30000
    torchrun --nproc-per-node 2 -m ptp.serve --model ./ckpt
"""

import argparse
import asyncio
import json
import logging
import re
import signal
import sys
import time
import uuid
from pathlib import Path

from ptp.args import EngineArgs
from ptp.errors import ConfigError, PtpError
from ptp.log import setup_logging

log = logging.getLogger("ptp")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ptp.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on")
    server.add_argument("--port", type=int, default=30000, help="port to listen on")
    server.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: --model, or the default model's name)")
    EngineArgs.add_cli_args(parser.add_argument_group("engine"))
    return parser.parse_args(argv)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def build_app(aengine, model_name: str):
    from litestar import Litestar, MediaType, Request, Response, get, post
    from litestar.exceptions import HTTPException, ValidationException
    from litestar.response import Stream

    from ptp.async_engine import EngineDead
    from ptp.protocol import ChatCompletionRequest, CompletionRequest

    engine = aengine.engine
    tok = engine.tokenizer

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
        return error_response(ApiError(exc.status_code, exc.detail, kind="invalid_request_error"))

    def on_api(_: Request, exc: ApiError) -> Response:
        return error_response(exc)

    def check_common(req) -> None:
        if req.model != model_name:
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{model_name}`.",
                           param="model", code="model_not_found")
        bad = req.unsupported()
        if bad:
            raise ApiError(400, bad[1], param=bad[0])
        if not aengine.alive:
            raise ApiError(503, f"the engine is not running: {aengine.error}", kind="service_unavailable")

    def sampling(req, max_tokens, logprobs, prompts: list[list[int]]):
        try:
            params = req.sampling_params(max_tokens, logprobs)
            for ids in prompts:
                engine.check_prompt(ids, params)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None
        return params

    def encode(prompt) -> list[int]:
        if isinstance(prompt, str):
            if tok is None:
                raise ApiError(400, "this model was loaded without a tokenizer: send prompts as token ids.",
                               param="prompt")
            return tok.encode(prompt)
        return list(prompt)

    def token_text(token_id: int) -> str:
        return tok.decode([token_id]) if tok is not None else f"<{token_id}>"

    async def run(prompts: list[list[int]], params):
        """Yield (prompt index, SeqUpdate) for every step of every prompt; abort all on exit."""
        merged: asyncio.Queue = asyncio.Queue()
        ids = []
        try:
            for i, ids_ in enumerate(prompts):
                rid, q = aengine.submit(ids_, params)
                ids.append(rid)
                asyncio.get_running_loop().create_task(_forward(q, merged, i))
        except EngineDead as e:
            raise ApiError(503, f"the engine is not running: {e}", kind="service_unavailable") from None
        open_ = len(prompts)
        finished = set()
        try:
            while open_:
                i, item = await merged.get()
                if item is None:
                    open_ -= 1
                    finished.add(i)
                elif isinstance(item, Exception):
                    raise ApiError(503, f"the engine stopped: {item}", kind="service_unavailable")
                else:
                    yield i, item
        finally:
            for i, rid in enumerate(ids):
                if i not in finished:
                    aengine.abort(rid)

    def completion_logprobs(entries, token_ids, offset0: int):
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = offset0
        for token, entry in zip(token_ids, entries or []):
            text = token_text(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(entry[token])
            out["top_logprobs"].append({token_text(t): lp for t, lp in list(entry.items())[1:]} or None)
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def chat_logprobs(entries, token_ids, top: int):
        content = []
        for token, entry in zip(token_ids, entries or []):
            text = token_text(token)
            tops = list(entry.items())[1: 1 + top]
            content.append({
                "token": text, "logprob": entry[token], "bytes": list(text.encode()),
                "top_logprobs": [{"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode())}
                                 for t, lp in tops],
            })
        return {"content": content}

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    @post("/v1/completions", status_code=200)
    async def completions(data: CompletionRequest) -> Response:
        check_common(data)
        try:
            prompts = [encode(p) for p in data.prompts()]
        except ValueError as e:
            raise ApiError(400, str(e), param="prompt") from None
        params = sampling(data, data.max_tokens, data.logprobs, prompts)
        rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params.n
        prompt_tokens = sum(len(p) for p in prompts) * n
        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}

        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)

            async def events():
                generated, offsets = 0, {}
                async for i, u in run(prompts, params):
                    index = i * n + u.index
                    generated += len(u.token_ids)
                    lp = None
                    if data.logprobs is not None:
                        lp = completion_logprobs(u.logprobs, u.token_ids, offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + len(u.text)
                    # one chunk per token, even while its text is an incomplete character
                    yield sse({**base, "choices": [{"index": index, "text": u.text, "logprobs": lp,
                                                     "finish_reason": u.finish_reason}]})
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(prompt_tokens, generated)})
                yield "data: [DONE]\n\n"

            return Stream(events(), media_type="text/event-stream")

        choices = {}
        async for i, u in run(prompts, params):
            c = choices.setdefault(i * n + u.index, {"text": "", "ids": [], "lps": [], "finish": None})
            c["text"] += u.text
            c["ids"] += u.token_ids
            c["lps"] += u.logprobs or []
            c["finish"] = u.finish_reason
        out = [{"index": k, "text": c["text"], "finish_reason": c["finish"],
                "logprobs": completion_logprobs(c["lps"], c["ids"], 0) if data.logprobs is not None else None}
               for k, c in sorted(choices.items())]
        generated = sum(len(c["ids"]) for c in choices.values())
        return Response({**base, "choices": out, "usage": usage(prompt_tokens, generated)})

    @post("/v1/chat/completions", status_code=200)
    async def chat_completions(data: ChatCompletionRequest) -> Response:
        check_common(data)
        if tok is None or not getattr(tok, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions.")
        messages = [m.as_template_input() for m in data.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=data.add_generation_prompt)
        except Exception as e:
            raise ApiError(400, f"the chat template rejected these messages: {e}", param="messages") from None
        prompt = tok.encode(text, add_special_tokens=False)
        top = data.top_logprobs or 0
        params = sampling(data, data.max_completion_tokens or data.max_tokens, top if data.logprobs else None, [prompt])
        rid, created, n = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), params.n
        base = {"id": rid, "created": created, "model": model_name}

        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)

            async def events():
                chunk = {**base, "object": "chat.completion.chunk"}
                for i in range(n):
                    yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                      "logprobs": None, "finish_reason": None}]})
                generated = 0
                async for _, u in run([prompt], params):
                    generated += len(u.token_ids)
                    lp = chat_logprobs(u.logprobs, u.token_ids, top) if data.logprobs else None
                    if u.text or lp:
                        yield sse({**chunk, "choices": [{"index": u.index, "delta": {"content": u.text},
                                                          "logprobs": lp, "finish_reason": None}]})
                    if u.finish_reason:
                        yield sse({**chunk, "choices": [{"index": u.index, "delta": {}, "logprobs": None,
                                                          "finish_reason": u.finish_reason}]})
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": usage(len(prompt) * n, generated)})
                yield "data: [DONE]\n\n"

            return Stream(events(), media_type="text/event-stream")

        choices = {}
        async for _, u in run([prompt], params):
            c = choices.setdefault(u.index, {"text": "", "ids": [], "lps": [], "finish": None})
            c["text"] += u.text
            c["ids"] += u.token_ids
            c["lps"] += u.logprobs or []
            c["finish"] = u.finish_reason
        out = [{"index": k, "message": {"role": "assistant", "content": c["text"]}, "finish_reason": c["finish"],
                "logprobs": chat_logprobs(c["lps"], c["ids"], top) if data.logprobs else None}
               for k, c in sorted(choices.items())]
        generated = sum(len(c["ids"]) for c in choices.values())
        return Response({**base, "object": "chat.completion", "choices": out,
                         "usage": usage(len(prompt) * n, generated)})

    @get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": int(aengine.started), "owned_by": "ptp",
            "max_model_len": engine.max_model_len,
        }]}

    @get("/health")
    async def health() -> Response:
        if aengine.alive:
            return Response({"status": "ok"}, status_code=200)
        return Response({"status": "error", "error": aengine.error}, status_code=503)

    @get("/metrics", media_type=MediaType.TEXT)
    async def metrics() -> str:
        return aengine.metrics.render()

    return Litestar(
        route_handlers=[completions, chat_completions, models, health, metrics],
        exception_handlers={ValidationException: on_validation, ApiError: on_api, HTTPException: on_http},
        debug=False,
        logging_config=None,
    )


async def _forward(source: asyncio.Queue, merged: asyncio.Queue, index: int) -> None:
    while True:
        item = await source.get()
        await merged.put((index, item))
        if item is None or isinstance(item, Exception):
            return


def default_model_name(model: str | None) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct"
    path = Path(model)
    return path.stem if model.endswith(".gguf") else model


def warm_up(engine) -> None:
    """Short generations through every rank, so /health says ok only when a request can run: one
    prompt alone, then two at once (a batched prefill step's attention takes another kernel, whose
    first call initialises cuDNN, which can take over a second, else paid by the first burst of users)."""
    from ptp.sampling import SamplingParams

    params = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0)
    for prompts in ([[0, 1, 2]], [[0, 1, 2], [3, 4, 5, 6]]):
        rids = [engine.add_request(p, params) for p in prompts]
        while any(engine.requests.get(r) and any(s.finish_reason is None for s in engine.requests[r]) for r in rids):
            engine.step()
        for r in rids:
            engine.result(r)


def main(argv=None) -> int:
    setup_logging()
    ns = parse(argv)
    from ptp.engine import Engine

    try:
        args = EngineArgs.from_cli(ns)
        engine = Engine(args)
    except PtpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if engine.rank != 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 decides when the ranks stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        engine.follow()
        return 0
    return serve(engine, ns.host, ns.port, ns.served_model_name or default_model_name(args.model))


def _graceful_server_class():
    import contextlib
    import threading

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after a graceful stop, which would kill rank 0 before it
        can stop the other ranks; here the signal only asks for the graceful stop."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return GracefulServer


def serve(engine, host: str, port: int, model_name: str) -> int:
    import uvicorn

    from ptp.async_engine import AsyncEngine

    _GracefulServer = _graceful_server_class()

    start = time.perf_counter()
    warm_up(engine)
    log.info("warm-up done in %.1f s", time.perf_counter() - start)
    aengine = AsyncEngine(engine)
    aengine.started = time.time()
    app = build_app(aengine, model_name)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=25,
                            access_log=False)
    server = _GracefulServer(config)

    async def watch_engine():
        while not server.should_exit:
            await asyncio.sleep(0.5)
            if not aengine.alive and not aengine.stopping:
                log.error("engine failed: %s; /health answers 503, exiting", aengine.error)
                await asyncio.sleep(2.0)
                server.should_exit = True

    async def run_server():
        watcher = asyncio.create_task(watch_engine())
        await server.serve()
        watcher.cancel()

    log.info("serving %s (tp=%d, KV cache %d tokens) at http://%s:%d/v1", model_name, engine.args.tp,
             engine.kv_capacity_tokens, host, port)
    asyncio.run(run_server())
    failed = aengine.error is not None
    aengine.stop()
    engine.shutdown()
    if engine.spawned is not None:
        bad = [(r, p.exitcode) for r, p in enumerate(engine.spawned.procs, 1) if p.exitcode != 0]
        if bad and not failed:
            failed = True
            aengine.error = "; ".join(f"rank {r} exited with status {code}" for r, code in bad)
    if failed:
        print(f"ptp: {aengine.error}", file=sys.stderr)
    log.info("stopped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
