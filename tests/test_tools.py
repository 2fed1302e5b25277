"""Tool calls over nanochat's chat format (serve/tools.py): tools described in the system message, calls and results
rendered into alternating turns, calls read back from a reply."""
import json

import pytest

from serve.protocol import ApiError, Message, conversation
from serve.tools import CALL_CLOSE, CALL_OPEN, check_tools, may_be_call, parse_calls, render

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tool_choice_modes():
    assert check_tools(None, None) == ({}, None)
    tools, mode = check_tools([WEATHER], None)
    assert list(tools) == ["get_weather"] and mode == "auto"
    assert check_tools([WEATHER], "none")[1] is None and check_tools([WEATHER], "required")[1] == "required"
    assert check_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}})[1] == "get_weather"
    for tools, choice in (([WEATHER], "sometimes"), ([WEATHER], {"function": {"name": "other"}}), (None, "auto"),
                          ([{"type": "retrieval"}], None), ([{"function": {"name": ""}}], None)):
        with pytest.raises(ApiError):
            check_tools(tools, choice)


def test_a_conversation_with_calls_and_results_renders_as_alternating_turns(tiny_tokenizer):
    tools, _ = check_tools([WEATHER], "auto")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [Message(role="system", content="Be brief."), Message(role="user", content="Weather in Paris?"),
                Message(role="assistant", content=None, tool_calls=[call]),
                Message(role="tool", tool_call_id="call_1", content="21 C"),
                Message(role="user", content="And tomorrow?")]
    out = render(messages, tools)
    assert [m.role for m in out] == ["system", "user", "assistant", "user"]
    assert out[0].content.startswith("You can call these functions") and out[0].content.endswith("Be brief.")
    assert json.loads(out[0].content.splitlines()[1])["name"] == "get_weather"
    assert out[2].content == CALL_OPEN + '{"name": "get_weather", "arguments": {"city": "Paris"}}' + CALL_CLOSE
    assert out[3].content == '<tool_result name="get_weather">21 C</tool_result>\nAnd tomorrow?'
    ids, _ = tiny_tokenizer.render_conversation(conversation(out))  # nanochat's template takes it
    assert ids[0] == tiny_tokenizer.get_bos_token_id()
    assert render([Message(role="user", content="hi")], {})[0].content == "hi"  # no tools: nothing added
    with pytest.raises(ApiError, match="arguments"):
        render([Message(role="assistant", tool_calls=[{"id": "x", "function": {"name": "f", "arguments": "{"}}])],
               tools)


def test_a_reply_is_a_call_only_when_it_is_nothing_but_calls_of_known_tools():
    tools, _ = check_tools([WEATHER], "auto")
    call = CALL_OPEN + '{"name": "get_weather", "arguments": {"city": "Oslo"}}' + CALL_CLOSE
    (parsed,) = parse_calls(" " + call + "\n", tools)
    assert parsed["function"]["name"] == "get_weather" and json.loads(parsed["function"]["arguments"]) == \
        {"city": "Oslo"}
    assert len(parse_calls(call + call, tools)) == 2
    for text in ("It is sunny.", call + " and more", CALL_OPEN + '{"name": "other", "arguments": {}}' + CALL_CLOSE,
                 CALL_OPEN + "{not json" + CALL_CLOSE, CALL_OPEN + '{"name": "get_weather"}' + CALL_CLOSE):
        assert parse_calls(text, tools) is None, text
    assert may_be_call(" <tool") and may_be_call(call[:20]) and not may_be_call("Sunny") and not may_be_call("<b>")
