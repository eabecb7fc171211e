"""LLMEngine: add_request / abort / step(), the loop every driver shares.

`step()` is schedule -> execute -> update, then the controller observes what the step
cost. The executor is anything with `execute(SchedulerOutput) -> RunnerOutput`; the clock
is injected so the simulator can pass a virtual one.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from batchpilot.config import SLAClass
from batchpilot.controllers.base import BatchController, StepStats
from batchpilot.engine.output_processor import OutputProcessor, RequestOutput
from batchpilot.engine.outputs import RequestUpdate, RunnerOutput, SchedulerOutput
from batchpilot.engine.request import Request, RequestStatus
from batchpilot.engine.scheduler import RequestRejectedError, Scheduler
from batchpilot.engine.trace import TraceWriter, observe_step
from batchpilot.model.grammar import Grammar, GrammarCompiler
from batchpilot.model.tokenizer import TextTokenizer
from batchpilot.sampling_params import SamplingParams, SamplingParamsError


class Executor(Protocol):
    def execute(self, sched: SchedulerOutput) -> RunnerOutput: ...


@dataclass
class EngineCounters:
    """Totals since start, read by the metrics endpoint and the benchmarks."""

    num_requests_added: int = 0
    num_requests_finished: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_steps: int = 0
    busy_time_s: float = 0.0  # time inside step()
    schedule_time_s: float = 0.0  # of which: scheduler + controller
    batch_limit: int = 0  # b_t of the last step


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state at one instant, for readers outside it (metrics, routing, reports), so
    that none of them reaches into the scheduler or the block pool."""

    num_running: int
    num_waiting: int
    num_free_blocks: int  # cached-but-free blocks included
    num_total_blocks: int
    kv_usage: float  # fraction of blocks held by sequences, in [0, 1]
    num_preemptions: int  # since start
    prefix_cache_queries: int  # prompt tokens looked up at admission, since start
    prefix_cache_hits: int  # of which found cached
    batch_limit: int  # b_t of the last step (0 before the first)
    max_model_len: int
    controller_trace: dict[str, float]  # the controller's parts of b_t (b_mem, b_sla, ...)


