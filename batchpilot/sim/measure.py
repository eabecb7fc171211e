"""`batchpilot profile`: the real engine timed over a grid of steps, and the fixed workload that
calibrates the grid (the cost model that reads the result is sim/profile.py).

Between the grid's passes a fixed real workload runs and its real / grid time ratio by step size
becomes the profile's `correction`; `profile --recalibrate` runs that workload again and
replaces the correction, so the grid stands for the host as it is now.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections import Counter
from typing import Any

import numpy as np

from batchpilot.executors.simulated import StepShape, step_shape
from batchpilot.sim.profile import (
    CALIBRATION_BUDGET,
    CALIBRATION_KV_TOKENS,
    PROFILE_VERSION,
    ProfileGrid,
    correction,
    summarize_calibration,
)

DEFAULT_BATCH_SIZES = (0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
DEFAULT_CONTEXT_LENS = (64, 128, 256, 512, 1024)
DEFAULT_PREFILL_TOKENS = (0, 32, 128, 256, 512)
CALIBRATION_RUNS = 3  # calibration runs at profile time; their median ratios are the correction
PREFILL_CONTEXT_OFFSETS = (0, 1024, 3072, 7168)  # cached tokens before the timed prefill chunk

logger = logging.getLogger(__name__)


def host_description(threads: int | None) -> dict[str, Any]:
    """What the profile was measured on, saved beside it (a profile holds for its machine only)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "platform": platform.platform()}


