"""Structured output and the sampling extras through the official `openai` client (one server)."""

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.server_utils import running_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 24},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "kind": {"enum": ["human", "robot", "cat"]},
    },
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
}

TOPICS = ["a painter from Lyon", "a retired sailor", "a robot that bakes bread", "my neighbour's cat",
          "a chess champion", "a young astronaut", "a baker in Rome", "a hacker", "a famous violinist",
          "a gardener", "a marathon runner", "a lighthouse keeper", "a teacher of maths", "a street musician",
          "a doctor in Lagos", "a pilot", "a librarian", "a fisherman", "a software engineer", "a poet"]


@pytest.fixture(scope="module")
def server():
    with running_server("--max-model-len", "1024", "--max-queue", "64") as (url, proc):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def test_json_schema_output_parses_and_validates_on_20_prompts(server):
    client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    async def one(topic: str, temperature: float):
        return await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Describe {topic} as a JSON object."}],
            response_format=fmt, temperature=temperature, seed=3, max_tokens=200)

    async def main():
        return await asyncio.gather(*(one(t, 0.0 if i % 2 else 0.8) for i, t in enumerate(TOPICS)))

    for r in asyncio.run(main()):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_streamed_json_equals_the_non_streamed_result(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "A city as JSON."}], temperature=0,
                  max_tokens=200,
                  response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}})
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    jsonschema.validate(json.loads(full), PERSON)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True)
                       if c.choices)
    assert streamed == full


def test_json_object_gives_an_object(client):
    ask = [{"role": "user", "content": 'Reply with {"ok": true} and nothing else.'}]
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=100, messages=ask,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_vllm_fields_choice_regex_and_grammar(client):
    choices = ["red", "green", "blue"]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick a colour."}],
                                           temperature=1.0, n=4, seed=5, max_tokens=10, extra_body=extra)
        assert {c.message.content for c in r.choices} <= set(choices)
    r = client.completions.create(model=MODEL, prompt="My phone number is", temperature=0.7, seed=1, max_tokens=30,
                                  extra_body={"guided_regex": r"\(\d{3}\) \d{3}-\d{4}"})
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", r.choices[0].text), r.choices[0].text
    grammar = 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[0-9]+/'
    r = client.completions.create(model=MODEL, prompt="Will it rain?", temperature=0, max_tokens=10,
                                  extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"yes|no|maybe [0-9]+", r.choices[0].text), r.choices[0].text


def test_constrained_and_free_requests_run_side_by_side(client):
    """A free request in the same batch as constrained ones is unchanged (the mask is per row)."""
    free = dict(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=16)
    alone = client.completions.create(**free).choices[0].text

    async def main():
        c = openai.AsyncOpenAI(base_url=client.base_url, api_key="unused")
        jobs = [c.completions.create(**free)] + [
            c.completions.create(model=MODEL, prompt=f"Item {i}:", temperature=0, max_tokens=40,
                                 extra_body={"structured_outputs": {"json": PERSON}}) for i in range(3)]
        return await asyncio.gather(*jobs)

    first, *constrained = asyncio.run(main())
    assert first.choices[0].text == alone
    for r in constrained:
        assert r.choices[0].text.startswith("{")


def _token(server: str, text: str) -> int:
    ids = httpx.post(f"{server}/tokenize", json={"model": MODEL, "prompt": text, "add_special_tokens": False}).json()
    assert len(ids["tokens"]) == 1, ids
    return ids["tokens"][0]


def test_logit_bias_forbids_and_forces_tokens(server, client):
    prompt = "The capital of France is"
    greedy = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=1, logprobs=0)
    first = greedy.choices[0].logprobs.tokens[0]
    banned = _token(server, first)
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=1, logprobs=0,
                                  logit_bias={str(banned): -100})
    assert r.choices[0].logprobs.tokens[0] != first
    forced = _token(server, " banana")
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=5,
                                  logit_bias={str(forced): 100})
    assert r.choices[0].text == " banana" * 5


def test_echo_puts_the_prompt_before_the_text(client):
    prompt = "The three primary colours are"
    plain = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
    echoed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    stream = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in stream) == echoed.choices[0].text
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens


def test_min_tokens_holds_back_the_stop_token(client):
    q = [{"role": "user", "content": "Say hi."}]
    short = client.chat.completions.create(model=MODEL, messages=q, temperature=0, max_tokens=100)
    assert short.choices[0].finish_reason == "stop"
    n = short.usage.completion_tokens + 10
    longer = client.chat.completions.create(model=MODEL, messages=q, temperature=0, max_tokens=100,
                                            extra_body={"min_tokens": n})
    assert longer.usage.completion_tokens >= n


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _schema(name):
    return next(t["function"]["parameters"] for t in (WEATHER, TIME) if t["function"]["name"] == name)


def test_a_forced_tool_call_returns_arguments_that_validate(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=80,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), _schema("get_weather"))


def test_required_tool_calls_validate_and_say_tool_calls(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=120,
                                       tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), _schema(call.function.name))


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_streamed_tool_call_deltas_reassemble_to_the_non_streamed_result(client, tool_choice):
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=120,
                  tool_choice=tool_choice)
    full = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                call["name"] += d.function.name or "" if d.function else ""
                call["arguments"] += d.function.arguments or "" if d.function else ""
    want = [{"name": t.function.name, "arguments": t.function.arguments} for t in full.message.tool_calls]
    assert [calls[i] for i in sorted(calls)] == want
    assert [r for r in reasons if r] == [full.finish_reason]


def test_a_conversation_with_calls_and_results_renders(client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=30)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tools_get_a_400_naming_the_field(server, body, param):
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_echo_with_logprobs_and_prompt_logprobs_shapes(server, client):
    prompt = "The capital of France is"
    n_prompt = len(httpx.post(f"{server}/tokenize", json={"model": MODEL, "prompt": prompt}).json()["tokens"])
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, logprobs=2, echo=True,
                                  extra_body={"prompt_logprobs": 1})
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == c.text and c.text.startswith(prompt)
    prompt_lps = c.model_extra["prompt_logprobs"]
    assert len(prompt_lps) == n_prompt and prompt_lps[0] is None
    for entry, value in zip(prompt_lps[1:], lp.token_logprobs[1:n_prompt]):
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[0] >= 1 and any(e["logprob"] == pytest.approx(value, abs=1e-4) for e in entry.values())
    stream = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=4, logprobs=2,
                                            echo=True, stream=True))
    assert "".join(ch.choices[0].text for ch in stream) == c.text
    streamed = [v for ch in stream if ch.choices[0].logprobs for v in ch.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    chat = httpx.post(f"{server}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prompt_logprobs": 0},
        timeout=60).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


def test_truncate_prompt_tokens_keeps_the_last_tokens(server, client):
    prompt = "one two three four five six seven eight nine ten"
    ids = httpx.post(f"{server}/tokenize", json={"model": MODEL, "prompt": prompt}).json()["tokens"]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0,
                                  extra_body={"truncate_prompt_tokens": 4})
    same = client.completions.create(model=MODEL, prompt=ids[-4:], max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == 4 and r.choices[0].text == same.choices[0].text
