"""The HTTP API end to end, with the official `openai` client and raw HTTP (one shared server)."""

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.server_utils import metric, running_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    with running_server("--max-model-len", "512", "--max-queue", "256", "--sla-class", "interactive:tpot=60,ttft=2000",
                        "--sla-class", "batch") as (url, proc):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused")


def test_chat_answers_and_stream_equals_non_stream(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    text = full.choices[0].message.content
    assert "Paris" in text and full.choices[0].finish_reason == "stop"
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_completion_stream_equals_non_stream_and_usage_adds_up(client):
    prompt = "The three primary colours are"
    full = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24)
    u = full.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens == 24
    assert full.choices[0].finish_reason == "length"
    stream = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24, stream=True)
    assert "".join(c.choices[0].text for c in stream) == full.choices[0].text


def test_n_two_gives_two_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, n=2, temperature=1.0, seed=7, max_tokens=12)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 24  # both choices counted, each at most max_tokens
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", n=2, max_tokens=5, stream=True,
                                            temperature=0.8, seed=1))
    assert {c.choices[0].index for c in chunks} == {0, 1}


def test_stop_string_is_cut(client):
    full = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=20).choices[0].text
    assert " 6," in full
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=20, stop=[" 6,"])
    assert cut.choices[0].text == full[: full.index(" 6,")] and cut.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", temperature=0, max_tokens=20,
                                       stop=" 6,", stream=True)
    assert "".join(c.choices[0].text for c in stream) == cut.choices[0].text


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=5, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and len(content[0].top_logprobs) == 3
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy picks the top
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, logprobs=2, temperature=0)
    assert len(c.choices[0].logprobs.token_logprobs) == 3 and len(c.choices[0].logprobs.top_logprobs[0]) == 2


def test_models_health_version_metrics(server, client):
    assert [m.id for m in client.models.list().data][0] == MODEL
    assert httpx.get(f"{server}/health").status_code == 200
    assert "version" in httpx.get(f"{server}/version").json()
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=2)  # latency histograms need a request
    text = httpx.get(f"{server}/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                 "time_to_first_token_seconds_bucket", "request_time_per_output_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "request_queue_time_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "generation_tokens_total", "prompt_tokens_total",
                 "batch_limit", "batch_limit_memory", "batch_size", "prefix_cache_queries_total",
                 "prefix_cache_hits_total"):
        assert f"batchpilot:{name}" in text, name


def test_a_repeated_prefix_is_served_from_the_cache_and_reported(server, client):
    instruction = "Answer in one word, and never explain the answer you give. " * 6  # about 70 tokens
    first = client.completions.create(model=MODEL, prompt=instruction + "Sky colour?", max_tokens=2)
    hits_before = metric(server, "batchpilot:prefix_cache_hits_total")
    second = client.completions.create(model=MODEL, prompt=instruction + "Grass colour?", max_tokens=2)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 48 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < cached
    assert metric(server, "batchpilot:prefix_cache_hits_total") - hits_before == cached