def measure_profile(engine_config, grid: ProfileGrid, reps: int = 5, calibration_prompts: int = 96,
                    progress: bool = True) -> dict[str, Any]:
    """Time the real runner on every grid point; returns the profile as a JSON-ready dict."""
    import torch
    from tqdm import tqdm

    from batchpilot.engine.outputs import ScheduledRequest, SchedulerOutput
    from batchpilot.engine.request import Request
    from batchpilot.llm import build_engine
    from batchpilot.sampling_params import SamplingParams

    if reps < 1:
        raise ValueError(f"--reps must be at least 1, got {reps}")
    if calibration_prompts < 0:
        raise ValueError(f"--calibration-prompts must be at least 0, got {calibration_prompts}")
    engine = build_engine(engine_config)
    runner = engine.executor
    block_size = engine_config.cache.block_size
    axes = (grid.batch_sizes, grid.context_lens, grid.prefill_tokens)
    args = runner.model.args
    max_len = engine.scheduler.max_model_len
    if grid.context_lens[-1] + 1 > max_len or grid.prefill_tokens[-1] > max_len:
        raise ValueError(f"--context-lens / --prefill-tokens exceed the model's context ({max_len})")
    # Sampling as the benchmarks sample (temperature 1, seeded), so its cost is in the profile.
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=1, seed=0)
    vocab = engine.vocab_size or args.vocab_size
    rng = np.random.default_rng(0)

    def step(b: int, c: int, p: int) -> SchedulerOutput:
        """b decodes at context c (the last token new, c - 1 cached) and a p-token prefill chunk.

        Their blocks are the first blocks of the pool, shuffled: a busy engine's pool is full and
        its free list interleaves requests. (Contiguous tables timed up to 2x faster at long
        contexts; tables scattered over a pool much larger than the step's data, 1.5x slower.)
        """
        seqs = [(f"d{i}", c, c - 1) for i in range(b)] + ([("p", p, 0)] if p else [])
        blocks = iter(rng.permutation(sum(-(-length // block_size) for _, length, _ in seqs)).tolist())
        scheduled = []
        for tag, length, start in seqs:
            table = [next(blocks) for _ in range(-(-length // block_size))]
            req = Request(tag, [(7 * t + 3) % vocab for t in range(length)], params, arrival_time=0.0)
            scheduled.append(ScheduledRequest(req, start, length - start, table, True))
        return SchedulerOutput(scheduled, p, b)

    points = [(i, j, k) for i in range(len(grid.batch_sizes)) for j in range(len(grid.context_lens))
              for k in range(len(grid.prefill_tokens)) if grid.batch_sizes[i] or (j == 0 and k > 0)]
    steps = {point: step(*(axis[x] for axis, x in zip(axes, point))) for point in points}
    samples: dict[tuple[int, int, int], list[float]] = {point: [] for point in points}
    # Each pass visits every point once, in a new shuffled order: like a running engine, no step
    # follows a step of its own shape (back-to-back repeats of one shape find warm caches), and
    # a drift of the host spreads over the grid as noise. The first pass is a warm-up. The
    # calibration runs are spread between the passes, to see the host in the same minutes.
    calibrations_after = Counter(max(1, round((k + 1) * reps / CALIBRATION_RUNS)) for k in range(CALIBRATION_RUNS))
    calibration_runs: list[list[tuple[StepShape, float]]] = []
    with tqdm(total=(reps + 1) * len(points), desc="profile", disable=not progress) as bar:
        for rep in range(reps + 1):
            for n in rng.permutation(len(points)):
                point = points[n]
                t0 = time.perf_counter()
                runner.execute(steps[point])
                if rep:
                    samples[point].append(time.perf_counter() - t0)
                bar.update()
            for _ in range(calibrations_after[rep] if calibration_prompts else 0):
                calibration_runs.append(run_calibration(runner, vocab, block_size, max_len, calibration_prompts))
    times = np.zeros(tuple(len(axis) for axis in axes))
    for point, values in samples.items():
        times[point] = statistics.median(values)
    times[0, 1:, :] = times[0, 0, :]  # without decodes the context axis does not apply
    elem = torch.finfo(runner.model.dtype).bits // 8
    profile = {
        "version": PROFILE_VERSION,
        "model": str(engine_config.model or "default"),
        "dtype": engine_config.dtype,
        "host": host_description(engine_config.threads),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kv_bytes_per_token": args.kv_bytes_per_token * elem,
        "max_model_len": args.max_position_embeddings,
        "reps": reps,
        "grid": {"batch_sizes": list(grid.batch_sizes), "context_lens": list(grid.context_lens),
                 "prefill_tokens": list(grid.prefill_tokens)},
        "step_time_s": times.tolist(),
    }
    profile["prefill_context"] = measure_prefill_context(runner, vocab, block_size, max_len,
                                                         grid.prefill_tokens[-1], reps)
    if calibration_prompts:
        # The runs schedule the same steps, so their grid times are equal: the median real time
        # over that is the median ratio, overall and per bin.
        runs = [summarize_calibration(profile, run, calibration_prompts) for run in calibration_runs]
        bins = [_median_real(b, [run["bins"][i] for run in runs]) for i, b in enumerate(runs[0]["bins"])]
        profile["calibration"] = {**_median_real(runs[0], runs), "ratios": [run["ratio"] for run in runs],
                                  "bins": bins}
        profile["correction"] = correction(bins)
    return profile


def _median_real(first: dict[str, Any], same: list[dict[str, Any]]) -> dict[str, Any]:
    """`first` with the median real time of runs of the same steps, and the ratio that makes."""
    real = statistics.median(run["real_s"] for run in same)
    return {**first, "real_s": real, "ratio": real / first["predicted_s"]}


def recalibrate(engine_config, profile: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """The profile with its `correction` measured again on this host, now (the grid is kept).

    The host's speed drifts (the same benchmark here: 303 and 335 tok/s eight minutes apart;
    the grid itself, taken 25 minutes apart, 18-25% slower on small steps and 5-14% on large
    ones); the calibration workload, run again (about 40 s), tells the grid's ratio to now.
    """
    from batchpilot.llm import build_engine

    if "calibration" not in profile:
        raise ValueError("--recalibrate: the profile has no calibration (made with --calibration-prompts 0)")
    here = host_description(engine_config.threads)
    measured_on = profile.get("host", {}).get("cpu")
    if measured_on != here["cpu"]:
        # Measured here: a grid of an AMD EPYC host recalibrated on an Intel Xeon one needed
        # x1.4-1.8 on decode steps and x0.7-0.8 on prefill steps; steps of one duration then
        # differ by 2x in their true correction, which one correction by step time cannot follow.
        logger.warning("the profile's grid was measured on %s, this machine is %s: the recalibration can "
                       "only rescale it; take a profile of this machine (`batchpilot profile`)",
                       measured_on, here["cpu"])
    engine = build_engine(engine_config)
    num_prompts = profile["calibration"]["num_prompts"]
    vocab = engine.vocab_size or engine.executor.model.args.vocab_size
    block_size, max_len = engine_config.cache.block_size, engine.scheduler.max_model_len
    chunk = profile["grid"]["prefill_tokens"][-1]
    profile = {**profile, "prefill_context": measure_prefill_context(engine.executor, vocab, block_size, max_len,
                                                                     chunk, profile.get("reps", 5))}
    run = run_calibration(engine.executor, vocab, block_size, max_len, num_prompts, progress)
    cal = summarize_calibration(profile, run, num_prompts) | {"host": here}
    return {**profile, "calibration": cal, "correction": correction(cal["bins"])}


def measure_prefill_context(runner, vocab: int, block_size: int, max_len: int, chunk: int, reps: int
                            ) -> dict[str, Any]:
    """One `chunk`-token prefill chunk after 0 to 7k cached tokens of its prompt: the median time of
    `reps` runs at each offset that fits the model and the runner's pool (ProfileModel fits the
    attention cost per query-key pair on them)."""
    from batchpilot.engine.outputs import ScheduledRequest, SchedulerOutput
    from batchpilot.engine.request import Request
    from batchpilot.sampling_params import SamplingParams

    room = min(max_len, runner.num_blocks * block_size)
    offsets = [o for o in PREFILL_CONTEXT_OFFSETS if o + chunk <= room]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=1, seed=0)
    times = []
    for offset in offsets:
        length = offset + chunk
        req = Request("prefill-context", [(7 * t + 3) % vocab for t in range(length)], params, arrival_time=0.0)
        step = SchedulerOutput([ScheduledRequest(req, offset, chunk, list(range(-(-length // block_size))), True)],
                               chunk, 0)
        runner.execute(step)  # warm-up
        samples = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            runner.execute(step)
            samples.append(time.perf_counter() - t0)
        times.append(statistics.median(samples))
    return {"chunk": chunk, "offsets": offsets, "step_s": times}


def run_calibration(runner, vocab: int, block_size: int, max_len: int, num_prompts: int,
                    progress: bool = False) -> list[tuple[StepShape, float]]:
    """A fixed, seeded real workload through the engine on `runner`: each step's shape and time.

    Its real / grid ratio stands for other workloads because prefill chunks are costed by
    their own attention (see the module's docstring and docs/design_notes.md). The workload is
    none of benchmarks/sim_fidelity.py's.
    """
    from tqdm import tqdm

    from batchpilot.config import ControllerConfig, SchedulerConfig
    from batchpilot.controllers import make_controller
    from batchpilot.engine.block_pool import BlockPool, KVCacheManager
    from batchpilot.engine.engine import LLMEngine
    from batchpilot.engine.scheduler import Scheduler
    from batchpilot.sampling_params import SamplingParams

    # NOTE: always this pool, so that every run of the workload schedules the same steps
    pool = BlockPool(CALIBRATION_KV_TOKENS // block_size, block_size)
    assert runner.num_blocks >= pool.num_blocks, "the runner's KV cache is smaller than the calibration's pool"
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=CALIBRATION_BUDGET),
                          KVCacheManager(pool, enable_prefix_caching=False),
                          make_controller(ControllerConfig(name="static", max_num_seqs=64)), max_len)
    timed = TimedRunner(runner)
    engine = LLMEngine(scheduler, timed, tokenizer=None, vocab_size=vocab)
    rng = np.random.default_rng(1)
    for i in range(num_prompts):
        prompt = rng.integers(0, vocab, size=int(rng.integers(32, 513))).tolist()
        engine.add_request(prompt, SamplingParams(temperature=1.0, top_p=1.0, max_tokens=int(rng.integers(16, 193)),
                                                  ignore_eos=True, seed=i))
    with tqdm(total=num_prompts, desc="calibration", disable=not progress) as bar:
        while engine.has_unfinished_requests():
            bar.update(sum(out.finished for out in engine.step()))
    return timed.steps


class TimedRunner:
    """Wraps a runner: each executed step's shape and wall time (the runner's alone) in `steps`."""

    def __init__(self, runner):
        self.runner = runner
        self.steps: list[tuple[StepShape, float]] = []

    def execute(self, sched):
        t0 = time.perf_counter()
        out = self.runner.execute(sched)
        self.steps.append((step_shape(sched), time.perf_counter() - t0))
        return out
