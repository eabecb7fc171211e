"""Server behaviour under load and faults: auth, queue overflow, SIGTERM drain, fuzzed schema."""

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.server_utils import metric, running_server

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


def test_api_key_is_required_except_for_health_and_metrics():
    with running_server("--api-key", "s3cret") as (url, _):
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret")
        assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].text is not None
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200
    with running_server("--protect-metrics", env={"BATCHPILOT_API_KEY": "k2"}) as (url, _):
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer k2"}).status_code == 200


def test_queue_overflow_gives_503_with_retry_after():
    with running_server("--batch-controller", "static", "--max-num-seqs", "1", "--max-queue", "2") as (url, _):
        async def one(client, i):
            body = {"model": MODEL, "prompt": f"Count to {i}:", "max_tokens": 30, "ignore_eos": True}
            return await client.post(f"{url}/v1/completions", json=body)

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                return await asyncio.gather(*(one(client, i) for i in range(8)))

        responses = asyncio.run(main())
        codes = sorted(r.status_code for r in responses)
        # at least the 2 queue places are served (3 when the first request has left the queue for
        # the running batch before the others arrive: a race, seen both ways on a busy machine)
        assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) == {200, 503}
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["code"] == "queue_full"
        # once drained, the server takes requests again
        ok = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200
        # a request larger than the whole queue could never be served: a 400 naming the field, not a 503
        never = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "n": 3},
                           timeout=60)
        assert never.status_code == 400 and never.json()["error"]["param"] == "n"
        assert "Retry-After" not in never.headers


def test_a_client_timeout_frees_its_request_and_logs_no_traceback(tmp_path):
    log = tmp_path / "server.log"
    with running_server(log=log) as (url, _):
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 300, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, timeout=1.0)
        deadline = time.monotonic() + 30
        while metric(url, "batchpilot:num_requests_running") or metric(url, "batchpilot:kv_cache_usage_perc"):
            assert time.monotonic() < deadline, "the abandoned request kept running"
            time.sleep(0.2)
        assert httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2}, timeout=60).status_code == 200
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text[-2000:]


def test_sigterm_drains_in_flight_requests_and_exits_zero():
    with running_server("--shutdown-timeout", "60") as (url, proc):
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True, "stream": True}
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and not lines:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
                if line.startswith("data: "):
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(x[6:]) for x in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)


def test_openapi_schema_fuzz_never_gives_5xx():
    """schemathesis generates bodies from /openapi.json for every operation; none may give a 5xx."""
    with running_server("--max-model-len", "48", "--max-num-seqs", "64") as (url, _):
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
        for op in operations:
            @given(case=op.as_strategy())
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def check(case):
                response = case.call(base_url=url, timeout=120)
                assert response.status_code < 500, (case.path, case.body, response.text[:500])
                if response.status_code >= 400:
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}

            check()
