"""The discrete-event loop: the real engine (scheduler, block pool, controller) on a virtual clock.

Requests arrive at their workload times; between arrivals the engine steps, each step costing
what the cost model says. Time jumps straight to the next arrival when nothing runs, so a
day of traffic takes seconds. The records feed the same metrics as `batchpilot bench`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from batchpilot.bench.datasets import LengthDist
from batchpilot.bench.metrics import RequestRecord
from batchpilot.bench.serve import arrival_times
from batchpilot.config import ControllerConfig, SchedulerConfig
from batchpilot.controllers import make_controller
from batchpilot.deploy.routing import Router, make_router, replica_load
from batchpilot.engine.block_pool import BlockPool, KVCacheManager
from batchpilot.engine.engine import LLMEngine
from batchpilot.engine.scheduler import RequestRejectedError, Scheduler
from batchpilot.engine.trace import TraceWriter
from batchpilot.executors.simulated import STOP_TOKEN, SimulatedExecutor, StepShape, VirtualClock
from batchpilot.sampling_params import SamplingParams


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_len: int
    output_len: int
    # The client's cap, when the model chooses the length (stops at output_len below it); None: the
    # output is forced to output_len (max_tokens = output_len, ignore_eos), as vLLM's random dataset.
    max_tokens: int | None = None
    priority: int = 0
    sla_class: str | None = None  # one of the SchedulerConfig's classes


def make_workload(n: int, rate: float, input_dist: LengthDist, output_dist: LengthDist, seed: int = 0,
                  burstiness: float = 1.0, max_prompt: int | None = None, max_total: int | None = None
                  ) -> list[SimRequest]:
    """Seeded arrivals (the bench's gamma process) and lengths (the bench's distributions), with
    vLLM's ShareGPT filters as optional caps."""
    rng = np.random.default_rng(seed)
    prompts, outputs = input_dist.sample(rng, n), output_dist.sample(rng, n)
    if max_prompt is not None:
        prompts = np.minimum(prompts, max_prompt)
    if max_total is not None:
        outputs = np.maximum(1, np.minimum(outputs, max_total - prompts))
    times = arrival_times(n, rate, burstiness, seed)
    return [SimRequest(float(t), int(p), int(o)) for t, p, o in zip(times, prompts, outputs)]


@dataclass
class SimResult:
    records: list[RequestRecord]
    duration_s: float
    num_preemptions: int
    num_steps: int
    rejected: int
    requests_per_replica: list[int]


def simulate(workload: list[SimRequest], step_time: Callable[[StepShape], float], kv_capacity_tokens: int,
             controller: ControllerConfig, scheduler: SchedulerConfig | None = None, max_model_len: int = 8192,
             block_size: int = 16, trace_path: str | None = None, replicas: int = 1, routing: str = "load-aware",
             seed: int = 0, prefix_caching: bool = True) -> SimResult:
    """Run the workload through the real scheduler and controller; deterministic for a workload.

    Prefix caching is on, as in the engine: requests share no prefix (their prompts are placeholder
    tokens, so blocks are named by request), but a preempted request finds its own blocks again if
    they were not reused meanwhile, and recomputes only the rest, as it does in the engine.

    With `replicas > 1`, each replica is a whole engine (pool, scheduler, controller) with the
    given KV capacity, and the router (see batchpilot.deploy.routing) places each arrival from
    the replicas' loads at that instant; each replica's trace goes to `trace_path` + `.rN`.
    """
    # NOTE: the run allocates millions of short-lived, acyclic objects (a few per request per
    # step): the cycle collector's passes over them cost time and reclaim nothing (docs/design_notes.md).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _simulate(workload, step_time, kv_capacity_tokens, controller,
                         scheduler or SchedulerConfig(max_num_batched_tokens=8192), max_model_len, block_size,
                         trace_path, make_router(routing, replicas, seed), prefix_caching)
    finally:
        if enabled:
            gc.enable()


def _simulate(workload: list[SimRequest], step_time: Callable[[StepShape], float], kv_capacity_tokens: int,
              controller: ControllerConfig, scheduler: SchedulerConfig, max_model_len: int, block_size: int,
              trace_path: str | None, router: Router, prefix_caching: bool) -> SimResult:
    clock = VirtualClock()
    replicas = len(router.loads)
    stop_at: dict[str, int] = {}  # the requests whose length the "model" chooses
    engines = []
    for k in range(replicas):
        pool = BlockPool(kv_capacity_tokens // block_size, block_size)
        kv = KVCacheManager(pool, enable_prefix_caching=prefix_caching, names_by_request=True)
        sched = Scheduler(scheduler, kv,
                          make_controller(controller, tuple(c.tpot_ms for c in scheduler.sla_classes
                                                            if c.tpot_ms is not None)), max_model_len)
        path = trace_path if replicas == 1 or trace_path is None else f"{trace_path}.r{k}"
        trace = TraceWriter(path) if path else None
        engines.append(LLMEngine(sched, SimulatedExecutor(step_time, clock, stop_at), tokenizer=None, clock=clock,
                                 trace=trace))
    # Each replica steps back to back while it has work; `free_at` is when its current step ends.
    free_at = [0.0] * replicas
    served = [0] * replicas
    first: dict[str, float] = {}
    records: dict[str, RequestRecord] = {}
    rejected, i, n = 0, 0, len(workload)
    while True:
        busy = [k for k in range(replicas) if engines[k].has_unfinished_requests()]
        next_step = min(busy, key=free_at.__getitem__) if busy else None
        if i < n and (next_step is None or workload[i].arrival_s <= free_at[next_step]):
            w = workload[i]
            clock.t = w.arrival_s
            if replicas > 1:
                for k, e in enumerate(engines):
                    router.report(k, replica_load(e.snapshot(), controller.max_num_seqs))
            k = router.choose() if replicas > 1 else 0
            if w.max_tokens is None or w.max_tokens <= w.output_len:
                params = SamplingParams(temperature=0, max_tokens=w.output_len, ignore_eos=True)
            else:
                params = SamplingParams(temperature=0, max_tokens=w.max_tokens, stop_token_ids=[STOP_TOKEN])
                stop_at[str(i)] = w.output_len
            try:
                engines[k].add_request([0] * w.prompt_len, params, str(i), w.priority, w.sla_class)
                served[k] += 1
                free_at[k] = max(free_at[k], w.arrival_s)
            except RequestRejectedError:
                rejected += 1
            i += 1
            continue
        if next_step is None:
            break
        clock.t = free_at[next_step]
        for req in engines[next_step].step_tokens():
            rid = req.request_id
            if rid not in first:
                first[rid] = clock.t
            if req.status.finished:
                stop_at.pop(rid, None)
                w = workload[int(rid)]
                records[rid] = RequestRecord(w.prompt_len, w.output_len, first[rid] - w.arrival_s,
                                             clock.t - w.arrival_s, sla_class=w.sla_class)
        free_at[next_step] = clock.t
    for e in engines:
        if e.trace is not None:
            e.trace.close()
    ordered = [records[k] for k in sorted(records, key=int)]
    start = workload[0].arrival_s if workload else 0.0
    return SimResult(ordered, max(free_at + [start]) - start,
                     sum(e.scheduler.num_preemptions_total for e in engines),
                     sum(e.counters.num_steps for e in engines), rejected, served)
