"""The API's outer guard, as one pure ASGI middleware: API-key check, request-body size limit,
and the answer to anything unexpected.

Pure ASGI rather than Starlette's `BaseHTTPMiddleware`: that one wraps every response in a task
and, when a client gives up on a non-streamed request, logs a "No response returned" traceback
for what is a normal event. Here a disconnect is just the end of the request.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from typing import Any

from batchpilot.server.errors import error_body

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/version", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class _BodyTooLarge(Exception):
    pass


class Guard:
    def __init__(self, app: Any, api_key: str | None, protect_metrics: bool, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.protect_metrics = protect_metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        path = scope.get("path", "")
        open_path = path in OPEN_PATHS or (path == "/metrics" and not self.protect_metrics)
        if self.api_key and not open_path and not _authorized(headers.get(b"authorization", b""), self.api_key):
            await _send_error(send, 401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key")
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _drain(receive, 4 * self.max_body_bytes)
            await _send_error(send, 413, self._too_large(), "request_too_large")
            return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # a chunked body with no Content-Length
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await _drain(receive, 4 * self.max_body_bytes)
                await _send_error(send, 413, self._too_large(), "request_too_large")
        except Exception:
            request_id = f"err-{uuid.uuid4().hex[:16]}"
            logger.exception("unexpected error in %s %s (%s)", scope.get("method"), path, request_id)
            if not started:
                await _send_error(send, 500, f"internal error ({request_id}); the server log has the details",
                                  "internal_error")

    def _too_large(self) -> str:
        return f"request body larger than {self.max_body_bytes} bytes (--max-request-body-mb)"


def _authorized(header: bytes, key: str) -> bool:
    scheme, _, token = header.decode("latin-1").partition(" ")
    # NOTE: constant-time comparison, so response timing does not reveal the key.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def _drain(receive: Any, limit: int) -> None:
    """Read and drop what is left of a refused body, up to `limit` bytes: a client still sending
    when the answer comes sees a reset connection, not the 413. Past the limit the connection is
    closed instead (nothing is kept, so draining costs no memory)."""
    drained = 0
    while drained <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _send_error(send: Any, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
