"""Tool calls in a model's output, per model family: the text a model writes when it calls tools,
parsed into OpenAI `tool_calls`.

    hermes       Qwen2.5 / Qwen3 (and Hermes): <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated
    llama3_json  Llama 3.1-3.3: [<|python_tag|>]{"name": ..., "parameters": {...}}, several joined by ";"
    mistral      Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...], or [TOOL_CALLS]name[ARGS]{...}

The names are vLLM's `--tool-call-parser` names, so that a command line carries over. Text that
is not a well-formed call stays content: a model that writes half a call has not called a tool.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import re
import uuid


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as the model wrote it (streamed deltas add up to the same text)
    id: str = dataclasses.field(default_factory=new_call_id)

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclasses.dataclass
class Parsed:
    content: str | None        # the text outside the calls (None if there is none)
    tool_calls: list[ToolCall]


# --- JSON read as it arrives ------------------------------------------------------------------------------
# A call's arguments go out as the model writes them, so the scanners below only find where things
# begin and end (strings, nesting); whether the whole is valid JSON is the non-streaming parse's say.

ARGS_KEYS = ("arguments", "parameters")
_WS = " \t\n\r"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_STRUCTURE = re.compile(r'[{}\[\]"]')
_SCALAR = re.compile(r'[^,}\]\s]+')


class _NotACall(Exception):
    """The text cannot be (the rest of) a call in this family's format."""


def _skip_ws(text: str, i: int, also: str = "") -> int:
    while i < len(text) and (text[i] in _WS or text[i] in also):
        i += 1
    return i


def _string_end(text: str, i: int) -> int | None:
    """The end of the JSON string that starts at i; None while it is still open."""
    m = _STRING.match(text, i)
    return m.end() if m else None


class _Nested:
    """Where the JSON object or array that starts at `start` closes, found as its text arrives."""

    def __init__(self, start: int):
        self.pos, self.depth = start, 0

    def advance(self, text: str) -> int | None:
        i = self.pos
        while (m := _STRUCTURE.search(text, i)) is not None:
            j = m.start()
            if text[j] == '"':
                end = _string_end(text, j)
                if end is None:
                    self.pos = j
                    return None
                i = end
                continue
            self.depth += 1 if text[j] in "{[" else -1
            i = j + 1
            if self.depth == 0:
                self.pos = i
                return i
        self.pos = len(text)
        return None


def _value_end(text: str, i: int) -> int | None:
    if text[i] == '"':
        return _string_end(text, i)
    if text[i] in "{[":
        return _Nested(i).advance(text)
    m = _SCALAR.match(text, i)
    if m is None:
        raise _NotACall
    return m.end() if m.end() < len(text) else None  # a number may go on


class _CallScan:
    """One call's JSON object, {"name": ..., "arguments": {...}}, read as it arrives: its name once
    the string is whole, its arguments' text as far as written. Given a name, the object at `start`
    is the arguments themselves (Mistral's name[ARGS]{...})."""

    def __init__(self, start: int, name: str | None = None):
        self.name = name
        self.bare = name is not None
        self.i = start + 1            # the next member to read
        self.args_start = start if self.bare else None
        self.args_nested = _Nested(start) if self.bare else None
        self.args_end: int | None = None
        self.args_string: str | None = None  # arguments written as a JSON string: its value, once whole
        self.end: int | None = None

    @property
    def ready(self) -> bool:
        """Its name is known and its arguments have begun (or it has none): the call can be announced."""
        return self.name is not None and (self.args_start is not None or self.end is not None)

    def arguments(self, text: str) -> str | None:
        """The arguments' text written so far; None before they begin."""
        if self.args_string is not None:
            return self.args_string
        if self.args_start is not None:
            return text[self.args_start: self.args_end or len(text)]
        return "{}" if self.end is not None else None

    def advance(self, text: str) -> int | None:
        """Read what arrived; the end of the object once it is closed, else None."""
        if self.end is not None:
            return self.end
        if self.args_nested is not None and self.args_end is None:
            self.args_end = self.args_nested.advance(text)
            if self.args_end is None:
                return None
            self.i = self.args_end
            if self.bare:
                self.end = self.args_end
                return self.end
        while True:
            i = _skip_ws(text, self.i, ",")
            if i == len(text):
                return None
            if text[i] == "}":
                self.end = i + 1
                return self.end
            if text[i] != '"':
                raise _NotACall
            key_end = _string_end(text, i)
            colon = _skip_ws(text, key_end) if key_end is not None else len(text)
            if colon == len(text):
                return None
            v = _skip_ws(text, colon + 1)
            if text[colon] != ":":
                raise _NotACall
            if v == len(text):
                return None
            key = json.loads(text[i:key_end])
            if key == "name":
                if text[v] != '"':
                    raise _NotACall
                end = _string_end(text, v)
                if end is None:
                    return None
                self.name, self.i = json.loads(text[v:end]), end
            elif key in ARGS_KEYS and self.args_start is None and self.args_string is None:
                if text[v] == "{":
                    self.args_start, self.args_nested = v, _Nested(v)
                    return self.advance(text)
                if text[v] != '"':
                    raise _NotACall
                end = _string_end(text, v)  # some models write the arguments as a JSON string
                if end is None:
                    return None
                self.args_string, self.i = json.loads(text[v:end]), end
            else:
                end = _value_end(text, v)
                if end is None:
                    return None
                self.i = end


