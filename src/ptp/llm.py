"""`ptp.LLM`: offline generation. With tp > 1 outside torchrun it starts its own ranks."""
from __future__ import annotations

import dataclasses
import logging

from ptp.args import EngineArgs
from ptp.engine import Engine
from ptp.errors import ConfigError
from ptp.outputs import RequestOutput
from ptp.sampling import SamplingParams

log = logging.getLogger("ptp")


class LLM:
    """Load a model once; generate from many prompts.

    Keyword arguments are the command-line flags: LLM("Qwen/Qwen2.5-0.5B-Instruct", tp=2,
    dtype="bfloat16", max_model_len=4096, mem_fraction_static=0.8). Under torchrun, ranks > 0
    follow rank 0 inside the constructor and exit when rank 0's LLM shuts down.
    """

    def __init__(self, model: str | None = None, **kwargs):
        names = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(kwargs) - names - {"tp_size"})
        if unknown:
            raise ConfigError(f"LLM() got unknown arguments {unknown}; known: {', '.join(sorted(names))}.")
        if "tp_size" in kwargs:
            kwargs["tp"] = kwargs.pop("tp_size")
        self.engine = Engine(EngineArgs(model=model, **kwargs))
        if not self.engine.is_leader:
            self.engine.follow()  # ends the process when rank 0 shuts down

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Prompts: a string, a list of token ids, or a list of either. One RequestOutput per prompt."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ConfigError(f"got {len(prompts)} prompts but {len(params)} SamplingParams; give one, or one per prompt.")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p))
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """messages: one conversation ([{"role": ..., "content": ...}, ...]) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.encode_chat(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        tok = self.engine.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ConfigError("this model's tokenizer has no chat template; use generate() with plain prompts.")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return tok.encode(text, add_special_tokens=False)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm or len(ids) < 2)
        done: dict[str, RequestOutput] = {}
        pending = set(ids)
        engine = self.engine
        while pending:
            updates = engine.step()
            for u in updates:
                if u.finish_reason is not None and u.request_id in pending:
                    if all(s.finish_reason is not None for s in engine.requests[u.request_id]):
                        done[u.request_id] = engine.result(u.request_id)
                        pending.discard(u.request_id)
                        bar.update(1)
            if not updates and not engine.has_unfinished() and pending:
                raise RuntimeError(f"requests {sorted(pending)} were lost by the scheduler")
        bar.close()
        return [done[i] for i in ids]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
