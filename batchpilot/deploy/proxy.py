"""Ray Serve's HTTP proxy, made to answer in OpenAI's shape when a replica dies mid-request."""

from __future__ import annotations

import json
import logging

logger = logging.getLogger(__name__)


class ReplicaFailureMiddleware:
    """Proxy side: a request whose replica dies ends in an OpenAI-shaped error, not a cut connection.

    Ray Serve's proxy sends nothing when a replica fails after the response started (the client
    sees a truncated chunked body) and an empty 500 when it fails before. This pure ASGI
    middleware sees the response end unfinished and completes it: an SSE stream gets an error
    event and `[DONE]`, the shape our server uses for errors mid-stream; an unstarted response
    gets a 503 with an OpenAI error body. Installed in the proxy by `proxy_middlewares`.
    """

    MESSAGE = "the replica serving this request failed (Ray Serve replaces it); retry the request"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "sse": False, "done": False}

        async def watched_send(message) -> None:
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                state.update(started=True, sse=content_type.startswith(b"text/event-stream"))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:  # noqa: BLE001 - answered below; the client must not get a cut connection
            logger.exception("request failed in the proxy")
        if not state["done"]:
            await self._finish(send, state["started"], state["sse"])

    async def _finish(self, send, started: bool, is_sse: bool) -> None:
        from batchpilot.server.errors import error_body
        from batchpilot.server.protocol import SSE_DONE, sse

        body = error_body(503, self.MESSAGE, code="replica_failed")
        try:
            if not started:
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": json.dumps(body).encode()})
            elif is_sse:
                await send({"type": "http.response.body", "body": (sse(body) + SSE_DONE).encode()})
        except Exception:  # noqa: BLE001 - the client is gone: nobody to tell
            pass


def proxy_middlewares() -> list:
    """Ray Serve's proxy calls this (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH) for its middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaFailureMiddleware)]
