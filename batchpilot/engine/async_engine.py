"""AsyncEngine: the step loop in a background thread, per-request streams for asyncio callers.

The model step runs in one worker thread (torch releases the GIL), so the event loop stays
free to serve HTTP while a step runs. Only that thread touches the engine: callers enqueue
additions and aborts, which the worker applies between steps. Prompts are validated in the
caller's task, so a bad request fails at once and never reaches the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from batchpilot.controllers.base import StepStats
from batchpilot.engine.engine import LLMEngine
from batchpilot.engine.output_processor import RequestOutput
from batchpilot.engine.scheduler import RequestRejectedError
from batchpilot.model.grammar import Grammar
from batchpilot.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


MAX_CONSECUTIVE_FAILED_STEPS = 3  # then the engine is declared dead (a fault that does not pass)


class EngineDeadError(RuntimeError):
    """The step loop failed; no request can be served any more."""


class RequestFailedError(RuntimeError):
    """The step running this request raised: the request was aborted; the engine goes on."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[StepStats], None] | None = None,
                 on_dead: Callable[[BaseException], None] | None = None):
        """`on_step` is called after every step with its stats, on the engine's thread; `on_dead`
        once, on the event loop, if the step loop dies (a server exits so a supervisor restarts it)."""
        self.engine = engine
        self.on_step = on_step
        self.on_dead = on_dead
        self._failed_steps = 0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._ids = itertools.count()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._error: BaseException | None = None

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the step loop, if any."""
        return self._error

    def start(self) -> None:
        """Start the background loop on the running event loop (idempotent)."""
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
        self._worker.shutdown(wait=True)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       priority: int = 0, sla_class: str | None = None,
                       grammar: Grammar | None = None, checked: bool = False) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas until it finishes. Leaving early aborts it. `grammar`: this
        sequence's matcher for params.structured_outputs (`engine.compile_grammar`, which callers
        run off the event loop); compiled here when not given. `checked`: the caller has passed the
        prompt's token ids and `params` through `engine.check_prompt` / `check_params` already (the
        server does, to name the request's field in its 400), so they are not scanned again.

        Raises:
            RequestRejectedError: invalid prompt or duplicate id (before anything is queued).
            RequestFailedError: a step that ran this request raised (the request is aborted).
            EngineDeadError: the step loop has failed.
        """
        if self._error is not None:
            raise EngineDeadError(str(self._error))
        self.start()
        token_ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not checked:
            self.engine.check_prompt(token_ids)
            self.engine.check_params(params)
        self.engine.check_options(priority, sla_class)
        if params.structured_outputs is not None and grammar is None:
            grammar = self.engine.compile_grammar(params)
        rid = request_id if request_id is not None else f"areq-{next(self._ids)}"
        if rid in self._streams:
            raise RequestRejectedError(f"request id {rid!r} is already in use")
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[rid] = stream
        self._commands.put(("add", rid, token_ids, params, priority, sla_class, grammar))
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, RequestFailedError):
                    finished = True  # already aborted
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDeadError(str(item)) from item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed before the next step."""
        if self._streams.pop(request_id, None) is not None:
            self._commands.put(("abort", request_id))
            if self._wakeup is not None:
                self._wakeup.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._commands.empty() and not self.engine.has_unfinished_requests():
                    await self._wakeup.wait()
                    self._wakeup.clear()
                outputs, failed = await loop.run_in_executor(self._worker, self._step)
                for rid, error in failed:
                    stream = self._streams.pop(rid, None)
                    if stream is not None:
                        stream.put_nowait(error)
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if stream is not None:
                        stream.put_nowait(out)
                        if out.finished:
                            del self._streams[out.request_id]
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug in a step must not leave callers waiting forever
            logger.exception("engine step failed; failing all requests")
            self._error = e
            for stream in self._streams.values():
                stream.put_nowait(e)
            self._streams.clear()
            if self.on_dead is not None:
                self.on_dead(e)

    def _step(self) -> tuple[list[RequestOutput], list[tuple[str, RequestFailedError]]]:
        """Worker thread: apply queued commands, then run one step if there is work. A step that
        raises fails its own batch only, unless steps keep failing (then the loop dies)."""
        while not self._commands.empty():
            cmd = self._commands.get()
            if cmd[0] == "add":
                _, rid, token_ids, params, priority, sla_class, grammar = cmd
                # checked in generate()
                self.engine.add_checked(token_ids, params, rid, priority=priority, sla_class=sla_class,
                                        grammar=grammar)
            else:
                self.engine.abort(cmd[1])
        if not self.engine.has_unfinished_requests():
            return [], []
        batch = self.engine.running_ids()
        try:
            outputs = self.engine.step()
        except Exception as e:
            self._failed_steps += 1
            if self._failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
                raise
            failed = self.engine.abort_failed_step(batch)
            logger.exception("engine step failed; aborted the %d requests of its batch", len(failed))
            error = RequestFailedError(f"the engine step running this request failed: {type(e).__name__}: {e}")
            return [], [(rid, error) for rid in failed]
        self._failed_steps = 0
        if self.on_step is not None:
            self.on_step(self.engine.last_stats)
        return outputs, []
