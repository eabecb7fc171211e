"""The batchpilot controllers inside vLLM's V1 scheduler.

Use: `python -m vllm.entrypoints.openai.api_server --model M --max-num-seqs B_MAX
--scheduler-cls batchpilot.integrations.vllm.DynamicBatchScheduler`, configured by
`BATCHPILOT_VLLM_CONFIG` (a JSON file, or inline JSON, with ControllerConfig fields such as
{"name": "combined", "sla_tpot_ms": 80}). vLLM keeps its own block pool and preemption; before
each `schedule()` we set its admission gate (`max_num_active_reqs`) to the controller's
limit, and after each step feed `observe()` with the measured step time and batch makeup.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import fields

from vllm.v1.core.sched.scheduler import Scheduler

from batchpilot.config import ControllerConfig
from batchpilot.controllers import make_controller
from batchpilot.controllers.base import SchedulerView, StepStats

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = "0.32"
_NEEDED = ("max_num_active_reqs", "max_num_running_reqs", "running", "waiting", "kv_cache_manager", "block_size")


def load_config() -> ControllerConfig:
    """ControllerConfig from BATCHPILOT_VLLM_CONFIG (path or inline JSON); the combined default without it."""
    raw = os.environ.get("BATCHPILOT_VLLM_CONFIG", "").strip()
    if not raw:
        return ControllerConfig()
    text = raw if raw.startswith("{") else open(raw).read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"BATCHPILOT_VLLM_CONFIG: not valid JSON: {e}") from e
    known = {f.name for f in fields(ControllerConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"BATCHPILOT_VLLM_CONFIG: unknown fields {sorted(unknown)} (known: {sorted(known)})")
    return ControllerConfig(**data)


class DynamicBatchScheduler(Scheduler):
    """vLLM's scheduler with its admission limit set by a batchpilot controller every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        missing = [name for name in _NEEDED if not hasattr(self, name)]
        pool = getattr(getattr(self, "kv_cache_manager", None), "block_pool", None)
        if missing or not hasattr(pool, "get_num_free_blocks"):
            import vllm

            raise RuntimeError(
                f"batchpilot.integrations.vllm supports vLLM {SUPPORTED_VLLM}.x; vLLM {vllm.__version__} lacks "
                f"{missing or ['kv_cache_manager.block_pool.get_num_free_blocks']}"
            )
        config = load_config()
        config.max_num_seqs = min(config.max_num_seqs, self.max_num_running_reqs)
        config.min_num_seqs = min(config.min_num_seqs, config.max_num_seqs)
        self.controller = make_controller(config)
        self.batch_limit = self.max_num_running_reqs
        self._step_start: float | None = None
        self._finished_lens: list[int] = []
        logger.info("batchpilot %s controller steering vLLM admissions (B_max %d)", config.name, config.max_num_seqs)

    def _view(self) -> SchedulerView:
        pool = self.kv_cache_manager.block_pool
        running = self.running
        return SchedulerView(
            num_running=len(running),
            num_waiting=len(self.waiting),
            num_decoding=sum(r.num_computed_tokens >= r.num_prompt_tokens for r in running),
            num_free_blocks=pool.get_num_free_blocks(),
            num_total_blocks=pool.num_gpu_blocks - 1,  # vLLM reserves one null block
            block_size=self.block_size,
            prompt_lens=tuple(r.num_prompt_tokens for r in running),
            output_lens=tuple(r.num_output_tokens for r in running),
        )

    def schedule(self, *args, **kwargs):
        self.batch_limit = max(1, min(self.controller.limit(self._view()), self.max_num_running_reqs))
        self.max_num_active_reqs = self.batch_limit
        self._step_start = time.perf_counter()
        return super().schedule(*args, **kwargs)

    def _free_request(self, request, *args, **kwargs):
        self._finished_lens.append(request.num_tokens)
        return super()._free_request(request, *args, **kwargs)

    def update_from_output(self, scheduler_output, model_runner_output):
        result = super().update_from_output(scheduler_output, model_runner_output)
        if self._step_start is None:
            return result
        step_time = time.perf_counter() - self._step_start
        new_ids = {r.req_id for r in scheduler_output.scheduled_new_reqs}
        prefill = decode = 0
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            if req_id not in new_ids and n == 1:
                decode += 1
            else:
                prefill += n
        pool = self.kv_cache_manager.block_pool
        self.controller.observe(StepStats(
            batch_size=len(scheduler_output.num_scheduled_tokens),
            num_prefill_tokens=prefill,
            num_decode_tokens=decode,
            step_time_s=step_time,
            kv_usage=1.0 - pool.get_num_free_blocks() / max(1, pool.num_gpu_blocks - 1),
            num_preemptions=len(getattr(scheduler_output, "preempted_req_ids", None) or ()),
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            finished_lens=tuple(self._finished_lens),
        ))
        self._finished_lens.clear()
        return result