def _call(obj_text: str) -> ToolCall | None:
    """The call written as this JSON object's text, or None if it is not one."""
    try:
        obj = json.loads(obj_text)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        scan = _CallScan(0)
        scan.advance(obj_text)
        args = scan.arguments(obj_text)
        if not isinstance(json.loads(args), dict):
            return None
    except (json.JSONDecodeError, _NotACall):
        return None
    return ToolCall(scan.name, args)


def _items(text: str) -> list[str] | None:
    """The text of each value of a JSON array (or of the one value), None if the text is not JSON."""
    text = text.strip()
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(whole, list):
        return [text]
    decoder, out, i = json.JSONDecoder(), [], _skip_ws(text, 1)
    for _ in whole:
        _, end = decoder.raw_decode(text, i)
        out.append(text[i:end])
        i = _skip_ws(text, end, ",")
    return out


def _calls(items: list[str] | None) -> list[ToolCall] | None:
    calls = [_call(item) for item in items or []]
    return calls if calls and None not in calls else None


def _content(text: str) -> str | None:
    text = text.strip()
    return text or None


def _held_tail(text: str, marker: str) -> int:
    """How many of text's last characters could be the start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def _tag(text: str, i: int, tags: tuple[str, ...]) -> int | None:
    """The position after whichever of `tags` is at i; None if the text so far may still become one."""
    for tag in tags:
        if text.startswith(tag, i):
            return i + len(tag)
    if any(tag.startswith(text[i:]) for tag in tags):
        return None
    raise _NotACall


class _Reader(abc.ABC):
    """A family's calls read as the text arrives. `content_end`: how much of the text is content that
    can go out; `calls`: the calls begun so far. Once the text leaves the family's format, reading
    stops and the end of the stream settles what is left."""

    def __init__(self):
        self.content_end, self.calls, self.stopped = 0, [], False

    def advance(self, text: str) -> None:
        if self.stopped:
            return
        try:
            if self.calls and self.calls[-1].end is None and self.calls[-1].advance(text) is None:
                return
            self.read(text)
        except (_NotACall, json.JSONDecodeError):
            self.stopped = True

    @abc.abstractmethod
    def read(self, text: str) -> None:
        """Read on from where the last call left: each family's own format."""

    def call_at(self, text: str, i: int, name: str | None = None) -> int | None:
        """Begin the call whose object starts at i; its end if it is already whole."""
        self.calls.append(_CallScan(i, name))
        return self.calls[-1].advance(text)


class _MarkedReader(_Reader):
    """Content until the family's marker (a tail that may be its start held back), then calls."""
    marker = ""

    def __init__(self):
        super().__init__()
        self.i: int | None = None  # where reading calls goes on; None while in content

    def read(self, text: str) -> None:
        if self.i is None:
            at = text.find(self.marker, self.content_end)
            if at < 0:
                self.content_end = len(text) - _held_tail(text, self.marker)
                return
            self.content_end, self.i = at, at + len(self.marker)
        if self.calls and self.calls[-1].end is not None:
            self.i = max(self.i, self.calls[-1].end)
        while (i := _skip_ws(text, self.i)) < len(text):
            end = self.after_marker(text, i)
            if end is None:
                return
            self.i = end


