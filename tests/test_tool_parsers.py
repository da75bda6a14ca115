"""Tool-call parsers per model family, on fixed model outputs."""
import json

import pytest

from ptp.tool_parsers import HermesParser, Llama3JsonParser, MistralParser, call_schema, parser_for


def _calls(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


def test_hermes_qwen_calls_and_content():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')
    p = HermesParser().parse(text)
    assert p.content == "Let me check."
    assert _calls(p) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert len({c.id for c in p.tool_calls}) == 2


@pytest.mark.parametrize("text", ["no tools here", '<tool_call>{"name": "f", "arguments": {"a": </tool_call>',
                                  '<tool_call>{"arguments": {}}</tool_call>'])
def test_hermes_leaves_what_is_not_a_call_as_content(text):
    p = HermesParser().parse(text)
    assert p.tool_calls == [] and p.content == text


def test_llama3_json_with_python_tag_and_several_calls():
    p = Llama3JsonParser().parse('<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}')
    assert _calls(p) == [("a", {"x": 1}), ("b", {})] and p.content is None
    assert Llama3JsonParser().parse('The answer is {"name": 1}').tool_calls == []
    assert Llama3JsonParser().parse("Plain text.").content == "Plain text."


def test_mistral_both_formats():
    p = MistralParser().parse('[TOOL_CALLS] [{"name": "f", "arguments": {"q": "x"}}, {"name": "g", "arguments": {}}]')
    assert _calls(p) == [("f", {"q": "x"}), ("g", {})] and p.content is None
    p = MistralParser().parse('Sure. [TOOL_CALLS]f[ARGS]{"q": "y"}[TOOL_CALLS]g[ARGS]{}')
    assert _calls(p) == [("f", {"q": "y"}), ("g", {})] and p.content == "Sure."
    assert MistralParser().parse("[TOOL_CALLS] [{oops").tool_calls == []


def test_parser_chosen_from_template_type_or_flag():
    assert isinstance(parser_for("{{ '<tool_call>' }}", "llama"), HermesParser)
    assert isinstance(parser_for(None, "qwen3"), HermesParser)
    assert isinstance(parser_for(None, "mistral"), MistralParser)
    assert isinstance(parser_for(None, "llama"), Llama3JsonParser)
    assert isinstance(parser_for(None, "qwen2", "mistral"), MistralParser)
    assert parser_for(None, "gpt2") is None
    with pytest.raises(ValueError, match="hermes"):
        parser_for(None, None, "nope")


def test_call_schema_compiles_and_accepts_a_call():
    import jsonschema

    from ptp.structured import grammar_for

    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]
    for parallel in (False, True):
        schema = call_schema(tools, parallel)
        grammar_for(json_schema=schema)
        call = {"name": "f", "arguments": {"a": 3}}
        jsonschema.validate([call] if parallel else call, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"name": "g", "arguments": {"a": 3}}, schema)


def _plan(parser=None, tool_choice="auto", parallel=True):
    from ptp.tool_parsers import ToolPlan

    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("f", "g")]
    return ToolPlan(tools, tool_choice, parallel, parser)


def _stream(plan, pieces):
    """Every delta a ToolStream sends for the output in these pieces, and the stream itself."""
    from ptp.tool_parsers import ToolStream

    s = ToolStream(plan)
    deltas = [d for p in pieces for d in s.feed(p)]
    return deltas + s.finish(), s


