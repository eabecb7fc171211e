"""The measured cost model: step times of the real engine over a grid, interpolated.

`batchpilot profile` runs the real model runner on synthetic steps — `b` decodes at context
`c` plus a prefill chunk of `p` tokens — and saves the median time of each grid point with
the machine it was taken on; a short real workload then sets one `scale` for the whole grid
(steps inside a run are slower than the same steps timed alone). `ProfileModel` answers a simulated step by multilinear
interpolation over (b, mean decode context, prefill tokens), extrapolating linearly past the
grid's edges. Like Vidur's operator profiles, but per step: our runner does one forward
for the whole mixed batch, so the step is the unit that was measured.

Not modelled: a prefill chunk's attention over context computed in earlier steps (chunks
are costed as if they started the prompt), and host noise (the profile holds medians).
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchpilot.sim.roofline import StepShape

PROFILE_VERSION = 1
DEFAULT_BATCH_SIZES = (0, 1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_CONTEXT_LENS = (64, 256, 1024)
DEFAULT_PREFILL_TOKENS = (0, 32, 128, 512)
CALIBRATION_KV_TOKENS = 12_288  # the calibration run's pool: small enough to fill and preempt
CALIBRATION_BUDGET = 512  # its token budget per step (the engine's default)


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
        """KV blocks the largest grid point holds."""
        per_decode = -(-self.context_lens[-1] // block_size)
        return self.batch_sizes[-1] * per_decode + -(-self.prefill_tokens[-1] // block_size)


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
    # a drift of the host spreads over the grid as noise. The first pass is a warm-up.
    with tqdm(total=(reps + 1) * len(points), desc="profile", disable=not progress) as bar:
        for rep in range(reps + 1):
            for n in rng.permutation(len(points)):
                point = points[n]
                t0 = time.perf_counter()
                runner.execute(steps[point])
                if rep:
                    samples[point].append(time.perf_counter() - t0)
                bar.update()
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
    if calibration_prompts:
        return calibrate(runner, profile, vocab, block_size, max_len, calibration_prompts, progress)
    return profile


def recalibrate(engine_config, profile: dict[str, Any], num_prompts: int, progress: bool = True) -> dict[str, Any]:
    """The profile with its scale measured again on this host, now (the grid is kept).

    The host's speed drifts (the same benchmark here: 303 and 335 tok/s eight minutes apart);
    a fresh scale (about 40 s) before a comparison with real runs takes that drift out.
    """
    from batchpilot.llm import build_engine

    engine = build_engine(engine_config)
    return calibrate(engine.executor, profile, engine.vocab_size or engine.executor.model.args.vocab_size,
                     engine_config.cache.block_size, engine.scheduler.max_model_len, num_prompts, progress)


def calibrate(runner, profile: dict[str, Any], vocab: int, block_size: int, max_len: int, num_prompts: int,
              progress: bool) -> dict[str, Any]:
    """The profile with `calibration` and `scale` from a short real workload on `runner`.

    The grid times steps in isolation; inside a run the block tables, the caches and the mix of
    steps differ (measured here: 0.95 when the profile was taken; 10-20% slower in longer
    benchmark runs, see docs/reproduction.md). The scale is the ratio of the summed real step
    times to the grid's predictions. The workload is fixed and is none of
    benchmarks/sim_fidelity.py's.
    """
    grid_model = ProfileModel({**profile, "scale": 1.0})
    from tqdm import tqdm

    from batchpilot.config import ControllerConfig, SchedulerConfig
    from batchpilot.controllers import make_controller
    from batchpilot.engine.block_pool import BlockPool, KVCacheManager
    from batchpilot.engine.engine import LLMEngine
    from batchpilot.engine.scheduler import Scheduler
    from batchpilot.executors.simulated import step_shape
    from batchpilot.sampling_params import SamplingParams

    real: list[float] = []
    predicted: list[float] = []

    class TimedRunner:
        def execute(self, sched):
            shape = step_shape(sched)
            t0 = time.perf_counter()
            out = runner.execute(sched)
            real.append(time.perf_counter() - t0)
            predicted.append(grid_model.step_time(shape))
            return out

    pool = BlockPool(min(runner.num_blocks, CALIBRATION_KV_TOKENS // block_size), block_size)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=CALIBRATION_BUDGET), KVCacheManager(pool),
                          make_controller(ControllerConfig(name="static", max_num_seqs=64)), max_len)
    engine = LLMEngine(scheduler, TimedRunner(), tokenizer=None, vocab_size=vocab)
    rng = np.random.default_rng(1)
    for i in range(num_prompts):
        prompt = rng.integers(0, vocab, size=int(rng.integers(32, 513))).tolist()
        engine.add_request(prompt, SamplingParams(temperature=1.0, top_p=1.0, max_tokens=int(rng.integers(16, 193)),
                                                  ignore_eos=True, seed=i))
    with tqdm(total=num_prompts, desc="calibration", disable=not progress) as bar:
        while engine.has_unfinished_requests():
            bar.update(sum(out.finished for out in engine.step()))
    scale = sum(real) / sum(predicted)
    calibration = {"workload": f"{num_prompts} requests at t=0, prompts uniform 32-512, outputs uniform 16-192, "
                               f"static 64, {pool.num_blocks * block_size} KV tokens, budget {CALIBRATION_BUDGET}",
                   "steps": len(real), "real_s": sum(real), "predicted_s": sum(predicted), "scale": scale}
    return {**profile, "calibration": calibration, "scale": scale}


class ProfileModel:
    """Step time from a measured profile (see `batchpilot profile`)."""

    def __init__(self, profile: dict[str, Any]):
        g = profile["grid"]
        self.grid = ProfileGrid(tuple(g["batch_sizes"]), tuple(g["context_lens"]), tuple(g["prefill_tokens"]))
        self.kv_bytes_per_token = int(profile["kv_bytes_per_token"])
        self.max_model_len = int(profile["max_model_len"])
        self.profile = profile  # as loaded (recalibration rewrites it with a new scale)
        self.scale = float(profile.get("scale", 1.0))  # from the calibration run (see `calibrate`)
        values = np.asarray(profile["step_time_s"], dtype=float)
        self.axes = (self.grid.batch_sizes, self.grid.context_lens, self.grid.prefill_tokens)
        if values.shape != tuple(len(a) for a in self.axes):
            raise ValueError(f"profile step_time_s has shape {values.shape}, the grid needs "
                             f"{tuple(len(a) for a in self.axes)}")
        self.values = values.tolist()

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
        return max(0.0, self.scale * self.interpolate((step.num_decodes, context, prefill)))

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
