"""Tool-call parsing and streaming on fabricated model output (no model)."""

import json

import pytest

from batchpilot.server.errors import APIError
from batchpilot.server.tools import ToolPlan, ToolStream, hermes_messages, tool_plan

FN = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": FN}]


def stream(plan, pieces):
    ts = ToolStream(plan)
    deltas = [d for p in pieces for d in ts.feed(p)]
    last, calls = ts.finish()
    return deltas + last, calls


def test_auto_reads_hermes_calls_and_the_content_before_them():
    plan = tool_plan(TOOLS, None)
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>')
    content, calls = plan.parse(text)
    assert content == "Let me check.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert len({c["id"] for c in calls}) == 2 and plan.finish_reason("stop", calls) == "tool_calls"
    assert plan.finish_reason("length", calls) == "length"


def test_auto_without_a_well_formed_call_is_plain_content():
    plan = tool_plan(TOOLS, "auto")
    for text in ("Sunny today.", "<tool_call>{not json</tool_call>", "<tool_call>{\"arguments\": {}}"):
        assert plan.parse(text) == (text, [])


def test_auto_streams_content_but_holds_a_split_tag_and_sends_calls_at_the_end():
    plan = tool_plan(TOOLS, None)
    pieces = ["Let me ", "check. <to", "ol_call>{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": \"Oslo\"}}",
              "</tool_call>"]
    deltas, calls = stream(plan, pieces)
    content = "".join(d.get("content", "") for d in deltas)
    assert content == "Let me check. "
    assert [d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d] == ['{"city": "Oslo"}']
    # a "<" that turns out not to open a call is sent after all
    deltas, calls = stream(plan, ["a <", "b"])
    assert "".join(d.get("content", "") for d in deltas) == "a <b" and calls == []


def test_named_streams_arguments_as_they_come():
    plan = tool_plan(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    deltas, calls = stream(plan, ['{"city"', ': "Oslo"}'])
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"city": "Oslo"}'
    assert calls[0]["function"]["arguments"] == '{"city": "Oslo"}' and plan.finish_reason("stop", calls) == "stop"


def test_required_constrains_to_an_array_of_calls():
    plan = tool_plan(TOOLS, "required")
    schema = plan.constraint().json
    assert schema["type"] == "array" and schema["minItems"] == 1
    content, calls = plan.parse('[{"name": "get_weather", "parameters": {"city": "Lima"}}]')
    assert content == "" and json.loads(calls[0]["function"]["arguments"]) == {"city": "Lima"}


def test_a_template_without_tools_gets_them_as_text():
    plan = tool_plan(TOOLS, None)
    msgs = hermes_messages([
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                         "arguments": '{"city": "Lima"}'}}]},
        {"role": "tool", "content": "21C"}], plan)
    assert msgs[0]["role"] == "system" and "get_weather" in msgs[0]["content"]
    assert '"arguments": {"city": "Lima"}' in msgs[2]["content"]
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n21C\n</tool_response>"}
    assert hermes_messages([{"role": "user", "content": "hi"}], ToolPlan("none", [FN])) == [
        {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("tools,choice,param", [
    (None, "required", "tool_choice"), ([{"type": "function"}], None, "tools"), (TOOLS, "always", "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "other"}}, "tool_choice")])
def test_bad_plans_name_the_field(tools, choice, param):
    with pytest.raises(APIError) as e:
        tool_plan(tools, choice)
    assert e.value.param == param


def test_parallel_tool_calls_false_keeps_one_call():
    plan = tool_plan(TOOLS, "required", parallel=False)
    assert plan.constraint().json["maxItems"] == 1
    auto = tool_plan(TOOLS, None, parallel=False)
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call><tool_call>{"name": "x", "arguments": {}}'
    assert len(auto.parse(text)[1]) == 1
