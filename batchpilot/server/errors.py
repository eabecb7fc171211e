"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error to return to the client; `param` names the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=e.headers)


def _param(loc: tuple[Any, ...]) -> str | None:
    # ("body", "messages", 0, "content", ...) -> "messages.0.content"; pydantic adds union branch
    # names such as "str" or "list[int]" that mean nothing to a client.
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p in {"str", "int", "float"}))]
    return ".".join(parts) or None


async def validation_error_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "invalid_unicode":  # protocol._RequestBody: the field is in the context
        message, param = first.get("msg"), first.get("ctx", {}).get("param")
    elif first.get("type") == "json_invalid":
        message, param = f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(), None
    elif param is None:
        message = "request body must be a JSON object"
    else:
        message = f"{param}: {first.get('msg')}"
    return JSONResponse(error_body(400, message, param), status_code=400)


async def http_error_handler(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = "not found" if exc.status_code == 404 else str(exc.detail)
    return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def api_error_handler(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)
