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


def test_streamed_content_stops_where_a_call_may_begin():
    """Content goes out piece by piece, minus a tail that could be the start of <tool_call>; the call
    itself comes as one tool_calls delta at the end."""
    from ptp.serve import ToolStream
    from ptp.tool_parsers import ToolPlan

    plan = ToolPlan([{"type": "function", "function": {"name": "f"}}], "auto", True, HermesParser())
    s = ToolStream(plan)
    pieces = ["Sure", ", one mo", "ment <", "tool_", 'call>{"name": "f", ', '"arguments": {"a": 1}}</tool_call>']
    sent = [s.feed(p) for p in pieces]
    assert "".join(sent) == "Sure, one moment "
    assert sent[2] == "ment "  # "<" held back: it may open a call
    (delta,) = s.finish()
    (tc,) = delta["tool_calls"]
    assert tc["index"] == 0 and tc["function"]["name"] == "f" and json.loads(tc["function"]["arguments"]) == {"a": 1}
    assert s.finish_reason("stop") == "tool_calls"
    plain = ToolStream(plan)
    assert plain.feed("a < b") == "a < b" and plain.feed(" <") == " " and plain.finish() == [{"content": "<"}]
