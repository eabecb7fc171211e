"""Continuous batching at the iteration level.

Admission is in queue order and gated by exactly three things: the controller's `limit()` on
running sequences, free KV blocks (the hard limit) and the per-step token budget. A request
admitted with a cached prefix (block_pool.py) starts after it: those tokens cost no budget. Long
prompts are prefilled in chunks so they never stall the decodes. When a running request needs
a block and none is free, the last running request is preempted by recompute: the most recently
admitted one, or, once requests carry priorities or TTFT targets (`running` is then kept in
queue order too), the one latest in queue order.

Queue order is by a key in seconds: arrival + priority x aging + the request's TTFT target (or
the aging time for a request without one). With no priorities and no TTFT targets that is
arrival order (FCFS); a TTFT target makes it earliest-deadline-first; one priority level is worth
`priority_aging_s` of waiting, so a request of worse priority waits a bounded time.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Callable, Iterable

from batchpilot.config import SchedulerConfig, SLAClass
from batchpilot.controllers.base import BatchController, SchedulerView, SeqState
from batchpilot.engine.block_pool import KVCacheManager
from batchpilot.engine.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput
from batchpilot.engine.request import Request, RequestStatus


class RequestRejectedError(ValueError):
    """A request the engine can never serve (empty, or longer than the context or the pool)."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, controller: BatchController,
                 max_model_len: int):
        self.config = config
        self.kv = kv
        self.controller = controller
        pool_tokens = kv.pool.num_blocks * kv.block_size
        # NOTE: a sequence may never outgrow the whole pool, or it would preempt itself forever.
        self.max_model_len = min(max_model_len, config.max_model_len or max_model_len, pool_tokens)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # the clock that stamps requests' arrival_time: set by the engine that drives this scheduler
        self.clock: Callable[[], float] | None = None
        self.num_preemptions_total = 0
        self.last_limit = 0
        self._finished_ids: list[str] = []
        self.sla_classes = {c.name: c for c in config.sla_classes}
        self._ordered = False  # some request has had a priority or a TTFT target: queue by key
        self._active_classes: Counter[str] = Counter()  # unfinished requests per SLA class name
        self._num_classless = 0

    # ---- requests in and out -------------------------------------------------------------

    def check_prompt(self, num_prompt_tokens: int) -> None:
        """Raise RequestRejectedError for a prompt that could never run. Reads only config."""
        n = num_prompt_tokens
        if n == 0:
            raise RequestRejectedError("prompt is empty")
        if n >= self.max_model_len:
            raise RequestRejectedError(
                f"prompt has {n} tokens, but the context holds {self.max_model_len} "
                f"(prompt plus at least one generated token)"
            )

    def sla_class(self, name: str | None) -> SLAClass | None:
        """The class a request naming `name` runs under (the default class when None); raises
        RequestRejectedError for a name not defined. Reads only config."""
        name = name if name is not None else self.config.default_sla_class
        if name is None:
            return None
        if name not in self.sla_classes:
            raise RequestRejectedError(f"unknown SLA class {name!r} (defined: {', '.join(self.sla_classes) or 'none'})")
        return self.sla_classes[name]

    def check_priority(self, priority: int) -> None:
        """Raise RequestRejectedError for a priority the policy does not honour (vLLM's rule)."""
        if priority and self.config.scheduling_policy != "priority":
            raise RequestRejectedError(f"priority {priority} needs --scheduling-policy priority (it is fcfs)")

    def add_request(self, request: Request) -> None:
        """Queue a request; raises RequestRejectedError if it could never run."""
        self.check_prompt(request.num_prompt_tokens)
        self.check_priority(request.priority)
        if request.request_id in self.requests:
            raise RequestRejectedError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        cls = request.sla_class
        aging = self.config.priority_aging_s
        ttft_s = cls.ttft_ms / 1000 if cls is not None and cls.ttft_ms is not None else None
        request.queue_key = request.arrival_time + request.priority * aging + (aging if ttft_s is None else ttft_s)
        if cls is None:
            self._num_classless += 1
        else:
            self._active_classes[cls.name] += 1
        if not self._ordered and (request.priority or ttft_s is not None):
            # From now on both queues are kept in key order (FCFS order until then is arrival order).
            self._ordered = True
            self.waiting = deque(sorted(self.waiting, key=lambda r: r.queue_key))
            self.running.sort(key=lambda r: r.queue_key)
        self._enqueue(self.waiting, request)

    def _enqueue(self, queue: deque[Request] | list[Request], req: Request) -> None:
        """Put req in a queue: at the end, or at its key's place when ordered (searched from the
        back, where most requests go)."""
        if not self._ordered or not queue or queue[-1].queue_key <= req.queue_key:
            queue.append(req)
            return
        i = len(queue) - 1
        while i > 0 and queue[i - 1].queue_key > req.queue_key:
            i -= 1
        queue.insert(i, req)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish (abort, or stop on a stop string) requests wherever they are; frees their blocks."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.status.finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, status)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------

    def view(self) -> SchedulerView:
        pool = self.kv.pool
        running = self.running
        head = self.waiting[0] if self.waiting else None
        return SchedulerView(  # list comprehensions, not generators: this runs every step
            num_running=len(running),
            num_waiting=len(self.waiting),
            # Request.is_decoding, inlined (a property call per running request per step)
            num_decoding=sum([r.num_computed_tokens >= r.num_prompt_tokens for r in running]),
            num_free_blocks=pool.num_free_blocks,
            num_total_blocks=pool.num_blocks,
            block_size=pool.block_size,
            running=lambda: [self._state(r) for r in running],
            waiting=lambda k: [self._state(r) for r in itertools.islice(self.waiting, k)],
            num_shared_blocks=pool.num_shared_blocks,
            num_saved_blocks=pool.num_saved_blocks,
            num_cached_free_blocks=pool.num_cached_free_blocks,
            sla_tpot_ms=min((self.sla_classes[name].tpot_ms for name in self._active_classes
                             if self.sla_classes[name].tpot_ms is not None), default=None),
            has_classless=self._num_classless > 0,
            next_wait_s=self.clock() - head.arrival_time if head is not None and self.clock else 0.0,
            next_ttft_ms=head.sla_class.ttft_ms if head is not None and head.sla_class is not None else None,
        )

    def _state(self, r: Request) -> SeqState:
        room = self.max_model_len - r.num_prompt_tokens
        params = r.sampling_params
        return SeqState(r.num_tokens, len(r.output_token_ids), min(r.max_output_tokens, room),
                        params.ignore_eos and not params.stop_token_ids and params.max_tokens is not None)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts, growing their block tables."""
        self.last_limit = max(1, self.controller.limit(self.view()))
        out = SchedulerOutput([], 0, 0, finished_ids=self._finished_ids)
        self._finished_ids = []
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted_ids:  # memory is short: admitting now would only preempt again
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # NOTE: the hottest loop of a simulation with update_from_output (every running request,
        # every step): a table that already has room for the step's tokens is read directly, and
        # the ScheduledRequest is built here rather than through _add.
        running, tables, block_size = self.running, self.kv.block_tables, self.kv.block_size
        cache_computed = self.kv.cache_computed if self.kv.enable_prefix_caching else None
        schedule = out.scheduled.append
        prefill = decode = 0
        # NOTE: preemption pops from the end of `running`, which a for loop over it allows: the
        # iteration then stops at the new end.
        for req in running:
            if budget <= 0:
                break
            start = req.num_computed_tokens
            todo = req.num_prompt_tokens + len(req.output_token_ids) - start  # hot: no property
            n = todo if todo <= budget else budget
            table = tables.get(req.request_id)
            if table is None or start + n > len(table) * block_size:
                table = self._allocate_or_preempt(out, req, start + n)
                if table is None:  # req itself was preempted (it was the last one running)
                    break
            schedule(ScheduledRequest(req, start, n, table, n == todo))
            if cache_computed is not None:
                cache_computed(req, start + n)
            if start >= req.num_prompt_tokens:
                decode += n
            else:
                prefill += n
            budget -= n
        out.num_prefill_tokens += prefill
        out.num_decode_tokens += decode
        return budget

    def _allocate_or_preempt(self, out: SchedulerOutput, req: Request, num_tokens: int) -> list[int] | None:
        """Grow req's table to num_tokens, preempting the most recently admitted requests until
        it fits; None when req itself had to go."""
        while (table := self.kv.allocate_slots(req.request_id, num_tokens)) is None:
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted_ids.append(victim.request_id)
            if victim is req:
                return None
        return table

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.last_limit:
            req = self.waiting[0]  # NOTE: a waiting request holds no blocks and has computed nothing
            # A request that wants its prompt's logprobs computes the whole prompt (as vLLM).
            cached = self.kv.cached_prefix(req) if req.sampling_params.prompt_logprobs is None else []
            computed = len(cached) * self.kv.block_size
            todo = req.num_tokens - computed
            n = min(todo, budget)
            table = self.kv.allocate_slots(req.request_id, computed + n, cached)
            if table is None:
                break
            self.waiting.popleft()
            req.num_computed_tokens = computed
            self.kv.record_admission(req.num_tokens, computed)
            self.kv.cache_computed(req, computed + n)
            if req.num_preemptions == 0:
                req.num_cached_tokens = computed
                out.num_new_prompt_tokens += req.num_prompt_tokens
                out.started.append(req)
            req.status = RequestStatus.RUNNING
            self._enqueue(self.running, req)
            self._add(out, req, n, table, n == todo)
            budget -= n

    def _add(self, out: SchedulerOutput, req: Request, n: int, block_table: list[int], sample: bool) -> None:
        """Schedule n tokens of req; `sample`: they reach its last token, so a next one is sampled."""
        start = req.num_computed_tokens
        out.scheduled.append(ScheduledRequest(req, start, n, block_table, sample))
        if start >= req.num_prompt_tokens:  # decoding
            out.num_decode_tokens += n
        else:
            out.num_prefill_tokens += n

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        if self._ordered:
            self._enqueue(self.waiting, req)
        else:
            self.waiting.appendleft(req)

    def update_from_output(self, out: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Advance each scheduled request by its computed tokens, append samples, finish stops.

        Returns:
            The requests that sampled a token in this step, in schedule order; each one's new
            token is the last of its output_token_ids (its logprobs, if asked, are in `result`).
        """
        # NOTE: the hottest loop of a simulation (every running request, every step): the stop
        # checks are inlined and read the request's precomputed stop set and output cap, and
        # nothing is built per request (docs/design_notes.md).
        for rid, (first, lps) in result.prompt_logprobs.items():
            collected = self.requests[rid].prompt_logprobs
            if first <= len(collected):  # a recompute after preemption repeats what is known
                collected.extend(lps[len(collected) - first:])
        advanced: list[Request] = []
        add = advanced.append
        sampled = result.sampled_token_ids
        max_model_len = self.max_model_len
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            token = sampled.get(req.request_id)
            if token is None:
                continue
            output = req.output_token_ids
            output.append(token)
            add(req)
            num_output = len(output)
            if req.grammar is not None:
                req.grammar.accept(token)
            if token in req.stop_token_set:
                req.stopped_by_token = True
                status = RequestStatus.FINISHED_STOPPED
            elif req.grammar is not None and req.grammar.is_terminated():
                status = RequestStatus.FINISHED_STOPPED  # the grammar is complete: nothing may follow
            elif num_output >= req.max_output_tokens or req.num_prompt_tokens + num_output >= max_model_len:
                status = RequestStatus.FINISHED_LENGTH
            else:
                continue
            self.running.remove(req)
            self._finish(req, status)
        return advanced

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if req.sla_class is None:
            self._num_classless -= 1
        else:
            counts = self._active_classes
            counts[req.sla_class.name] -= 1
            if not counts[req.sla_class.name]:
                del counts[req.sla_class.name]
        self.kv.free(req.request_id)
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)
