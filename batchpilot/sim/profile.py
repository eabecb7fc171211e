"""The measured cost model: step times of the real engine over a grid, interpolated.

`batchpilot profile` runs the real model runner on synthetic steps — `b` decodes at context
`c` plus a prefill chunk of `p` tokens — and saves the median time of each grid point with
the machine it was taken on. `ProfileModel` answers a simulated step by multilinear
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

    @property
    def max_tokens_held(self) -> int:
        """KV slots the largest grid point needs."""
        return self.batch_sizes[-1] * self.context_lens[-1] + self.prefill_tokens[-1]


def host_description(threads: int | None) -> dict[str, Any]:
    """What the profile was measured on, saved beside it (a profile holds for its machine only)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "platform": platform.platform()}


def measure_profile(engine_config, grid: ProfileGrid, reps: int = 3, progress: bool = True) -> dict[str, Any]:
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
    args = runner.model.args
    max_len = engine.scheduler.max_model_len
    if grid.context_lens[-1] + 1 > max_len or grid.prefill_tokens[-1] > max_len:
        raise ValueError(f"--context-lens / --prefill-tokens exceed the model's context ({max_len})")
    # Sampling as the benchmarks sample (temperature 1, seeded), so its cost is in the profile.
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=1, seed=0)
    vocab = engine.vocab_size or args.vocab_size
    next_block = 0

    def request(tag: str, length: int) -> tuple[Request, list[int]]:
        nonlocal next_block
        n_blocks = -(-length // block_size)
        table = list(range(next_block, next_block + n_blocks))
        next_block += n_blocks
        prompt = [(7 * i + 3) % vocab for i in range(length)]
        return Request(tag, prompt, params, arrival_time=0.0), table

    def step(b: int, c: int, p: int) -> SchedulerOutput:
        nonlocal next_block
        next_block = 0
        scheduled = []
        for i in range(b):  # a decode: the last of c tokens is new, c - 1 are in the cache
            req, table = request(f"d{i}", c)
            scheduled.append(ScheduledRequest(req, c - 1, 1, table, True))
        if p:
            req, table = request("p", p)
            scheduled.append(ScheduledRequest(req, 0, p, table, True))
        return SchedulerOutput(scheduled, p, b)

    times = np.zeros((len(grid.batch_sizes), len(grid.context_lens), len(grid.prefill_tokens)))
    points = [(i, j, k) for i in range(len(grid.batch_sizes)) for j in range(len(grid.context_lens))
              for k in range(len(grid.prefill_tokens))]
    for i, j, k in tqdm(points, desc="profile", disable=not progress):
        b, c, p = grid.batch_sizes[i], grid.context_lens[j], grid.prefill_tokens[k]
        if b == 0 and (p == 0 or j > 0):  # nothing to run, or the same step as at the first context
            times[i, j, k] = times[i, 0, k]
            continue
        sched = step(b, c, p)
        runner.execute(sched)  # warm-up: allocator, generators, kernel caches
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            runner.execute(sched)
            samples.append(time.perf_counter() - t0)
        times[i, j, k] = statistics.median(samples)
    elem = torch.finfo(runner.model.dtype).bits // 8
    return {
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


class ProfileModel:
    """Step time from a measured profile (see `batchpilot profile`)."""

    def __init__(self, profile: dict[str, Any]):
        g = profile["grid"]
        self.grid = ProfileGrid(tuple(g["batch_sizes"]), tuple(g["context_lens"]), tuple(g["prefill_tokens"]))
        self.kv_bytes_per_token = int(profile["kv_bytes_per_token"])
        self.max_model_len = int(profile["max_model_len"])
        self.host = profile.get("host", {})
        values = np.asarray(profile["step_time_s"], dtype=float)
        self.axes = (self.grid.batch_sizes, self.grid.context_lens, self.grid.prefill_tokens)
        if values.shape != tuple(len(a) for a in self.axes):
            raise ValueError(f"profile step_time_s has shape {values.shape}, the grid needs "
                             f"{tuple(len(a) for a in self.axes)}")
        self.values = values.tolist()

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProfileModel:
        try:
            data = json.loads(Path(path).read_text())
            if data.get("version") != PROFILE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {PROFILE_VERSION}")
            return cls(data)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--profile {path}: not a batchpilot profile ({e})") from e

    def kv_capacity_tokens(self, kv_cache_gib: float) -> int:
        return int(kv_cache_gib * 2**30 // self.kv_bytes_per_token)

    def step_time(self, step: StepShape) -> float:
        prefill = sum(n for n, _ in step.prefills)
        if step.num_decodes == 0 and prefill == 0:
            return 0.0
        context = step.decode_context / step.num_decodes if step.num_decodes else self.grid.context_lens[0]
        return max(0.0, self.interpolate((step.num_decodes, context, prefill)))

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