def test_models_carry_vllms_root_and_tokenize_round_trips(server):
    from pathlib import Path

    card = httpx.get(f"{server}/v1/models").json()["data"][0]
    assert card["id"] == MODEL and card["parent"] is None and card["max_model_len"] == 512
    assert (Path(card["root"]) / "tokenizer.json").exists()  # vLLM's bench client loads its tokenizer there
    assert httpx.get(f"{server}/v1/models/{MODEL}").json()["root"] == card["root"]
    r = httpx.post(f"{server}/tokenize", json={"model": MODEL, "prompt": "Hello world", "return_token_strs": True})
    body = r.json()
    assert r.status_code == 200 and body["count"] == len(body["tokens"]) == 2 and body["max_model_len"] == 512
    assert "".join(body["token_strs"]).replace("Ġ", " ") == "Hello world"
    assert httpx.post(f"{server}/detokenize", json={"tokens": body["tokens"]}).json() == {"prompt": "Hello world"}
    chat = httpx.post(f"{server}/tokenize", json={"messages": QUESTION}).json()
    rendered = httpx.post(f"{server}/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert "What is the capital of France?" in rendered and rendered.rstrip().endswith("assistant")


LONG = "word " * 600
BAD_INPUTS = [
    # (path, body, status, param)
    ("/tokenize", {"model": MODEL}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": QUESTION}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": "x"}, 400, "tokens"),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "temperature": 5}, 400, "temperature"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "top_p": 1.5}, 400, "top_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "top_k": -5}, 400, "top_k"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "min_p": 2}, 400, "min_p"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "n": 100}, 400, "n"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "max_completion_tokens": -1}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "frequency_penalty": -3}, 400,
     "frequency_penalty"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "stop": 5}, 400, "stop"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "seed": "x"}, 400, "seed"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "top_logprobs": 50, "logprobs": True}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "response_format": {"type": "xml"}},
     400, "response_format"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "response_format": {"type": "json_schema"}},
     400, "response_format"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "response_format": {"type": "json_object"},
                              "guided_regex": "a+"}, 400, "guided_regex"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "guided_regex": "(("}, 400, "guided_regex"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "guided_choice": []}, 400, "guided_choice"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "guided_grammar": "start: nothere"}, 400,
     "guided_grammar"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "structured_outputs": {"xml": "<a/>"}}, 400,
     "structured_outputs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION,
                              "structured_outputs": {"regex": "a", "choice": ["b"]}}, 400, "structured_outputs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "allowed_token_ids": [99999999]}, 400,
     "allowed_token_ids"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "allowed_token_ids": []}, 400, "allowed_token_ids"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "bad_words": [" "]}, 400, "bad_words"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "min_tokens": 50, "max_tokens": 10}, 400,
     "min_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "repetition_penalty": 0}, 400,
     "repetition_penalty"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": QUESTION}, 404, "model"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 999999]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [-1]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 600}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "use_beam_search": True}, 400, "use_beam_search"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "functions": [{"name": "f"}]}, 400, "functions"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "function_call": "auto"}, 400, "function_call"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "modalities": ["text", "audio"]}, 400,
     "modalities"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "audio": {"voice": "x"}}, 400, "audio"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "prediction": {"type": "content"}}, 400,
     "prediction"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "prompt_logprobs": -1}, 400, "prompt_logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop_token_ids": [-4]}, 400, "stop_token_ids"),
    ("/v1/completions", {"model": MODEL, "prompt": 12}, 400, "prompt"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "a\ud800b"}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", "\udc00"]}, 400, "prompt.1"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x\udc00"}]}, 400,
     "messages.0.content"),
    ("/tokenize", {"model": MODEL, "prompt": "\ud800"}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "sla_class": "gold"}, 400, "sla_class"),
    ("/v1/chat/completions", {"model": MODEL, "messages": QUESTION, "sla_class": 5}, 400, "sla_class"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "priority": 1}, 400, "priority"),  # fcfs: vLLM's rule
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "priority": "high"}, 400, "priority"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_INPUTS, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_gets_an_openai_error_naming_the_field(server, path, body, status, param):
    # json.dumps escapes a lone surrogate as \\ud800, as a client in any language may send it
    r = httpx.post(f"{server}{path}", content=json.dumps(body), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if param:
        assert param.split(".")[0] in error["message"]


def _health_latency_during(url: str, request) -> tuple[httpx.Response, float]:
    """Run `request` on a thread and poll /health meanwhile: its response and the slowest poll (s).
    The polls share one client, built before: a new httpx client per poll spends tens of ms of its
    own building a TLS context, which is not the server's latency."""
    done: dict[str, httpx.Response] = {}
    with httpx.Client(timeout=10) as poller:
        poller.get(f"{url}/health")
        worker = threading.Thread(target=lambda: done.setdefault("r", request()))
        worker.start()
        worst = 0.0
        while worker.is_alive():
            start = time.perf_counter()
            assert poller.get(f"{url}/health").status_code == 200
            worst = max(worst, time.perf_counter() - start)
    worker.join()
    return done["r"], worst


def test_huge_bodies_and_prompts_are_refused_without_stalling_the_server(server):
    headers = {"content-type": "application/json"}
    huge = json.dumps({"model": MODEL, "prompt": "x" * (20 * 2**20)}).encode()  # 20 MB: over the body limit
    r, worst = _health_latency_during(
        server, lambda: httpx.post(f"{server}/v1/completions", content=huge, headers=headers, timeout=60))
    # The defect this guards against held every route for 10 s; the bound leaves room for a busy CI host
    # (the sender thread of this process competes with the poller for the GIL).
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large" and worst < 1.0
    # 10 MB of text: under the body limit, but more characters than 512 tokens can stand for. It is
    # refused without encoding (which would take over 10 s); parsing the JSON still holds the event
    # loop for a moment, bounded by the body limit.
    big = {"model": MODEL, "prompt": "ab " * (3 * 2**20 + 2**19)}
    r, worst = _health_latency_during(server, lambda: httpx.post(f"{server}/v1/completions", json=big, timeout=60))
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and worst < 1.0
    # 30,000 characters: must be encoded to be judged (that it runs off the event loop is
    # test_serving_encodes_off_the_event_loop's: 30,000 characters encode in ~10 ms here)
    long = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 6000}]}
    r = httpx.post(f"{server}/v1/chat/completions", json=long, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_malformed_json_and_unknown_routes(server):
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{server}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(f"{server}/v1/models/unknown-model")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def test_concurrent_streams_with_disconnects_free_every_block(server):
    async def one(client, i):
        body = {"model": MODEL, "prompt": f"Story number {i}:", "max_tokens": 40, "temperature": 0.7, "seed": i,
                "stream": True, "ignore_eos": True}
        text, chunks = "", 0
        async with client.stream("POST", f"{server}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "done", text
                chunk = json.loads(line[6:])
                text += chunk["choices"][0]["text"]
                chunks += 1
                if i < 10 and chunks == 10:
                    return "left", text  # leaving the context manager closes the connection mid-stream
        return "truncated", text

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert [r[0] for r in results[:10]] == ["left"] * 10
    assert [r[0] for r in results[10:]] == ["done"] * 54
    assert all(len(r[1]) > 0 for r in results)
    import time

    deadline = time.monotonic() + 30
    while metric(server, "batchpilot:num_requests_running") or metric(server, "batchpilot:kv_cache_usage_perc"):
        assert time.monotonic() < deadline, "blocks were not freed"
        time.sleep(0.2)
    assert metric(server, "batchpilot:num_requests_waiting") == 0


def test_requests_name_their_sla_class_in_the_body_or_a_header(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3}
    assert httpx.post(f"{server}/v1/completions", json=body | {"sla_class": "interactive"}).status_code == 200
    r = httpx.post(f"{server}/v1/completions", json=body, headers={"x-batchpilot-sla": "batch"})
    assert r.status_code == 200
    r = httpx.post(f"{server}/v1/completions", json=body, headers={"x-batchpilot-sla": "gold"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-batchpilot-sla"
    assert "gold" in r.json()["error"]["message"] and "interactive" in r.json()["error"]["message"]
    # /metrics counts each class's finished requests against its targets (the batch class has none)
    # (whether the interactive one met 60 ms per token on this host is not the point here)
    labels = 'batchpilot:sla_class_requests_total{{attained="{}",model_name="{}",sla_class="{}"}}'
    text = httpx.get(f"{server}/metrics").text
    assert labels.format("true", MODEL, "interactive") in text or labels.format("false", MODEL, "interactive") in text
    assert metric(server, labels.format("none", MODEL, "batch")) >= 1


def test_bench_serve_reports_each_sla_class(server, tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run(
        [sys.executable, "-m", "batchpilot.cli", "bench", "serve", "--base-url", server, "--num-prompts", "8",
         "--input-len", "8", "--output-len", "4", "--ignore-eos", "--sla-mix", "interactive:0.5,batch:0.5",
         "--sla-class", "interactive:tpot=60000,ttft=60000", "--no-progress", "--output-json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    classes = result["classes"]
    assert result["completed"] == 8 and set(classes) == {"interactive", "batch"}
    assert classes["interactive"]["completed"] + classes["batch"]["completed"] == 8
    assert classes["interactive"]["sla_attainment"] == 1.0 and "sla_attainment" not in classes["batch"]
    assert "interactive" in r.stdout
