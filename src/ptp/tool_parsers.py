"""Tool calls in a model's output, per model family: the text a model writes when it calls tools,
parsed into OpenAI `tool_calls`.

    hermes       Qwen2.5 / Qwen3 (and Hermes): <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated
    llama3_json  Llama 3.1-3.3: [<|python_tag|>]{"name": ..., "parameters": {...}}, several joined by ";"
    mistral      Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...], or [TOOL_CALLS]name[ARGS]{...}

The names are vLLM's `--tool-call-parser` names, so that a command line carries over. Text that
is not a well-formed call stays content: a model that writes half a call has not called a tool.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass
class Parsed:
    content: str | None        # the text outside the calls (None if there is none)
    tool_calls: list[ToolCall]


def _call(obj, args_keys=("arguments", "parameters")) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _content(text: str) -> str | None:
    text = text.strip()
    return text or None


class HermesParser:
    name = "hermes"
    start = "<tool_call>"
    _call_re = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def parse(self, text: str) -> Parsed:
        if self.start not in text:
            return Parsed(text, [])
        calls = []
        for body in self._call_re.findall(text):
            try:
                call = _call(json.loads(body))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return Parsed(text, [])
            calls.append(call)
        return Parsed(_content(text[: text.index(self.start)]), calls)


class Llama3JsonParser:
    name = "llama3_json"
    start = "<|python_tag|>"

    def parse(self, text: str) -> Parsed:
        body = text.strip()
        if body.startswith(self.start):
            body = body[len(self.start):].strip()
        if not body.startswith("{"):
            return Parsed(text, [])
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            try:
                obj, end = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return Parsed(text, [])
            call = _call(obj)
            if call is None:
                return Parsed(text, [])
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \n\t;":
                at += 1
        return Parsed(None, calls)


class MistralParser:
    name = "mistral"
    start = "[TOOL_CALLS]"
    _named = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*\[ARGS\]")

    def parse(self, text: str) -> Parsed:
        if self.start not in text:
            return Parsed(text, [])
        content, rest = text.split(self.start, 1)
        calls = []
        for part in rest.split(self.start):
            named = self._named.match(part)
            try:
                if named:  # [TOOL_CALLS]name[ARGS]{...}
                    args, _ = json.JSONDecoder().raw_decode(part, named.end())
                    found = [_call({"name": named.group(1), "arguments": args})]
                else:
                    objs = json.loads(part.strip())
                    found = [_call(o) for o in (objs if isinstance(objs, list) else [objs])]
            except json.JSONDecodeError:
                return Parsed(text, [])
            if not found or None in found:
                return Parsed(text, [])
            calls += found
        return Parsed(_content(content), calls)


PARSERS = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def parser_for(chat_template: str | None, model_type: str | None, choice: str | None = None):
    """The parser named by --tool-call-parser, else the one the model's chat template or type implies; None if
    neither says."""
    if choice is not None:
        if choice not in PARSERS:
            raise ValueError(f"--tool-call-parser {choice!r} is not known; choose one of {', '.join(PARSERS)}.")
        return PARSERS[choice]()
    template = chat_template or ""
    if "<tool_call>" in template:
        return HermesParser()
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<|python_tag|>" in template or "<|eom_id|>" in template:
        return Llama3JsonParser()
    kind = (model_type or "").lower()
    if kind.startswith("qwen"):
        return HermesParser()
    if kind in ("mistral", "mixtral"):
        return MistralParser()
    if kind == "llama":
        return Llama3JsonParser()
    return None


def call_schema(tools: list[dict], parallel: bool) -> dict:
    """The JSON schema of one call (or, with parallel, a list of calls) of the given tools: a name and its
    function's parameters. Used to enforce tool_choice "required" or a named function."""
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                        "arguments": t["function"].get("parameters") or
                                                        {"type": "object"}},
                      "required": ["name", "arguments"], "additionalProperties": False} for t in tools]}
    return {"type": "array", "items": one, "minItems": 1} if parallel else one


class ToolPlan:
    """What a chat request's tools ask of the engine and of its output: the grammar that enforces
    tool_choice "required" or a named function (the output is then the calls as JSON), or the
    family's parser for "auto"."""

    def __init__(self, tools: list[dict], tool_choice, parallel: bool, parser):
        from ptp.structured import grammar_for

        self.grammar = None
        self.forced_parallel = False
        self.parser = None
        if tool_choice == "none" or not tools:
            return
        if tool_choice in (None, "auto"):
            if parser is None:
                raise ValueError("tool_choice \"auto\" needs a tool-call parser for this model: start the server "
                                 f"with --tool-call-parser ({', '.join(PARSERS)}), or send tool_choice "
                                 "\"required\" or a named function.")
            self.parser = parser
            return
        if tool_choice == "required":
            chosen = tools
        else:
            name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
            chosen = [t for t in tools if t.get("function", {}).get("name") == name]
            if not chosen:
                raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools.")
            parallel = False
        self.forced_parallel = parallel
        self.grammar = grammar_for(json_schema=call_schema(chosen, parallel))

    def parse(self, text: str) -> Parsed:
        if self.grammar is not None:  # the grammar made the output the calls' JSON
            try:
                objs = json.loads(text)
            except json.JSONDecodeError:
                return Parsed(text, [])  # cut short by max_tokens
            calls = [_call(o) for o in (objs if self.forced_parallel else [objs])]
            return Parsed(None, [c for c in calls if c is not None])
        if self.parser is not None:
            return self.parser.parse(text)
        return Parsed(text, [])

    @property
    def active(self) -> bool:
        return self.grammar is not None or self.parser is not None