class _HermesReader(_MarkedReader):
    marker = "<tool_call>"

    def after_marker(self, text: str, i: int) -> int | None:
        if text[i] == "{":
            return self.call_at(text, i)
        return _tag(text, i, ("</tool_call>", "<tool_call>"))


class _MistralReader(_MarkedReader):
    """[TOOL_CALLS] followed by a JSON array of calls (or one call), or by name[ARGS]{...}; repeated."""
    marker = "[TOOL_CALLS]"
    _named = re.compile(r"([A-Za-z0-9_.-]+)\s*\[ARGS\]\s*")
    _named_begun = re.compile(r"[A-Za-z0-9_.-]+\s*(\[(A(R(G(S)?)?)?)?)?")

    def __init__(self):
        super().__init__()
        self.array = False  # inside a JSON array of calls

    def after_marker(self, text: str, i: int) -> int | None:
        c = text[i]
        if self.array:
            if c == "{":
                return self.call_at(text, i)
            if c in ",]":
                self.array = c == ","
                return i + 1
            raise _NotACall
        if c == "[":  # a JSON array of calls, or the marker again ("[" alone may be either)
            if self.marker.startswith(text[i: i + len(self.marker)]):
                return i + len(self.marker) if text.startswith(self.marker, i) else None
            self.array = True
            return i + 1
        if c == "{":
            return self.call_at(text, i)
        named = self._named.match(text, i)
        if named is None:
            if self._named_begun.fullmatch(text, i):
                return None
            raise _NotACall
        if named.end() == len(text):
            return None
        if text[named.end()] != "{":
            raise _NotACall
        return self.call_at(text, named.end(), named.group(1))


class _ForcedReader(_MistralReader):
    """The output a tool_choice grammar allows: one call's object, or a JSON array of calls."""

    def __init__(self):
        super().__init__()
        self.i = 0


class _Llama3Reader(_Reader):
    """Calls if the output starts with "{" (after an optional <|python_tag|>), several joined by ";";
    any other output is content. Nothing goes out until the first characters say which."""
    tag = "<|python_tag|>"

    def __init__(self):
        super().__init__()
        self.i: int | None = None
        self.is_content = False

    def advance(self, text: str) -> None:
        if self.is_content:
            self.content_end = len(text)
            return
        super().advance(text)
        if self.stopped and not any(c.ready for c in self.calls):  # not a call after all: content
            self.calls, self.stopped, self.is_content = [], False, True
            self.content_end = len(text)

    def read(self, text: str) -> None:
        if self.i is None:
            i = _skip_ws(text, 0)
            if text.startswith(self.tag, i):
                i = _skip_ws(text, i + len(self.tag))
            elif self.tag.startswith(text[i:]):
                return
            if i == len(text):
                return
            if text[i] != "{":
                raise _NotACall
            self.i = i
        if self.calls and self.calls[-1].end is not None:
            self.i = max(self.i, self.calls[-1].end)
        while (i := _skip_ws(text, self.i, ";")) < len(text):
            if text[i] != "{":
                raise _NotACall
            end = self.call_at(text, i)
            if end is None:
                return
            self.i = end


class HermesParser:
    name = "hermes"
    start = "<tool_call>"
    _call_re = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def parse(self, text: str) -> Parsed:
        if self.start not in text:
            return Parsed(text, [])
        calls = _calls([body for body in self._call_re.findall(text)])
        if calls is None:
            return Parsed(text, [])
        return Parsed(_content(text[: text.index(self.start)]), calls)

    def reader(self) -> _Reader:
        return _HermesReader()


