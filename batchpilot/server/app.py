"""The OpenAI-compatible HTTP API (FastAPI): routes, auth, errors, metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import batchpilot
from batchpilot.engine.async_engine import AsyncEngine
from batchpilot.server.errors import (
    APIError,
    api_error_handler,
    error_body,
    http_error_handler,
    validation_error_handler,
)
from batchpilot.server.guard import Guard
from batchpilot.server.metrics import ServerMetrics
from batchpilot.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from batchpilot.server.serving import SLA_HEADER, Serving


@dataclass
class ServerConfig:
    model_names: list[str]
    model_root: str | None = None  # where the model lives (/v1/models' `root`, read by vLLM's bench client)
    api_key: str | None = None
    protect_metrics: bool = False
    max_queue: int = 1024
    max_request_body_mb: float = 16.0  # larger bodies get a 413 before they are read
    metrics_names: str = "batchpilot"  # batchpilot, vllm or both: the prefix of the standard series
    sla_tpot_ms: float | None = None  # the controller's TPOT target, exported for dashboards

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"--max-queue must be at least 1, got {self.max_queue}")
        if not self.max_request_body_mb > 0:
            raise ValueError(f"--max-request-body-mb must be positive, got {self.max_request_body_mb}")


def build_app(engine: AsyncEngine, config: ServerConfig,
              metrics_text: Callable[[], Awaitable[str]] | None = None) -> FastAPI:
    """The app over one engine. `metrics_text` replaces this engine's /metrics exposition (a
    deployment of several replicas serves all of theirs); `app.state.metrics` holds the registry."""
    sla_tpot_s = config.sla_tpot_ms / 1000 if config.sla_tpot_ms else None
    metrics = ServerMetrics(engine.engine, config.model_names[0], config.metrics_names, sla_tpot_s)
    engine.on_step = metrics.observe_step
    serving = Serving(engine, config.model_names, metrics, config.max_queue, config.model_root)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="batchpilot", version=batchpilot.__version__, lifespan=lifespan,
                  description="OpenAI-compatible API of the batchpilot engine (dynamic batch sizing).")
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(APIError, api_error_handler)
    app.state.serving = serving
    app.add_middleware(Guard, api_key=config.api_key, protect_metrics=config.protect_metrics,
                       max_body_bytes=int(config.max_request_body_mb * 2**20))

    @app.get("/health", summary="200 while the engine loop is alive")
    async def health() -> Response:
        if engine.error is not None:
            return JSONResponse(error_body(503, f"engine failed: {engine.error}"), status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": batchpilot.__version__}

    app.state.metrics = metrics

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        text = await metrics_text() if metrics_text is not None else generate_latest(metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> dict[str, Any]:
        # vLLM's card: `root` is the model's path (its bench client loads the tokenizer from it).
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "batchpilot",
                "root": config.model_root or name, "parent": None, "max_model_len": serving.max_model_len,
                "permission": []}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in config.model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        serving.check_model(model_id)
        return model_card(model_id)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return serving.detokenize(body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        job = await serving.completion_job(body, request.headers.get(SLA_HEADER))
        if body.stream:
            return _event_stream(serving.stream(body, job, chat=False))
        return await _unless_disconnected(request, serving.completion(body, job))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        job = await serving.chat_job(body, request.headers.get(SLA_HEADER))
        if body.stream:
            return _event_stream(serving.stream(body, job, chat=True))
        return await _unless_disconnected(request, serving.chat(body, job))

    return app


def _event_stream(chunks) -> StreamingResponse:
    # Starlette cancels the generator when the client goes away; its cleanup aborts the requests.
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run a non-streamed generation, cancelling it (and freeing its blocks) if the client leaves.
    A client that leaves is a normal event: the answer nobody reads is a bare 499, not an error."""
    task = asyncio.ensure_future(work)
    left = False

    async def watch() -> None:
        nonlocal left
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                left = True
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if left:
            return Response(status_code=499)  # nginx's "client closed request"; nobody receives it
        raise
    finally:
        watcher.cancel()

