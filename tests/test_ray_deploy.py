"""Several engine replicas behind one endpoint on Ray Serve (2 replicas of 1 thread here)."""

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from batchpilot.bench.servers import wait_for_replicas
from batchpilot.deploy.metrics import merge_metrics
from batchpilot.deploy.proxy import ReplicaFailureMiddleware
from batchpilot.deploy.routing import REPLICA_HEADER
from tests.server_utils import running_server


def test_merge_metrics_labels_every_sample_with_its_replica():
    a = "# HELP x_total Things.\n# TYPE x_total counter\nx_total{kind=\"a\"} 3.0\n"
    b = "# HELP x_total Things.\n# TYPE x_total counter\nx_total{kind=\"a\"} 4.0\n# TYPE g gauge\ng 1.0\n"
    text = merge_metrics({"r1": a, "r2": b})
    assert text.count("# TYPE x_total counter") == 1
    assert 'x_total{kind="a",replica="r1"} 3.0' in text and 'x_total{kind="a",replica="r2"} 4.0' in text
    assert 'g{replica="r2"} 1.0' in text


def _through_middleware(app) -> tuple[list[dict], bytes]:
    """Run an ASGI app behind ReplicaFailureMiddleware; the response messages and the body bytes."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    asyncio.run(ReplicaFailureMiddleware(app)(scope, receive, send))
    return sent, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def _sse_start():
    return {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


def test_a_stream_cut_by_a_dead_replica_ends_in_an_error_event():
    async def dies_mid_stream(scope, receive, send):  # what Ray's proxy does when the replica dies
        await send(_sse_start())
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})

    sent, body = _through_middleware(dies_mid_stream)
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "replica_failed" and error["type"] == "service_unavailable" and error["message"]
    assert not sent[-1].get("more_body", False)  # the response is complete


def test_a_request_whose_replica_dies_before_answering_gets_a_503_error_body():
    async def dies_at_once(scope, receive, send):
        raise RuntimeError("actor died")

    sent, body = _through_middleware(dies_at_once)
    assert sent[0]["status"] == 503
    assert json.loads(body)["error"]["code"] == "replica_failed"


def test_a_finished_response_passes_the_middleware_unchanged():
    async def answers(scope, receive, send):
        await send(_sse_start())
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    sent, body = _through_middleware(answers)
    assert body == b"data: [DONE]\n\n" and len(sent) == 2


async def _stream(client: httpx.AsyncClient, url: str, i: int, max_tokens: int, started: asyncio.Event | None = None
                  ) -> dict:
    """One streamed completion: its replica (from the headers), text, finish reason, or the error."""
    body = {"model": "SmolLM2-135M-Instruct", "prompt": f"Story {i}: once upon a time", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    out = {"replica": None, "text": "", "finish_reason": None, "error": None}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            out["replica"] = r.headers.get(REPLICA_HEADER)
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out["error"] = event["error"]
                    continue
                choice = event["choices"][0]
                out["text"] += choice["text"]
                out["finish_reason"] = choice["finish_reason"] or out["finish_reason"]
                if started is not None:
                    started.set()
    except httpx.HTTPError as e:
        out["error"] = repr(e)
    return out


def _replica_pids() -> list[int]:
    """Pids of the Serve replica processes (Ray titles them `ray::ServeReplica:<app>:<deployment>`)."""
    import subprocess

    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ServeReplica:batchpilot" in line]


@pytest.mark.slow
def test_two_replicas_share_the_load_and_a_dead_one_loses_only_its_own_requests():
    with running_server("--replicas", "2", "--threads", "1", startup_timeout=600) as (url, _):
        wait_for_replicas(url, 2, timeout=300)
        async def wave(n: int, max_tokens: int) -> list[dict]:
            async with httpx.AsyncClient(timeout=300) as client:
                return await asyncio.gather(*(_stream(client, url, i, max_tokens) for i in range(n)))

        # A burst sent at the same instant: the router counts each request as it chooses its replica.
        first = asyncio.run(wave(16, 16))
        assert all(r["error"] is None and r["finish_reason"] == "length" and r["text"] for r in first), first
        replicas = {r["replica"] for r in first}
        assert len(replicas) == 2, replicas  # routed to both
        per_replica = [sum(r["replica"] == name for r in first) for name in replicas]
        assert min(per_replica) >= 4, per_replica  # and neither got only a token share
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        for name in replicas:
            assert f'replica="{name}"' in metrics
        assert "batchpilot:batch_limit{" in metrics

        # Kill one replica while 12 long streams run; only the streams on it may fail.
        pids = _replica_pids()
        assert len(pids) == 2, pids

        async def kill_during_wave() -> list[dict]:
            async with httpx.AsyncClient(timeout=300) as client:
                started = asyncio.Event()
                async def spaced(i):
                    await asyncio.sleep(0.1 * i)
                    return await _stream(client, url, i, 128, started)

                tasks = [asyncio.create_task(spaced(i)) for i in range(12)]
                await started.wait()
                await asyncio.sleep(1.5)
                os.kill(pids[0], signal.SIGKILL)
                return await asyncio.gather(*tasks)

        results = asyncio.run(kill_during_wave())
        failed = [r for r in results if r["error"] is not None or r["finish_reason"] != "length"]
        failed_on = {r["replica"] for r in failed}
        assert len(failed_on) == 1, results  # the killed replica's streams failed, and only those
        # each told so in OpenAI's shape (an error event, then [DONE]), not by a cut connection
        assert all(isinstance(r["error"], dict) and r["error"]["code"] == "replica_failed" for r in failed), failed
        survivors = [r for r in results if r["replica"] not in failed_on]
        assert survivors and all(r["text"] for r in survivors), results

        # New requests keep being served (by the survivor, then by Ray's replacement).
        deadline = time.monotonic() + 120
        while True:
            after = asyncio.run(wave(4, 8))
            if all(r["error"] is None for r in after) or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert all(r["error"] is None and r["finish_reason"] == "length" for r in after), after
