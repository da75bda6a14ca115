"""`ptp.LLM`: offline generation. With tp > 1 outside torchrun it starts its own ranks."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import queue

from ptp.args import EngineArgs
from ptp.detokenize import RequestText
from ptp.engine import Engine
from ptp.errors import ConfigError
from ptp.log import setup_library_logging
from ptp.outputs import RequestOutput
from ptp.parallel.mesh import under_torchrun
from ptp.sampling import SamplingParams

log = logging.getLogger("ptp")


class LLM:
    """Load a model once; generate from many prompts.

    Keyword arguments are the command-line flags: LLM("Qwen/Qwen2.5-0.5B-Instruct", tp=2,
    dtype="bfloat16", max_model_len=4096, mem_fraction_static=0.8). Under torchrun, ranks > 0
    follow rank 0 inside the constructor and exit when rank 0's LLM shuts down. With dp_size > 1
    (outside torchrun) each replica runs in processes of its own and the prompts are spread over
    them; the results come back in input order.
    """

    def __init__(self, model: str | None = None, **kwargs):
        setup_library_logging()
        names = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(kwargs) - names - {"tp_size"})
        if unknown:
            raise ConfigError(f"LLM() got unknown arguments {unknown}; known: {', '.join(sorted(names))}.")
        if "tp_size" in kwargs:
            kwargs["tp"] = kwargs.pop("tp_size")
        args = EngineArgs(model=model, **kwargs).validate()
        self.engine = self.replicas = None
        self._counter = itertools.count()
        if args.dp_size > 1 and not under_torchrun():
            self._start_replicas(args)
            return
        self.engine = Engine(args)
        if not self.engine.is_leader:
            self.engine.follow()  # ends the process when rank 0 shuts down
        self._tokenizer = self.engine.tokenizer

    def _start_replicas(self, args: EngineArgs) -> None:
        from ptp.hub import load_tokenizer, resolve_model
        from ptp.frontend import Replicas

        files, _, _ = resolve_model(args, None)  # a bad model or tp fails here, before any process starts
        self._tokenizer = load_tokenizer(args, files)
        self.replicas = Replicas(args, self._tokenizer, spawn=True)
        self.replicas.wait_ready(timeout=max(600.0, args.dist_timeout))
        self._inbox: queue.Queue = queue.Queue()
        self.replicas.start_reader(self._inbox.put)

    @property
    def tokenizer(self):
        return self._tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts: a string, a list of token ids, or a list of either. One RequestOutput per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"got {len(prompts)} prompts but {len(params)} SamplingParams; give one, or one per prompt.")
        encoded = []
        for prompt in prompts:
            if isinstance(prompt, str):
                if self._tokenizer is None:
                    raise ConfigError("this model was loaded without a tokenizer: give prompts as token ids.")
                encoded.append((prompt, self._tokenizer.encode(prompt)))
            else:
                encoded.append((None, list(prompt)))
        limits = self.engine.limits if self.engine is not None else self.replicas.limits
        for (_, ids), p in zip(encoded, params):
            limits.check(ids, p)
        if self.replicas is not None:
            return self._run_replicas(encoded, params, use_tqdm)
        return self._run(encoded, params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """messages: one conversation ([{"role": ..., "content": ...}, ...]) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.encode_chat(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        tok = self._tokenizer
        if not getattr(tok, "chat_template", None):
            raise ConfigError("this model's tokenizer has no chat template; use generate() with plain prompts.")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return tok.encode(text, add_special_tokens=False)

    def _run(self, encoded, params, use_tqdm: bool) -> list[RequestOutput]:
        """One replica in this process: step the engine, turn its tokens into text."""
        from tqdm.auto import tqdm

        engine = self.engine
        texts: dict[str, RequestText] = {}
        ids = []
        try:
            for (text, prompt_ids), p in zip(encoded, params):
                rid = engine.add_request(prompt_ids, p)
                texts[rid] = RequestText(self._tokenizer, text, prompt_ids, p)
                ids.append(rid)
        except Exception:
            for rid in ids:
                engine.abort(rid)
            raise
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm or len(ids) < 2)
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            updates = engine.step()
            for u in updates:
                t = texts[u.request_id]
                out = t.update(u)
                if out.finish_reason is not None and u.finish_reason is None:  # a stop string
                    engine.abort(u.request_id, u.index)
                if t.finished and u.request_id not in done:
                    done[u.request_id] = t.output(u.request_id)
                    bar.update(1)
            if not updates and not engine.has_unfinished() and len(done) < len(ids):
                lost = sorted(set(ids) - set(done))
                raise RuntimeError(f"requests {lost} were lost by the scheduler")
        bar.close()
        return [done[i] for i in ids]

    def _run_replicas(self, encoded, params, use_tqdm: bool) -> list[RequestOutput]:
        """Several replicas: send every prompt, then take their messages until every request finished."""
        from tqdm.auto import tqdm

        from ptp.frontend import ReplicaFailed

        reps = self.replicas
        ids, texts, errors = [], {}, []
        for (text, prompt_ids), p in zip(encoded, params):
            rid = f"llm-{next(self._counter)}"
            ids.append(rid)
            reps.submit(rid, text, prompt_ids, p, lambda item, rid=rid: errors.append(item)
                        if isinstance(item, Exception) else None)
            texts[rid] = reps.requests[rid].text
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm or len(ids) < 2)
        while any(rid in reps.requests for rid in ids):
            reps.handle(self._inbox.get())
            if errors:
                for rid in ids:
                    reps.abort(rid)
                if isinstance(errors[0], ReplicaFailed):
                    raise errors[0]
                raise ConfigError(str(errors[0]))
            bar.n = sum(rid not in reps.requests for rid in ids)
            bar.refresh()
        bar.close()
        return [texts[rid].output(rid) for rid in ids]

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        if self.replicas is not None and not self.replicas._closing:
            codes = self.replicas.stop()
            bad = [(r, c) for r, c in codes if c != 0]
            if bad and self.replicas.error is None:
                log.warning("replicas exited with %s", ", ".join(f"replica {r}: status {c}" for r, c in bad))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