class Llama3JsonParser:
    name = "llama3_json"
    start = "<|python_tag|>"

    def parse(self, text: str) -> Parsed:
        body = text.strip()
        if body.startswith(self.start):
            body = body[len(self.start):].strip()
        if not body.startswith("{"):
            return Parsed(text, [])
        decoder, items, at = json.JSONDecoder(), [], 0
        while at < len(body):
            try:
                _, end = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return Parsed(text, [])
            items.append(body[at:end])
            at = _skip_ws(body, end, ";")
        calls = _calls(items)
        return Parsed(None, calls) if calls is not None else Parsed(text, [])

    def reader(self) -> _Reader:
        return _Llama3Reader()


class MistralParser:
    name = "mistral"
    start = "[TOOL_CALLS]"
    _named = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*\[ARGS\]\s*")

    def parse(self, text: str) -> Parsed:
        if self.start not in text:
            return Parsed(text, [])
        content, rest = text.split(self.start, 1)
        calls = []
        for part in rest.split(self.start):
            named = self._named.match(part)
            if named:  # [TOOL_CALLS]name[ARGS]{...}
                try:
                    _, end = json.JSONDecoder().raw_decode(part, named.end())
                except json.JSONDecodeError:
                    return Parsed(text, [])
                args = part[named.end():end]
                found = [ToolCall(named.group(1), args)] if isinstance(json.loads(args), dict) else None
            else:
                found = _calls(_items(part))
            if not found:
                return Parsed(text, [])
            calls += found
        return Parsed(_content(content), calls)

    def reader(self) -> _Reader:
        return _MistralReader()


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
            calls = _calls(_items(text))
            return Parsed(None, calls) if calls is not None else Parsed(text, [])  # None: cut short by max_tokens
        if self.parser is not None:
            return self.parser.parse(text)
        return Parsed(text, [])

    @property
    def active(self) -> bool:
        return self.grammar is not None or self.parser is not None

    def reader(self) -> _Reader:
        return _ForcedReader() if self.grammar is not None else self.parser.reader()


class ToolStream:
    """One streamed choice of a chat request with tools, as OpenAI streams tool calls: content goes
    out as it comes until a call may have begun (a tail that may start the family's marker is held
    back); each call then gets a first delta with its index, id, type "function", name and arguments
    "", and deltas with the arguments' text as the model writes it. At the end the whole output is
    parsed as a non-streaming response would be, and whatever that holds beyond what was streamed is
    sent, so the deltas add up to the non-streaming message."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.reader, self.text = plan, plan.reader(), ""
        self.content_sent = 0
        self.sent: list[list[str]] = []  # per call begun: [its id, the arguments sent so far]
        self.calls: list[ToolCall] = []

    def feed(self, piece: str) -> list[dict]:
        """The deltas this piece of output allows to go out."""
        self.text += piece
        self.reader.advance(self.text)
        out = []
        if self.reader.content_end > self.content_sent:
            out.append({"content": self.text[self.content_sent: self.reader.content_end]})
            self.content_sent = self.reader.content_end
        for k, call in enumerate(self.reader.calls):
            if k == len(self.sent):
                if not call.ready:
                    break
                self.sent.append([new_call_id(), ""])
                out.append(self._begin(k, self.sent[k][0], call.name))
            args = call.arguments(self.text) or ""
            if len(args) > len(self.sent[k][1]):
                out.append(self._arguments(k, args[len(self.sent[k][1]):]))
                self.sent[k][1] = args
        return out

    def finish(self) -> list[dict]:
        """The last deltas, once the output is whole."""
        self.calls = self.plan.parse(self.text).tool_calls
        if not self.calls:
            rest = self.text[self.content_sent:]
            # calls begun but not whole (cut short by max_tokens) stay as sent; else the held text is content
            return [{"content": rest}] if rest and not self.sent else []
        out = []
        for k, call in enumerate(self.calls):
            if k == len(self.sent):
                self.sent.append([call.id, ""])
                out.append(self._begin(k, call.id, call.name))
            sent = self.sent[k][1]
            if len(call.arguments) > len(sent) and call.arguments.startswith(sent):
                out.append(self._arguments(k, call.arguments[len(sent):]))
                self.sent[k][1] = call.arguments
        return out

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls else reason

    @staticmethod
    def _begin(index: int, call_id: str, name: str) -> dict:
        return {"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                "function": {"name": name, "arguments": ""}}]}

    @staticmethod
    def _arguments(index: int, fragment: str) -> dict:
        return {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
