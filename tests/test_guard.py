"""The server's outer guard on a stand-in app (no model): API key, body limit, unexpected errors; and
the request path's encoding, off the event loop."""

import asyncio
import logging
import threading
import time
from types import SimpleNamespace

import httpx

from batchpilot.server.errors import APIError
from batchpilot.server.guard import Guard
from batchpilot.server.serving import Serving


async def echo_body(scope, receive, send):
    """Reads the whole body and answers with its length; raises on /boom."""
    if scope["path"] == "/boom":
        raise RuntimeError("boom")
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def call(method: str, path: str, api_key: str | None = None, **kwargs) -> httpx.Response:
    app = Guard(echo_body, api_key=api_key, protect_metrics=False, max_body_bytes=1000)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_bodies_over_the_limit_get_a_413_in_openais_shape():
    assert call("POST", "/v1/completions", content=b"x" * 1000).text == "1000"
    r = call("POST", "/v1/completions", content=b"x" * 1001)  # refused from its Content-Length
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    async def chunks():  # no Content-Length: refused once the bytes read pass the limit
        for _ in range(20):
            yield b"y" * 100

    r = call("POST", "/v1/completions", content=chunks())
    assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]


def test_an_unexpected_error_is_a_500_with_an_id_logged_once(caplog):
    with caplog.at_level(logging.ERROR):
        r = call("POST", "/boom", content=b"{}")
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    records = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(records) == 1 and records[0].exc_info is not None
    request_id = error["message"].split("(")[1].split(")")[0]
    assert request_id.startswith("err-") and request_id in records[0].getMessage()


def test_the_api_key_guards_all_but_the_open_paths():
    assert call("POST", "/v1/completions", api_key="k", content=b"{}").status_code == 401
    authorized = call("POST", "/v1/completions", api_key="k", content=b"{}", headers={"Authorization": "Bearer k"})
    assert authorized.status_code == 200 and authorized.text == "2"
    assert call("POST", "/v1/completions", api_key="k", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert call("GET", "/health", api_key="k").status_code == 200
    assert call("GET", "/metrics", api_key="k").status_code == 200


class _SlowTokenizer:
    """Encodes slowly and records the thread it ran on."""

    max_chars_per_token = 4

    def __init__(self):
        self.threads: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.get_ident())
        time.sleep(0.3)
        return list(range(len(text) // 4))


def test_serving_encodes_off_the_event_loop_and_refuses_long_text_unencoded():
    tokenizer = _SlowTokenizer()
    engine = SimpleNamespace(tokenizer=tokenizer, snapshot=lambda: SimpleNamespace(max_model_len=100))
    serving = Serving(SimpleNamespace(engine=engine), ["m"], metrics=None, max_queue=8)

    async def go():
        ticks = 0

        async def tick():  # the loop keeps running while a text is encoded
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        ids = await serving._encode("abcd" * 100, "prompt")
        ticker.cancel()
        try:
            await serving._encode("abcd" * 100 + "x", "prompt")  # 401 characters > 100 tokens x 4
        except APIError as e:
            refused = e
        return ids, ticks, threading.get_ident(), refused

    ids, ticks, loop_thread, refused = asyncio.run(go())
    assert len(ids) == 100 and ticks >= 3  # on the loop it would be 0 or 1; ~30 here
    assert tokenizer.threads[0] != loop_thread and len(tokenizer.threads) == 1
    assert refused.status == 400 and refused.param == "prompt"