class LLMEngine:
    def __init__(self, scheduler: Scheduler, executor: Executor, tokenizer: TextTokenizer | None,
                 clock: Callable[[], float] = time.perf_counter, trace: TraceWriter | None = None,
                 vocab_size: int | None = None, sampling_defaults: dict[str, float] | None = None,
                 eos_token_ids: tuple[int, ...] | None = None):
        """`tokenizer=None` runs on token ids alone (the simulator): outputs carry no text.
        `sampling_defaults` (the model's generation_config.json) are for front ends to apply
        to requests that leave a field unset. `eos_token_ids` end a generation (default: the
        tokenizer's EOS)."""
        if eos_token_ids is None:
            eos = tokenizer.eos_token_id if tokenizer is not None else None
            eos_token_ids = (eos,) if eos is not None else ()
        self.eos_token_ids = eos_token_ids
        self.scheduler = scheduler
        self.sampling_defaults = dict(sampling_defaults or {})
        if vocab_size is None and tokenizer is not None:
            vocab_size = tokenizer.vocab_size
        self.vocab_size = vocab_size
        self.executor = executor
        self.tokenizer = tokenizer
        self.grammars = (GrammarCompiler(tokenizer, vocab_size or tokenizer.vocab_size, eos_token_ids)
                         if tokenizer is not None else None)
        self.clock = clock
        scheduler.clock = clock  # the one that stamps arrival times, for the wait of the next request in line
        self.trace = trace
        self.start_time = clock()
        self.output_processor = OutputProcessor(tokenizer)
        self.counters = EngineCounters()
        self.last_stats: StepStats | None = None
        self._ids = itertools.count()

    @property
    def controller(self) -> BatchController:
        return self.scheduler.controller

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0, sla_class: str | None = None) -> str:
        """Queue a prompt (text or token ids); returns its id. `priority`: lower runs first (under
        --scheduling-policy priority); `sla_class`: one of the engine's --sla-class names.

        Raises:
            RequestRejectedError: the prompt is empty or longer than the context or the pool, the
                priority is not honoured or the SLA class is unknown.
        """
        params = params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        if text is not None and self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: give prompts as token ids")
        token_ids = self.tokenizer.encode(prompt) if text is not None else list(prompt)
        self.check_prompt(token_ids)
        self.check_params(params)
        return self.add_checked(token_ids, params, request_id, text, priority, sla_class)

    def add_checked(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    text: str | None = None, priority: int = 0, sla_class: str | None = None,
                    grammar: Grammar | None = None) -> str:
        """Queue token ids that `check_prompt` has passed (the async engine checks in the caller's
        thread, so its step thread does not scan the prompt again); returns the request's id.
        `grammar`: the sequence's matcher for params.structured_outputs, compiled by the caller off
        the step loop (compiled here when not given)."""
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if params.structured_outputs is not None and grammar is None:
            grammar = self.compile_grammar(params)
        req = Request(rid, token_ids, params, self.clock(), eos_token_ids=self.eos_token_ids, priority=priority,
                      sla_class=self.scheduler.sla_class(sla_class), grammar=grammar,
                      bad_word_ids=self._bad_word_ids(params.bad_words))
        self.scheduler.add_request(req)
        self.output_processor.add(req, text)
        self.counters.num_requests_added += 1
        return rid

    def check_params(self, params: SamplingParams) -> None:
        """Raise SamplingParamsError (naming the field) for token ids outside the vocabulary, or
        options this engine cannot honour. Safe from any thread."""
        if self.vocab_size is not None:
            for name in ("stop_token_ids", "allowed_token_ids", "logit_bias"):
                bad = next((t for t in getattr(params, name) or () if not 0 <= int(t) < self.vocab_size), None)
                if bad is not None:
                    raise SamplingParamsError(name, f"{name}: token id {bad} is outside the vocabulary "
                                                    f"[0, {self.vocab_size})")
        if (params.structured_outputs is not None or params.bad_words) and self.tokenizer is None:
            raise SamplingParamsError("structured_outputs" if params.structured_outputs else "bad_words",
                                      "this engine has no tokenizer")

    def compile_grammar(self, params: SamplingParams) -> Grammar:
        """A fresh matcher for one sequence of params.structured_outputs (compiled once per spec,
        then copied). Raises GrammarError. Safe from any thread; may take up to a second."""
        if self.grammars is None or params.structured_outputs is None:
            raise SamplingParamsError("structured_outputs", "this engine has no tokenizer")
        return self.grammars.compile(params.structured_outputs)

    def _bad_word_ids(self, words: list[str]) -> tuple[tuple[int, ...], ...]:
        """Each bad word as tokens, alone and after a space (as vLLM: the word inside a text)."""
        if not words or self.tokenizer is None:
            return ()
        forms = {tuple(self.tokenizer.encode(w, add_special_tokens=False)) for word in words
                 for w in (word.lstrip(), " " + word.lstrip())}
        return tuple(f for f in forms if f)

    def check_options(self, priority: int, sla_class: str | None) -> SLAClass | None:
        """The SLA class a request naming `sla_class` runs under; raises RequestRejectedError for a
        priority the policy ignores or an unknown class. Safe from any thread."""
        self.scheduler.check_priority(priority)
        return self.scheduler.sla_class(sla_class)

    def check_prompt(self, token_ids: list[int]) -> None:
        """Raise RequestRejectedError for a prompt that could never run. Safe from any thread."""
        self.scheduler.check_prompt(len(token_ids))
        if self.vocab_size is None:
            return
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestRejectedError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is and free its blocks (no-op if unknown or finished)."""
        self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
        self.output_processor.remove(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def running_ids(self) -> list[str]:
        return [r.request_id for r in self.scheduler.running]

    def abort_failed_step(self, batch: list[str]) -> list[str]:
        """After a step raised: abort its batch (`batch`, the requests running before it, and
        those running now) and forget every cached prefix (blocks named in that step may never
        have been written). Waiting requests are untouched and run on. Returns the aborted ids."""
        ids = list(dict.fromkeys(batch + self.running_ids()))
        for rid in ids:
            self.abort(rid)
        self.scheduler.kv.pool.forget_cached()
        return ids

    def snapshot(self) -> EngineSnapshot:
        s, kv = self.scheduler, self.scheduler.kv
        return EngineSnapshot(len(s.running), len(s.waiting), kv.pool.num_free_blocks, kv.pool.num_blocks,
                              kv.pool.usage, s.num_preemptions_total, kv.num_prefix_queries, kv.num_prefix_hits,
                              s.last_limit, s.max_model_len, dict(self.controller.trace))

    def step(self) -> list[RequestOutput]:
        """Run one iteration; returns the delta of every request that advanced or finished."""
        t0 = self.clock()
        sched_out, result, advanced, schedule_time = self._schedule_execute_update()
        outputs = []
        logprobs = result.logprobs
        for req in advanced:
            lp = logprobs.get(req.request_id)
            out = self.output_processor.process(RequestUpdate(req, [req.output_token_ids[-1]], [lp] if lp else []))
            if out.finished and not req.status.finished:  # a stop string ended it
                self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
            outputs.append(out)
        self._account(sched_out, advanced, self.clock() - t0, schedule_time)
        return outputs

    def step_tokens(self) -> list[Request]:
        """One iteration without outputs: the requests that sampled a token (the last of their
        output_token_ids), in schedule order.

        For drivers that need no RequestOutput (the simulator); it skips building an output
        object per running request per step. Token-only engines alone: text and stop strings
        live in the output processor, which this skips.
        """
        if self.tokenizer is not None:
            raise ValueError("step_tokens() is for engines without a tokenizer; use step()")
        t0 = self.clock()
        sched_out, _, advanced, schedule_time = self._schedule_execute_update()
        self._account(sched_out, advanced, self.clock() - t0, schedule_time)
        return advanced

    def _schedule_execute_update(self) -> tuple[SchedulerOutput, RunnerOutput, list[Request], float]:
        """The step both drivers share: its schedule, the executor's result, the requests that
        sampled, and the time spent outside the executor."""
        t0 = self.clock()
        sched_out = self.scheduler.schedule()
        t1 = self.clock()
        for req in sched_out.started:
            req.first_scheduled_time = t1
        result = self.executor.execute(sched_out)
        t2 = self.clock()
        advanced = self.scheduler.update_from_output(sched_out, result)
        return sched_out, result, advanced, (t1 - t0) + (self.clock() - t2)

    def _account(self, sched_out: SchedulerOutput, advanced: list[Request], step_time: float,
                 schedule_time: float) -> None:
        now = self.clock()
        finished = []
        for r in advanced:
            if r.first_token_time is None:
                r.first_token_time = now
            if r.status.finished:
                finished.append(r)
        finished_lens = [r.num_tokens for r in finished]
        c = self.counters
        c.num_steps += 1
        c.busy_time_s += step_time
        c.schedule_time_s += schedule_time
        c.num_requests_finished += len(finished_lens)
        c.batch_limit = self.scheduler.last_limit
        c.num_generation_tokens += len(advanced)  # one sampled token each
        c.num_prompt_tokens += sched_out.num_new_prompt_tokens
        pool = self.scheduler.kv.pool
        stats = StepStats(
            batch_size=len(sched_out.scheduled),
            num_prefill_tokens=sched_out.num_prefill_tokens,
            num_decode_tokens=sched_out.num_decode_tokens,
            step_time_s=step_time,
            kv_usage=pool.usage,
            num_preemptions=len(sched_out.preempted_ids),
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            finished_lens=tuple(finished_lens),
            finished_output_lens=tuple(len(r.output_token_ids) for r in finished),
            finished_tpots=tuple((now - r.first_token_time) / (len(r.output_token_ids) - 1)
                                 for r in finished if len(r.output_token_ids) > 1),
        )
        t = self.clock()
        observe_step(self.controller, stats, self.trace, t - self.start_time, c.num_steps, c.batch_limit)
        c.schedule_time_s += self.clock() - t
        self.last_stats = stats
