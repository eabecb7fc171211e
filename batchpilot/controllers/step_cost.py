"""What a step costs on this machine, learned from the steps that ran.

A step's time is modelled as `fixed + per_prefill * prefill_tokens + per_decode * decode_tokens`
and fitted by least squares over a sliding window of `StepStats`. Two numbers follow from it that
a memory policy weighs against each other (docs/method.md, the `cost` memory limit):

- what one more running row is worth: in a step of b rows each token costs step_time / b on
  average, but the extra row adds only `per_decode`, so it saves `fixed / b` seconds of work a step;
- what a preemption costs: its victim's tokens are prefilled again, `per_prefill` each.

On a GPU the fixed part (reading the weights) dominates a decode step and a prefill token is cheap,
so a larger batch is worth a late preemption; on a CPU a prefill token costs about what a row
saves in a step, so it rarely is. The fit is the measurement that tells them apart.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import numpy as np

from batchpilot.controllers.base import StepStats


class StepCost(NamedTuple):
    fixed_s: float  # a step's cost that does not depend on its tokens (weights read, launch, Python)
    per_prefill_s: float  # each prompt (or recomputed) token in a step
    per_decode_s: float  # each decoding row in a step


class StepCostModel:
    """Least-squares fit of step time on (1, prefill tokens, decode tokens), refitted every
    `refit_every` steps, and every `cold_refit_every` until a first fit holds. `cost()` is None until
    the window has once held `min_steps` steps of both kinds (with prefill and decode-only), so that
    the three terms can be told apart. A run whose requests all come at once has a few prefill steps
    (a 512-token step admits a dozen short prompts) and then one admission per finish: asking for 8
    of them left the cost rule off for the first 500 steps of a 67-request run, where it decides
    (docs/reproduction.md); two prefill steps of hundreds of tokens already fix their term.

    A fit that reads a per-row cost below zero by more than twice its standard error is not taken:
    a row cannot make a step faster, so the steps confound the terms. Early in a run the first
    prefill steps are slow (caches cold) and the decode-only steps all hold about the same batch;
    least squares then reads a negative per-row cost and a fixed term several times the true one
    (81 ms against ~15 ms at one run's step 8, docs/reproduction.md), and the cost rule, which admits
    past an overflow in proportion to fixed / per_prefill, admitted past every one.
    """

    def __init__(self, window: int = 512, min_steps: int = 4, refit_every: int = 64, cold_refit_every: int = 4):
        self.rows: deque[tuple[float, float, float]] = deque(maxlen=window)
        self.min_steps = min_steps
        self.refit_every = refit_every
        self.cold_refit_every = cold_refit_every
        self._since_fit = 0
        self._cost: StepCost | None = None

    def add(self, stats: StepStats) -> None:
        if stats.num_prefill_tokens + stats.num_decode_tokens == 0 or stats.step_time_s <= 0:
            return
        self.rows.append((stats.num_prefill_tokens, stats.num_decode_tokens, stats.step_time_s))
        self._since_fit += 1
        if self._since_fit >= (self.refit_every if self._cost is not None else self.cold_refit_every):
            self._since_fit = 0
            # A window that cannot separate the terms (a long phase of decode-only steps) keeps the
            # last fit: the machine did not change, only the mix of steps that measure it.
            self._cost = self._fit() or self._cost

    def cost(self) -> StepCost | None:
        return self._cost

    def _fit(self) -> StepCost | None:
        data = np.asarray(self.rows, dtype=np.float64)
        prefill, decode, seconds = data[:, 0], data[:, 1], data[:, 2]
        with_prefill = int(np.count_nonzero(prefill))
        if with_prefill < self.min_steps // 2 or len(data) - with_prefill < self.min_steps // 2:
            return None
        x = np.column_stack([np.ones_like(prefill), prefill, decode])
        coef, _, rank, _ = np.linalg.lstsq(x, seconds, rcond=None)
        if rank < 3:
            return None
        fixed, per_prefill, per_decode = (float(c) for c in coef)
        if per_decode < -2 * _standard_errors(x, seconds, coef)[2]:
            return None
        # A negative term is noise around zero: held at zero, it neither inflates nor hides a cost.
        return StepCost(max(fixed, 0.0), max(per_prefill, 0.0), max(per_decode, 0.0))


def _standard_errors(x: np.ndarray, y: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """Each coefficient's standard error: the residual variance times the diagonal of (X^T X)^-1
    (0 for an exact fit, as when the steps are a model's own noiseless output)."""
    dof = len(y) - x.shape[1]
    if dof <= 0:
        return np.zeros(x.shape[1])
    residual = y - x @ coef
    variance = float(residual @ residual) / dof
    return np.sqrt(variance * np.clip(np.diag(np.linalg.pinv(x.T @ x)), 0.0, None))
