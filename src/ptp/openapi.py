"""The OpenAPI document the server publishes (`/openapi.json`, also at `/schema/openapi.json`).

It is built from the same msgspec types that validate the requests (ptp.protocol), so a rule the
server enforces on one field is the rule the schema states; this server's own values are filled in
(the served model name, the vocabulary's size). Rules that tie fields together or count tokens cannot
be written in JSON Schema; each operation's description lists them, and breaking one gets a 400:

- the prompt's tokens plus max_tokens must fit the context window (`max_model_len`, from /v1/models);
- min_tokens at most max_tokens; stream_options only with stream true; best_of, if given, equal to n;
- one of response_format (other than text), guided_regex and guided_choice at most; the regex or JSON
  schema must compile for constrained decoding;
- chat: tool_choice other than "none" needs tools (a named one among them; not combined with a
  response_format or guided_*; "auto" needs a tool-call parser); top_logprobs needs logprobs true.
"""
from __future__ import annotations

import copy
from typing import Literal, Union

import msgspec

from ptp.protocol import ChatCompletionRequest, CompletionRequest

REF = "#/components/schemas/{name}"


# --- response bodies (what the handlers send; the fuzz test holds them to these) -------------------------

class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: Union[str, None]
    code: Union[str, None]


class ErrorResponse(msgspec.Struct):
    """OpenAI's error shape; `param` names the field at fault where there is one."""
    error: ErrorDetail


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


FinishReason = Union[Literal["stop", "length", "tool_calls", "abort"], None]


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[Union[float, None]]
    top_logprobs: list[Union[dict[str, float], None]]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: Union[CompletionLogprobs, None]


class Completion(msgspec.Struct):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[TokenLogprob]


class CalledFunction(msgspec.Struct):
    name: str
    arguments: str


class CalledTool(msgspec.Struct):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"]
    content: Union[str, None]
    tool_calls: Union[list[CalledTool], msgspec.UnsetType] = msgspec.UNSET


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: Union[ChatLogprobs, None]


