"""The batchpilot controllers inside vLLM's V1 scheduler.

Use: `python -m vllm.entrypoints.openai.api_server --model M --max-num-seqs B_MAX
--scheduler-cls batchpilot.integrations.vllm.DynamicBatchScheduler`, configured by
`BATCHPILOT_VLLM_CONFIG` (a JSON file, or inline JSON, with ControllerConfig fields such as
{"name": "combined", "sla_tpot_ms": 80, "trace_path": "/tmp/trace.jsonl"}) and
`BATCHPILOT_VLLM_METRICS_PORT` (serve the limits as Prometheus gauges on that port).

vLLM keeps its own block pool, preemption and async scheduling; before each `schedule()` we
set its admission gate (`max_num_active_reqs`) to the controller's limit, and after each step
feed `observe()` with the step time and batch makeup. The limits go to the controller trace,
the gauges, and a log line when they change (at most one per 5 s).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import fields

import vllm
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from batchpilot.config import ControllerConfig
from batchpilot.controllers import make_controller
from batchpilot.controllers.base import SchedulerView, SeqState, StepStats
from batchpilot.engine.trace import TraceWriter, observe_step

# Under vLLM's logger, so its handlers (configured for "vllm" only) print our lines in the engine process.
logger = logging.getLogger("vllm.batchpilot")

SUPPORTED_VLLM = ("0.32", "0.33")  # both tested at the scheduler level (tests_vllm)
# vLLM internals this module reads or sets; checked at start so a vLLM that moved them fails loudly.
_NEEDED = ("max_num_active_reqs", "max_num_running_reqs", "running", "waiting", "kv_cache_manager", "block_size",
           "_free_request")
_LOG_INTERVAL_S = 5.0  # at most one "limit changed" line per interval


def load_config() -> ControllerConfig:
    """ControllerConfig from BATCHPILOT_VLLM_CONFIG (path or inline JSON); the combined default without it."""
    raw = os.environ.get("BATCHPILOT_VLLM_CONFIG", "").strip()
    if not raw:
        return ControllerConfig()
    try:
        text = raw if raw.startswith("{") else open(raw).read()
        data = json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"BATCHPILOT_VLLM_CONFIG: {e}") from e
    known = {f.name for f in fields(ControllerConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"BATCHPILOT_VLLM_CONFIG: unknown fields {sorted(unknown)} (known: {sorted(known)})")
    return ControllerConfig(**data)


def check_vllm(scheduler: Scheduler) -> None:
    """Raise a clear error when this vLLM lacks what the integration touches (never a silent no-op)."""
    missing = [name for name in _NEEDED if not hasattr(scheduler, name)]
    pool = getattr(getattr(scheduler, "kv_cache_manager", None), "block_pool", None)
    if not hasattr(pool, "get_num_free_blocks") or not hasattr(pool, "num_gpu_blocks"):
        missing.append("kv_cache_manager.block_pool.get_num_free_blocks/num_gpu_blocks")
    if missing or not vllm.__version__.startswith(SUPPORTED_VLLM):
        supported = ", ".join(f"{v}.x" for v in SUPPORTED_VLLM)
        raise RuntimeError(f"batchpilot.integrations.vllm supports vLLM {supported}; this is vLLM {vllm.__version__}"
                           + (f", which lacks {missing}" if missing else ""))


def _state(request, max_model_len: int) -> SeqState:
    """A vLLM request as our controllers see it."""
    cap = request.max_tokens if request.max_tokens is not None else math.inf
    params = request.sampling_params
    exact = bool(params is not None and params.ignore_eos and request.max_tokens is not None)
    return SeqState(request.num_tokens, request.num_output_tokens, min(cap, max_model_len - request.num_prompt_tokens),
                    exact)


class _LimitGauges:
    """b_t and the controller's parts as Prometheus gauges on their own port (the engine core is
    a separate process from vLLM's API server, so vLLM's /metrics cannot carry them)."""

    def __init__(self, port: int):
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        registry = CollectorRegistry()
        self.limit = Gauge("batchpilot:batch_limit", "Running-request limit b_t set by the controller",
                           registry=registry)
        self.parts = Gauge("batchpilot:batch_limit_part", "The controller's parts of b_t (b_mem, b_sla, ...)",
                           ["part"], registry=registry)
        self.running = Gauge("batchpilot:num_requests_running", "Requests running in vLLM", registry=registry)
        start_http_server(port, registry=registry)

    def set(self, limit: int, parts: dict[str, int | float], running: int) -> None:
        self.limit.set(limit)
        for name, value in parts.items():
            self.parts.labels(name).set(value)
        self.running.set(running)


class DynamicBatchScheduler(Scheduler):
    """vLLM's scheduler with its admission limit set by a batchpilot controller every step.

    Constructed under async scheduling (vLLM's default when the executor supports it), it
    becomes `DynamicBatchAsyncScheduler`, so passing this one class never turns async off.
    """

    def __new__(cls, *args, **kwargs):
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is DynamicBatchScheduler and getattr(vllm_config.scheduler_config, "async_scheduling", False):
            cls = DynamicBatchAsyncScheduler
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_vllm(self)
        config = load_config()
        config.max_num_seqs = min(config.max_num_seqs, self.max_num_running_reqs)
        config.min_num_seqs = min(config.min_num_seqs, config.max_num_seqs)
        self.controller = make_controller(config)
        self.trace = TraceWriter(config.trace_path) if config.trace_path else None
        port = os.environ.get("BATCHPILOT_VLLM_METRICS_PORT")
        self.gauges = _LimitGauges(int(port)) if port else None
        self.batch_limit = self.max_num_running_reqs
        self._logged_limit = 0
        self._last_log = 0.0
        self._schedule_times: deque[float] = deque()  # one per step scheduled and not yet updated
        self._last_update = 0.0
        self._start = time.perf_counter()
        self._num_steps = 0
        self._finished_lens: list[int] = []
        self._finished_output_lens: list[int] = []
        logger.info("batchpilot %s controller steering vLLM %s admissions (B_max %d, %s)", config.name,
                    vllm.__version__, config.max_num_seqs, type(self).__name__)

    def _view(self) -> SchedulerView:
        pool = self.kv_cache_manager.block_pool
        running = self.running
        free = pool.get_num_free_blocks()
        total = pool.num_gpu_blocks - 1  # vLLM reserves one null block
        # vLLM's pool counts a block shared by prefix caching once; the running requests' block
        # tables count it once per holder: the difference is what sharing saves.
        held = sum(len(manager.req_to_blocks.get(r.request_id, ()))
                   for manager in self.kv_cache_manager.coordinator.single_type_managers for r in running)
        first = next(iter(self.waiting), None)  # vLLM stamps arrival_time with time.time()
        return SchedulerView(
            num_running=len(running),
            num_waiting=len(self.waiting),
            num_decoding=sum(r.num_computed_tokens >= r.num_prompt_tokens for r in running),
            num_free_blocks=free,
            num_total_blocks=total,
            block_size=self.block_size,
            running=lambda: [_state(r, self.max_model_len) for r in running],
            waiting=lambda k: [_state(r, self.max_model_len) for r in itertools.islice(self.waiting, k)],
            num_saved_blocks=max(0, held - (total - free)),
            next_wait_s=time.time() - first.arrival_time if first is not None else 0.0,
        )

    def schedule(self, *args, **kwargs):
        self.batch_limit = max(1, min(self.controller.limit(self._view()), self.max_num_running_reqs))
        self.max_num_active_reqs = self.batch_limit
        self._schedule_times.append(time.perf_counter())
        return super().schedule(*args, **kwargs)

    def _free_request(self, request, *args, **kwargs):
        self._finished_lens.append(request.num_tokens)
        self._finished_output_lens.append(request.num_output_tokens)
        return super()._free_request(request, *args, **kwargs)

    def update_from_output(self, scheduler_output, model_runner_output):
        result = super().update_from_output(scheduler_output, model_runner_output)
        now = time.perf_counter()
        scheduled_at = self._schedule_times.popleft() if self._schedule_times else now
        # Under async scheduling the next step is scheduled before this one's output arrives, so
        # a step's time is the gap since the previous output; when the engine idled in between,
        # it is the time since this step was scheduled.
        step_time = now - max(scheduled_at, self._last_update)
        self._last_update = now
        self._observe(scheduler_output, step_time)
        return result

    def _observe(self, scheduler_output, step_time: float) -> None:
        new_ids = {r.req_id for r in scheduler_output.scheduled_new_reqs}
        prefill = decode = 0
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            if req_id not in new_ids and n == 1:
                decode += 1
            else:
                prefill += n
        pool = self.kv_cache_manager.block_pool
        stats = StepStats(
            batch_size=len(scheduler_output.num_scheduled_tokens),
            num_prefill_tokens=prefill,
            num_decode_tokens=decode,
            step_time_s=step_time,
            kv_usage=1.0 - pool.get_num_free_blocks() / max(1, pool.num_gpu_blocks - 1),
            num_preemptions=len(getattr(scheduler_output, "preempted_req_ids", None) or ()),
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            finished_lens=tuple(self._finished_lens),
            finished_output_lens=tuple(self._finished_output_lens),
        )
        self._finished_lens.clear()
        self._finished_output_lens.clear()
        self._num_steps += 1
        if self.gauges is not None:
            self.gauges.set(self.batch_limit, self.controller.trace, stats.num_running)
        now = time.perf_counter()
        if self.batch_limit != self._logged_limit and now - self._last_log >= _LOG_INTERVAL_S:
            self._last_log = now
            logger.info("batchpilot: batch limit %d (%s), running %d, waiting %d, KV %.0f%%", self.batch_limit,
                        self.controller.trace, stats.num_running, stats.num_waiting, 100 * stats.kv_usage)
            self._logged_limit = self.batch_limit
        observe_step(self.controller, stats, self.trace, now - self._start, self._num_steps, self.batch_limit)


class DynamicBatchAsyncScheduler(DynamicBatchScheduler, AsyncScheduler):
    """The same, over vLLM's AsyncScheduler (chosen by DynamicBatchScheduler under async scheduling)."""
