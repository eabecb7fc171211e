"""A validated request as the server runs it: its prompts, options and choices as they accumulate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from batchpilot.config import SLAClass
from batchpilot.engine.output_processor import RequestOutput
from batchpilot.sampling_params import SamplingParams, TokenLogprobs
from batchpilot.server.tools import ToolPlan


@dataclass
class Choice:
    """One generated sequence as it accumulates."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    # Seconds from the job's start, for the metrics.
    first_token_s: float | None = None
    last_token_s: float = 0.0
    finished_s: float | None = None
    queue_s: float | None = None  # the engine's arrival to first admission
    num_cached_tokens: int = 0  # of its prompt, served from the prefix cache
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # when asked (prompt_logprobs, or echo with logprobs)


@dataclass(eq=False)
class Job:
    """A validated request: prompts as token ids and one SamplingParams per choice.

    It holds `num_choices` places in the server's queue from creation until `release()`,
    which runs when generation ends, or when the job is dropped without ever running.
    """

    request_id: str
    prompts: list[list[int]]
    params: SamplingParams
    priority: int = 0
    sla: SLAClass | None = None  # the class it runs under (named by the request, or the default)
    echo: list[str] | None = None  # completions' echo: each prompt's text, put before its choices' text
    tools: ToolPlan | None = None  # chat: what the request asks of tools
    created: int = field(default_factory=lambda: int(time.time()))
    release: Callable[[], Any] = field(default=lambda: None, repr=False)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n


async def merge_streams(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams; cancelling the consumer cancels (and aborts) all of them."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:  # delivered to the consumer, which re-raises it
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
