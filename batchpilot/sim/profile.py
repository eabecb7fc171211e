"""The measured cost model: step times of the real engine over a grid, interpolated.

`batchpilot profile` runs the real model runner on synthetic steps — `b` decodes at context
`c` plus a prefill chunk of `p` tokens — and saves the median time of each grid point with
the machine it was taken on; between the grid's passes it runs a fixed real workload and
keeps its real / grid time ratio by step size as the grid's `correction` (small steps and
large ones drift apart on this host). `profile --recalibrate` runs that workload again and
replaces the correction: the grid then stands for the host as it is now. `ProfileModel`
answers a simulated step by multilinear interpolation over (b, mean decode context, prefill
tokens), extrapolating linearly past the grid's edges. Like Vidur's operator profiles, but
per step: our runner does one forward for the whole mixed batch, so the step is the unit
that was measured.

The grid times one prefill chunk that starts its prompt; a step's chunks are often several
short prompts, or later parts of a long one. Prefill time grows with the square of the chunk
(attention: T(512) - T(256) is 1.5x T(256) - T(0) here), so the model takes that square
term q p^2 and replaces the grid's one-prompt share of it by the step's own attention work:
sum over chunks of new tokens x context. Without this the grid overpredicted steps with
512-token chunks by 10-20% inside runs. q is measured where it matters, on one chunk after
0 to 7k cached tokens of its prompt (`prefill_context`): fitted on the grid's prefill-only row
alone it came out 0 here, and the simulator then costed a 512-token chunk at context 7k (0.9 s
on this CPU) like one at context 0 (0.1 s).

Not modelled: host noise (the profile holds medians).
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import math
import os
import platform
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchpilot.executors.simulated import StepShape, step_shape

PROFILE_VERSION = 2  # 2: `correction` by step size, chunk-aware prefill (1: one `scale`)
DEFAULT_BATCH_SIZES = (0, 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
DEFAULT_CONTEXT_LENS = (64, 128, 256, 512, 1024)
DEFAULT_PREFILL_TOKENS = (0, 32, 128, 256, 512)
CALIBRATION_KV_TOKENS = 12_288  # the calibration run's pool: small enough to fill and preempt
CALIBRATION_BUDGET = 512  # its token budget per step (the engine's default)
CALIBRATION_RUNS = 3  # calibration runs at profile time; their median ratios are the correction
# Grid step times that split the calibration's steps for the correction: small decode batches
# (bandwidth-bound), large ones, and steps with prefill chunks, which a change of host state
# slows by different factors (docs/design_notes.md).
CALIBRATION_BIN_EDGES_S = (0.045, 0.1)
NO_CORRECTION = {"step_s": [1.0], "scale": [1.0]}  # the grid as measured
PREFILL_CONTEXT_OFFSETS = (0, 1024, 3072, 7168)  # cached tokens before the timed prefill chunk

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileGrid:
    batch_sizes: tuple[int, ...]
    context_lens: tuple[int, ...]
    prefill_tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        for name, axis, low in (("--batch-sizes", self.batch_sizes, 0), ("--context-lens", self.context_lens, 1),
                                ("--prefill-tokens", self.prefill_tokens, 0)):
            if len(axis) < 2 or list(axis) != sorted(set(axis)) or axis[0] < low:
                raise ValueError(f"{name} needs at least two increasing values >= {low}, got {list(axis)}")
        if self.batch_sizes[0] != 0 or self.prefill_tokens[0] != 0:
            raise ValueError("--batch-sizes and --prefill-tokens must start at 0 (steps without decodes / prefill)")

    def max_blocks(self, block_size: int) -> int:
        """KV blocks the largest grid point holds, and at least the calibration workload's pool."""
        per_decode = -(-self.context_lens[-1] // block_size)
        largest = self.batch_sizes[-1] * per_decode + -(-self.prefill_tokens[-1] // block_size)
        return max(largest, CALIBRATION_KV_TOKENS // block_size)


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


def correction(bins: list[dict[str, float]]) -> dict[str, list[float]]:
    """The grid's correction from a calibration's bins: their real / grid ratio at their mean step time."""
    return {"step_s": [b["mean_step_s"] for b in bins], "scale": [b["ratio"] for b in bins]}


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


def summarize_calibration(profile: dict[str, Any], run: list[tuple[StepShape, float]],
                          num_prompts: int) -> dict[str, Any]:
    """A calibration run against the grid: real and grid time, their ratio, overall and by step size."""
    grid_model = ProfileModel({**profile, "correction": NO_CORRECTION})
    real = [t for _, t in run]
    predicted = [grid_model.step_time(shape) for shape, _ in run]
    return {"workload": f"{num_prompts} requests at t=0, prompts uniform 32-512, outputs uniform 16-192, "
                        f"static 64, {CALIBRATION_KV_TOKENS} KV tokens, budget {CALIBRATION_BUDGET}",
            "num_prompts": num_prompts, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "steps": len(real), "real_s": sum(real), "predicted_s": sum(predicted), "ratio": sum(real) / sum(predicted),
            "bins": _bins(real, predicted)}


def _bins(real: list[float], predicted: list[float]) -> list[dict[str, float]]:
    """Steps split by grid time at CALIBRATION_BIN_EDGES_S: count, sums, real / grid ratio (empty bins left out)."""
    out = []
    edges = (0.0, *CALIBRATION_BIN_EDGES_S, float("inf"))
    for low, high in zip(edges, edges[1:]):
        pairs = [(r, p) for r, p in zip(real, predicted) if low <= p < high]
        if pairs:
            r, p = sum(r for r, _ in pairs), sum(p for _, p in pairs)
            out.append({"steps": len(pairs), "real_s": r, "predicted_s": p, "ratio": r / p,
                        "mean_step_s": p / len(pairs)})
    return out


class ProfileModel:
    """Step time from a measured profile (see `batchpilot profile`)."""

    def __init__(self, profile: dict[str, Any]):
        g = profile["grid"]
        self.grid = ProfileGrid(tuple(g["batch_sizes"]), tuple(g["context_lens"]), tuple(g["prefill_tokens"]))
        self.kv_bytes_per_token = int(profile["kv_bytes_per_token"])
        self.max_model_len = int(profile["max_model_len"])
        self.profile = profile  # as loaded (recalibration rewrites its correction)
        knots = profile.get("correction", NO_CORRECTION)  # in-run / grid time by step size (see `recalibrate`)
        self.correction_step_s = [float(t) for t in knots["step_s"]]
        self.correction_scale = [float(k) for k in knots["scale"]]
        if not self.correction_step_s or len(self.correction_step_s) != len(self.correction_scale) \
                or self.correction_step_s != sorted(self.correction_step_s) or min(self.correction_step_s) <= 0:
            raise ValueError(f"profile correction needs increasing positive step_s, one scale each, got {knots}")
        values = np.asarray(profile["step_time_s"], dtype=float)
        self.axes = (self.grid.batch_sizes, self.grid.context_lens, self.grid.prefill_tokens)
        if values.shape != tuple(len(a) for a in self.axes):
            raise ValueError(f"profile step_time_s has shape {values.shape}, the grid needs "
                             f"{tuple(len(a) for a in self.axes)}")
        self.values = values.tolist()
        measured = profile.get("prefill_context")
        if measured and len(measured["offsets"]) >= 2:
            self.prefill_square_s = self._fit_context(measured)
        else:  # a profile made before `prefill_context` was measured
            self.prefill_square_s = self._fit_prefill_square(values[0, 0, 1:])

    @staticmethod
    def _fit_context(measured: dict[str, Any]) -> float:
        """q from chunks after o cached tokens: T(o) = T(0) + 2 q n o (n new tokens, n o more pairs,
        2 q per pair as in T(p) = a + l p + q p^2 with p^2 / 2 causal pairs)."""
        o = np.asarray(measured["offsets"], dtype=float)
        slope, _ = np.polyfit(o, np.asarray(measured["step_s"], dtype=float), 1)
        return max(0.0, float(slope) / (2 * measured["chunk"]))

    def _fit_prefill_square(self, prefill_only_s: np.ndarray) -> float:
        """q in T(p) = a + l p + q p^2 over the grid's prefill-only steps (0 without 3 points to fit)."""
        p = np.asarray(self.grid.prefill_tokens[1:], dtype=float)
        if len(p) < 3:
            return 0.0
        (_, _, q), *_ = np.linalg.lstsq(np.stack([np.ones_like(p), p, p * p], 1), prefill_only_s, rcond=None)
        return max(0.0, float(q))

    @classmethod
    def load(cls, path: str | os.PathLike, flag: str = "--profile") -> ProfileModel:
        try:
            data = json.loads(Path(path).read_text())
            if data.get("version") != PROFILE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {PROFILE_VERSION}")
            return cls(data)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{flag} {path}: not a batchpilot profile ({e})") from e

    def kv_capacity_tokens(self, kv_cache_gib: float) -> int:
        return int(kv_cache_gib * 2**30 // self.kv_bytes_per_token)

    def step_time(self, step: StepShape) -> float:
        prefill = sum(n for n, _ in step.prefills)
        if step.num_decodes == 0 and prefill == 0:
            return 0.0
        context = step.decode_context / step.num_decodes if step.num_decodes else self.grid.context_lens[0]
        t = self.interpolate((step.num_decodes, context, prefill))
        if prefill:  # the grid's one chunk of `prefill` tokens from position 0 -> the step's chunks
            attention = sum(n * end - n * n / 2 for n, end in step.prefills)  # new tokens x context
            t -= self.prefill_square_s * (prefill * prefill - 2 * attention)
        t = max(0.0, t)
        return t * self.correction(t)

    def correction(self, t: float) -> float:
        """The correction of a step of grid time t: linear in log t between the knots, flat outside."""
        ts, scales = self.correction_step_s, self.correction_scale
        if t <= ts[0]:
            return scales[0]
        if t >= ts[-1]:
            return scales[-1]
        i = bisect.bisect_right(ts, t) - 1
        w = math.log(t / ts[i]) / math.log(ts[i + 1] / ts[i])
        return scales[i] + w * (scales[i + 1] - scales[i])

    def interpolate(self, point: tuple[float, float, float]) -> float:
        """Multilinear in (b, c, p), linear past the edges from the outermost segment.

        NOTE: by hand, not scipy's RegularGridInterpolator: this runs once per simulated step
        and plain Python on three axes is ~10x faster than a numpy call for one point.
        """
        cells = []
        for axis, x in zip(self.axes, point):
            i = min(max(bisect.bisect_right(axis, x) - 1, 0), len(axis) - 2)
            cells.append((i, (x - axis[i]) / (axis[i + 1] - axis[i])))
        total = 0.0
        for corner in itertools.product((0, 1), repeat=3):
            weight, v = 1.0, self.values
            for (i, w), up in zip(cells, corner):
                weight *= w if up else 1.0 - w
                v = v[i + up]
            total += weight * v
        return total
