"""The measured cost model: step times of the real engine over a grid, interpolated.

A profile (made by `batchpilot profile`, sim/measure.py) holds the median time of the real
model runner on synthetic steps — `b` decodes at context `c` plus a prefill chunk of `p`
tokens — with the machine it was taken on, and a `correction`: the real / grid time ratio of
a fixed real workload by step size (small steps and large ones drift apart on a host).
`ProfileModel`
answers a simulated step by multilinear interpolation over (b, mean decode context, prefill
tokens), extrapolating linearly past the grid's edges. Like Vidur's operator profiles, but
per step: our runner does one forward for the whole mixed batch, so the step is the unit
that was measured.

The grid times one prefill chunk that starts its prompt; a step's chunks are often several
short prompts, or later parts of a long one. Prefill time grows with the square of the chunk
(attention: T(512) - T(256) is 1.5x T(256) - T(0) here), so the model takes that square
term q p^2 and replaces the grid's one-prompt share of it by the step's own attention work:
sum over chunks of new tokens x context. q is measured where it matters, on one chunk after
0 to 7k cached tokens of its prompt (`prefill_context`), not fitted on the grid's prefill-only
row, which cannot see the context (docs/design_notes.md has the measurements behind both).

Not modelled: host noise (the profile holds medians).
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchpilot.executors.simulated import StepShape

PROFILE_VERSION = 2  # 2: `correction` by step size, chunk-aware prefill (1: one `scale`)
CALIBRATION_KV_TOKENS = 12_288  # the calibration run's pool: small enough to fill and preempt
CALIBRATION_BUDGET = 512  # its token budget per step (the engine's default)
# Grid step times that split the calibration's steps for the correction: small decode batches
# (bandwidth-bound), large ones, and steps with prefill chunks, which a change of host state
# slows by different factors (docs/design_notes.md).
CALIBRATION_BIN_EDGES_S = (0.045, 0.1)
NO_CORRECTION = {"step_s": [1.0], "scale": [1.0]}  # the grid as measured


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


def correction(bins: list[dict[str, float]]) -> dict[str, list[float]]:
    """The grid's correction from a calibration's bins: their real / grid ratio at their mean step time."""
    return {"step_s": [b["mean_step_s"] for b in bins], "scale": [b["ratio"] for b in bins]}


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
