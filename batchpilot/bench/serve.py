"""`batchpilot bench serve`: an asyncio load generator for any OpenAI-compatible endpoint.

Arrivals are a gamma process (shape = burstiness, 1 = Poisson) at --request-rate, or all at
once for `inf`; each request streams, and its TTFT, every inter-token gap and E2E are
recorded. Endpoint errors are counted, never fatal; Ctrl-C reports what finished.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from batchpilot.bench.metrics import (
    DEFAULT_PERCENTILES,
    SLA,
    RequestRecord,
    per_request_lists,
    summarize,
    summarize_classes,
)
from batchpilot.bench.traces import at_rate


@dataclass
class Payload:
    """One request to send: the route and body (prompt or messages), and its known prompt length."""

    path: str
    body: dict[str, Any]
    prompt_len: int | None = None
    arrival_s: float | None = None  # a trace's own arrival time


def arrival_offsets(trace_times: list[float | None], rate: float | None, burstiness: float = 1.0, seed: int = 0
                    ) -> list[float]:
    """When each request starts, for every load generator: a trace's own times where the requests
    have them (rescaled to a given rate), else the seeded gamma process at `rate` (None: all at once)."""
    if any(t is not None for t in trace_times):
        return at_rate([t or 0.0 for t in trace_times], rate)
    return arrival_times(len(trace_times), float("inf") if rate is None else rate, burstiness, seed).tolist()


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Start offsets (s) of n requests: gamma inter-arrivals with mean 1/rate and shape `burstiness`."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"--request-rate and --burstiness must be positive, got {rate}, {burstiness}")
    if np.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


async def _sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


async def send(client: httpx.AsyncClient, base_url: str, payload: Payload, headers: dict[str, str],
               run_start: float = 0.0) -> RequestRecord:
    """Stream one request; any failure becomes a record with success=False and the error text.
    The record's `start_s` counts from `run_start` (a perf_counter reading)."""
    body = {**payload.body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    sent = start - run_start
    ttft, last, gaps, chunks, usage = None, start, [], 0, None
    try:
        async with client.stream("POST", base_url + payload.path, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:300]
                return RequestRecord(payload.prompt_len or 0, 0, 0.0, time.perf_counter() - start, success=False,
                                     error=f"HTTP {response.status_code}: {text}", start_s=sent,
                                     sla_class=payload.body.get("sla_class"))
            async for event in _sse_events(response):
                if "error" in event:
                    raise RuntimeError(event["error"].get("message", "stream error"))
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", []):
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - start
                    else:
                        gaps.append(now - last)
                    last = now
                    chunks += 1
    except (httpx.HTTPError, RuntimeError, json.JSONDecodeError) as e:
        return RequestRecord(payload.prompt_len or 0, 0, 0.0, time.perf_counter() - start, success=False,
                             error=f"{type(e).__name__}: {e}", start_s=sent, sla_class=payload.body.get("sla_class"))
    e2e = time.perf_counter() - start
    output_len = usage["completion_tokens"] if usage else chunks
    prompt_len = usage["prompt_tokens"] if usage else (payload.prompt_len or 0)
    if ttft is None:  # nothing streamed: count it as done at the end
        ttft = e2e
    return RequestRecord(prompt_len, output_len, ttft, e2e, gaps, start_s=sent, sla_class=payload.body.get("sla_class"))


async def run_load(base_url: str, payloads: list[Payload], rate: float | None, burstiness: float = 1.0,
                   max_concurrency: int | None = None, seed: int = 0, api_key: str | None = None,
                   timeout_s: float = 600, progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Send every payload on its arrival time; returns the records (in payload order) and wall time.

    Cancelled (Ctrl-C), it returns the requests that finished so far.
    """
    offsets = arrival_offsets([p.arrival_s for p in payloads], rate, burstiness, seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    records: list[RequestRecord | None] = [None] * len(payloads)
    bar = tqdm(total=len(payloads), disable=not progress, desc="requests")
    limits = httpx.Limits(max_connections=max_concurrency or 10_000, max_keepalive_connections=64)
    start = 0.0  # set once the client is built: building it (its TLS context) took ~0.1 s on a busy host

    async def one(i: int, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
        if limit is None:
            records[i] = await send(client, base_url, payloads[i], headers, start)
        else:
            async with limit:
                records[i] = await send(client, base_url, payloads[i], headers, start)
        bar.update(1)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10), limits=limits) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(i, client)) for i in range(len(payloads))]
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    bar.close()
    duration = time.perf_counter() - start
    return [r for r in records if r is not None], duration


def error_summary(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Failed requests by error kind (first words of the message)."""
    counts: dict[str, int] = {}
    for r in records:
        if not r.success:
            kind = (r.error or "unknown").split(":")[0]
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def benchmark(base_url: str, payloads: list[Payload], rate: float | None, sla: SLA | None = None,
              percentiles: tuple[float, ...] = DEFAULT_PERCENTILES, class_slas: dict[str, SLA | None] | None = None,
              **kwargs: Any) -> dict[str, Any]:
    """Run a load and summarise it (vLLM's keys and per-request lists, plus SLA attainment and goodput;
    with `class_slas`, the same per SLA class under "classes", each against its own targets)."""
    try:
        records, duration = asyncio.run(run_load(base_url, payloads, rate, **kwargs))
        interrupted = False
    except KeyboardInterrupt:  # asyncio.run cancelled the load; nothing more to report than this
        records, duration, interrupted = [], 0.0, True
    result: dict[str, Any] = summarize(records, duration, sla, percentiles)
    if class_slas:
        result["classes"] = summarize_classes(records, duration, class_slas)
    result["request_rate"] = ("trace" if payloads and payloads[0].arrival_s is not None else float("inf")
                              ) if rate is None else rate
    result |= per_request_lists(records)
    result["error_counts"] = error_summary(records)
    if interrupted or len(records) < len(payloads):
        result["interrupted"] = True
    return result