def _accumulate(deltas):
    """Content and tool calls from deltas, the way the openai documentation accumulates them."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content") or ""
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or tc.get("id")
            call["name"] += tc.get("function", {}).get("name") or ""
            call["arguments"] += tc["function"].get("arguments") or ""
    return content, [calls[k] for k in sorted(calls)]


HERMES_OUT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2], '
              '"q": "a \\"}\\" b"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}'
              '\n</tool_call>')
LLAMA_OUT = ('<|python_tag|>{"name": "a", "parameters": {"x": 1, "y": {"z": [1, {"w": "}"}]}}}; '
             '{"name": "b", "parameters": {}}')
MISTRAL_ARRAY = 'Sure. [TOOL_CALLS] [{"name": "f", "arguments": {"q": "x]"}}, {"name": "g", "arguments": {}}]'
MISTRAL_NAMED = '[TOOL_CALLS]f[ARGS]{"q":"y",  "n": 10}[TOOL_CALLS]g[ARGS]{}'  # spaced as written


@pytest.mark.parametrize("parser, text", [(HermesParser(), HERMES_OUT), (Llama3JsonParser(), LLAMA_OUT),
                                          (MistralParser(), MISTRAL_ARRAY), (MistralParser(), MISTRAL_NAMED)],
                         ids=["hermes", "llama3_json", "mistral_array", "mistral_named"])
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_calls_stream_at_argument_level(parser, text, step):
    """Fed a fixed output piece by piece (one character, three, all at once): each call's first delta
    has its index, id, type, name and arguments ""; the later ones only argument fragments, sent as
    they are written; the fragments add up to the non-streaming call's arguments, exactly."""
    want = parser.parse(text)
    deltas, s = _stream(_plan(parser), [text[i: i + step] for i in range(0, len(text), step)])
    content, calls = _accumulate(deltas)
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in want.tool_calls]
    assert len(calls) == 2 and all(json.loads(c["arguments"]) is not None for c in calls)
    assert (content.strip() or None) == want.content
    firsts = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            if tc["index"] not in firsts:
                firsts[tc["index"]] = tc
                assert tc["type"] == "function" and tc["id"].startswith("call_") and tc["function"]["arguments"] == ""
                assert tc["function"]["name"] == want.tool_calls[tc["index"]].name
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
    assert sorted(firsts) == [0, 1] and firsts[0]["id"] != firsts[1]["id"]
    fragments = [tc for d in deltas for tc in d.get("tool_calls", []) if tc["index"] == 0 and "id" not in tc]
    if step == 1:  # the arguments went out as written, not as one piece at the end
        assert len(fragments) == len(want.tool_calls[0].arguments)
        assert s.finish_reason("stop") == "tool_calls"


@pytest.mark.parametrize("parallel, text", [
    (False, '{"name": "f", "arguments": {"a": [1, 2], "b": "x{"}}'),
    (True, '[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": {}}}]'),
])
def test_forced_calls_stream_at_argument_level(parallel, text):
    """tool_choice "required" (the grammar's JSON, one call or an array of them) streams the same way."""
    plan = _plan(tool_choice="required", parallel=parallel)
    deltas, _ = _stream(plan, list(text))
    content, calls = _accumulate(deltas)
    assert content == ""
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in plan.parse(text).tool_calls]
    assert len(calls) == (2 if parallel else 1)
    assert sum(1 for d in deltas for tc in d["tool_calls"] if tc["index"] == 0) > 5


def test_llama3_content_streams_at_once_and_a_non_call_stays_content():
    deltas, _ = _stream(_plan(Llama3JsonParser()), ["The", " answer", " is 4."])
    assert deltas[:2] == [{"content": "The"}, {"content": " answer"}]
    for text in ['{"answer": 4}', '{"name": 1, "parameters": {}}']:
        deltas, s = _stream(_plan(Llama3JsonParser()), list(text))
        assert _accumulate(deltas) == (text, []) and s.finish_reason("stop") == "stop"


def test_a_call_cut_short_keeps_what_was_sent():
    text = '<tool_call>{"name": "f", "arguments": {"city": "Par'
    deltas, s = _stream(_plan(HermesParser()), list(text))
    content, calls = _accumulate(deltas)
    assert content == "" and calls[0]["name"] == "f" and calls[0]["arguments"] == '{"city": "Par'
    assert s.finish_reason("length") == "length"


def test_arguments_written_as_a_json_string():
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    (call,) = HermesParser().parse(text).tool_calls
    assert call.arguments == '{"a": 1}'
    deltas, _ = _stream(_plan(HermesParser()), list(text))
    assert _accumulate(deltas)[1] == [{"id": deltas[0]["tool_calls"][0]["id"], "name": "f", "arguments": '{"a": 1}'}]


def test_streamed_content_stops_where_a_call_may_begin():
    """Content goes out piece by piece, minus a tail that could be the start of <tool_call>."""
    plan = _plan(HermesParser())
    pieces = ["Sure", ", one mo", "ment <", "tool_", 'call>{"name": "f", ', '"arguments": {"a": 1}}</tool_call>']
    deltas, s = _stream(plan, pieces)
    content, calls = _accumulate(deltas)
    assert content == "Sure, one moment "
    assert deltas[2] == {"content": "ment "}  # "<" held back: it may open a call
    assert calls[0]["name"] == "f" and json.loads(calls[0]["arguments"]) == {"a": 1}
    assert s.finish_reason("stop") == "tool_calls"
    deltas, _ = _stream(plan, ["a < b", " <"])
    assert deltas == [{"content": "a < b"}, {"content": " "}, {"content": "<"}]
