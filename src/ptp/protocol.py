"""OpenAI-compatible request bodies, validated by msgspec before anything reaches the engine."""
from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

from ptp.sampling import SamplingParams

Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
N = Annotated[int, Meta(ge=1, le=128)]
NonEmpty = Annotated[str, Meta(min_length=1)]
StopList = Union[NonEmpty, Annotated[list[NonEmpty], Meta(max_length=16)], None]
Seed = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]  # what a torch.Generator takes, as OpenAI's int64


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class JsonSchemaFormat(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    name: str | None = None
    description: str | None = None
    schema: dict = {}
    strict: bool | None = None


class _Format(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    pass


class TextFormat(_Format, tag="text"):
    pass


class JsonObjectFormat(_Format, tag="json_object"):
    pass


class JsonSchemaResponseFormat(_Format, tag="json_schema"):
    json_schema: JsonSchemaFormat


ResponseFormat = Union[TextFormat, JsonObjectFormat, JsonSchemaResponseFormat]


class FunctionDef(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class _Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    max_tokens: PositiveInt | None = None
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: N = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopList = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM / SGLang extensions
    top_k: Annotated[int, Meta(ge=-1, le=(1 << 31) - 1)] = -1  # -1 or 0: no limit; beyond the vocabulary: none
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] = 1.0
    min_tokens: Annotated[int, Meta(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Meta(ge=0)]] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured outputs: OpenAI's response_format, and vLLM's guided_regex / guided_choice extensions
    response_format: ResponseFormat | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[NonEmpty], Meta(min_length=1)] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for a field ptp refuses, or None."""
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by ptp."
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true."
        kind = self.format_kind()
        given = [name for name, on in (("response_format", kind != "text"), ("guided_regex", self.guided_regex),
                                       ("guided_choice", self.guided_choice is not None)) if on]
        if len(given) > 1:
            return given[1], f"give one of response_format, guided_regex and guided_choice, not {' and '.join(given)}."
        return None

    def format_kind(self) -> str:
        """response_format's type: "text" (no constraint), "json_object" or "json_schema"."""
        return "text" if self.response_format is None else type(self.response_format).__struct_config__.tag

    def grammar(self) -> str | None:
        """The llguidance grammar of this request's constraint, if any; ConfigError naming what is wrong."""
        from ptp.structured import grammar_for

        kind = self.format_kind()
        if kind == "json_object":
            return grammar_for(json_object=True)
        if kind == "json_schema":
            return grammar_for(json_schema=self.response_format.json_schema.schema)
        if self.guided_regex is not None:
            return grammar_for(regex=self.guided_regex)
        if self.guided_choice is not None:
            return grammar_for(choice=self.guided_choice)
        return None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens, grammar=self.grammar(),
        )


TokenId = Annotated[int, Meta(ge=0)]
# OpenAI: a string, a list of strings, a list of token ids, or a list of lists of token ids.
# (msgspec allows one list type per union, so the list's items are checked in prompts().)
PromptType = Union[NonEmpty, Annotated[list[Union[NonEmpty, TokenId, Annotated[list[TokenId], Meta(min_length=1)]]],
                                        Meta(min_length=1)]]


class CompletionRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    prompt: PromptType
    max_tokens: PositiveInt | None = 16
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False
    best_of: PositiveInt | None = None
    suffix: str | None = None

    def unsupported(self):
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by ptp."
        if self.best_of not in (None, self.n):
            return "best_of", "best_of other than n is not supported by ptp."
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request; ValueError if the list mixes kinds."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        kinds = {type(x) for x in p}
        if len(kinds) != 1:
            raise ValueError("prompt must be a string, a list of strings, a list of token ids, "
                             "or a list of lists of token ids, not a mix of them.")
        return [list(p)] if kinds == {int} else list(p)


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None   # an assistant's earlier calls
    tool_call_id: str | None = None        # a tool's answer: to which call

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.tool_calls:  # chat templates read the arguments as an object
            out["tool_calls"] = [{**({"id": c.id} if c.id is not None else {}), "type": c.type,
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def _arguments(text: str):
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class ChatCompletionRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True

    def unsupported(self):
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            return "tool_choice", "tool_choice needs tools."
        if self.tools and self.tool_choice not in (None, "none", "auto") and (
                self.format_kind() != "text" or self.guided_regex is not None or self.guided_choice is not None):
            return "tool_choice", "a forced tool_choice cannot be combined with response_format or guided_*."
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true."
        return super().unsupported()

    def tool_dicts(self) -> list[dict]:
        """The tools as plain JSON objects (for the chat template and the tool-call grammar)."""
        return msgspec.to_builtins(self.tools or [])

    def tool_choice_json(self):
        return msgspec.to_builtins(self.tool_choice)