class ChatCompletion(msgspec.Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunk(msgspec.Struct, kw_only=True):
    """One event of a streamed completion; the last before [DONE] may carry usage with no choices."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Union[Usage, msgspec.UnsetType] = msgspec.UNSET


class CalledToolDelta(msgspec.Struct):
    index: int
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatDelta(msgspec.Struct, kw_only=True):
    role: Union[Literal["assistant"], msgspec.UnsetType] = msgspec.UNSET
    content: Union[str, msgspec.UnsetType] = msgspec.UNSET
    tool_calls: Union[list[CalledToolDelta], msgspec.UnsetType] = msgspec.UNSET


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: Union[ChatLogprobs, None]
    finish_reason: FinishReason


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Union[Usage, msgspec.UnsetType] = msgspec.UNSET


class ModelCard(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[ModelCard]


class Healthy(msgspec.Struct):
    status: Literal["ok"]


class Unhealthy(msgspec.Struct):
    status: Literal["error"]
    error: str


# --- the document --------------------------------------------------------------------------------------

def _event_stream(chunk: str) -> dict:
    """Server-sent events: each `data:` a JSON chunk, or an error after the stream began, then `[DONE]`."""
    data = {"anyOf": [{"const": "[DONE]"}, {
        "type": "string", "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [{"$ref": REF.format(name=chunk)}, {"$ref": REF.format(name="ErrorResponse")}]}}]}
    return {"text/event-stream": {"schema": {
        "type": "object", "properties": {"data": data}, "required": ["data"],
        "description": "One event per step of each choice, a usage chunk when stream_options.include_usage is "
                       "true, then `data: [DONE]`. An error after the stream began is sent as an event "
                       "`data: {\"error\": {...}}` before `[DONE]`."}}}

ERRORS = {
    "400": "The request is invalid: a field's value, a rule between fields, or a prompt that does not fit the "
           "context window (`error.param` names the field).",
    "404": "`model` is not the served model (`error.code` is `model_not_found`).",
    "413": "The request body is larger than the server's limit (8 MiB).",
    "503": "The engine has stopped; the server is shutting down.",
}


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": REF.format(name="ErrorResponse")}}}}


def _request_schema(struct, model_name: str, vocab_size: int, components: dict) -> dict:
    (_,), found = msgspec.json.schema_components([struct], ref_template=REF)
    components.update({k: v for k, v in found.items() if k not in components})
    schema = copy.deepcopy(found[struct.__name__])
    props = schema["properties"]
    props["model"] = {"type": "string", "enum": [model_name],
                      "description": "The served model's name (as /v1/models lists it)."}
    token_id = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    props["stop_token_ids"] = {"anyOf": [{"type": "array", "items": token_id}, {"type": "null"}], "default": None}
    props["logit_bias"] = {"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}], "default": None,
                           "description": "Not supported: a non-empty map is refused (400)."}
    if "prompt" in props:
        text = {"type": "string", "minLength": 1}
        ids = {"type": "array", "items": token_id, "minItems": 1}
        props["prompt"] = {"anyOf": [text, {"type": "array", "items": text, "minItems": 1}, ids,
                                     {"type": "array", "items": ids, "minItems": 1}],
                           "description": "A string, a list of strings, a list of token ids, or a list of lists "
                                          "of token ids (not a mix); each prompt is a request of its own."}
        props["suffix"] = {"anyOf": [{"type": "string", "maxLength": 0}, {"type": "null"}], "default": None,
                           "description": "Not supported: a non-empty suffix is refused (400)."}
        props["best_of"]["description"] = "Accepted only equal to n (400 otherwise)."
    schema["title"] = struct.__name__
    schema["description"] = _rules(struct)
    return schema


def _rules(struct) -> str:
    common = ("Rules between fields (a 400 names the one broken): the prompt's tokens plus max_tokens fit the "
              "context window (max_model_len in /v1/models); min_tokens <= max_tokens; stream_options only with "
              "stream true; at most one of response_format (other than text), guided_regex and guided_choice, "
              "and the regex or JSON schema compiles for constrained decoding.")
    if struct is CompletionRequest:
        return common + " best_of, if given, equals n."
    return common + (" tool_choice other than \"none\" needs tools (a named function among them; \"auto\" needs "
                     "the server's tool-call parser) and is not combined with response_format or guided_*; "
                     "top_logprobs needs logprobs true.")


def _body_schema(struct, components: dict) -> dict:
    (ref,), found = msgspec.json.schema_components([struct], ref_template=REF)
    components.update({k: v for k, v in found.items() if k not in components})
    return ref


def _generate(summary: str, request: str, response: str, chunk: str) -> dict:
    return {
        "summary": summary,
        "operationId": summary.replace(" ", "_").lower(),
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": REF.format(name=request)}}}},
        "responses": {
            "200": {"description": "The answer: JSON, or server-sent events when `stream` is true.",
                    "content": {"application/json": {"schema": {"$ref": REF.format(name=response)}},
                                **_event_stream(chunk)}},
            **{status: _error(text) for status, text in ERRORS.items()},
        },
    }


def openapi_document(model_name: str, vocab_size: int, version: str) -> dict:
    components: dict = {}
    components["CompletionRequest"] = _request_schema(CompletionRequest, model_name, vocab_size, components)
    components["ChatCompletionRequest"] = _request_schema(ChatCompletionRequest, model_name, vocab_size, components)
    refs = {}
    for struct in (ErrorResponse, Completion, ChatCompletion, CompletionChunk, ChatCompletionChunk, ModelList, Healthy,
                   Unhealthy):
        refs[struct.__name__] = _body_schema(struct, components)
    json_of = lambda name, description: {"description": description,  # noqa: E731
                                         "content": {"application/json": {"schema": refs[name]}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "ptp", "version": version,
                 "description": "OpenAI-compatible completions and chat completions served by ptp. Unknown fields "
                                "are refused (400), not ignored."},
        "paths": {
            "/v1/completions": {"post": _generate("Create completion", "CompletionRequest", "Completion",
                                                           "CompletionChunk")},
            "/v1/chat/completions": {"post": _generate("Create chat completion", "ChatCompletionRequest",
                                                            "ChatCompletion", "ChatCompletionChunk")},
            "/v1/models": {"get": {"summary": "List models", "operationId": "list_models",
                                   "responses": {"200": json_of("ModelList", "The served model.")}}},
            "/health": {"get": {"summary": "Health", "operationId": "health", "responses": {
                "200": json_of("Healthy", "The engine is running."),
                "503": json_of("Unhealthy", "The engine has stopped; `error` says why.")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics", "responses": {
                "200": {"description": "Prometheus text format (names as vLLM's, `ptp:` for `vllm:`).",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": components},
    }
