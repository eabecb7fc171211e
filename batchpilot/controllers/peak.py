"""b_mem from where each request is: the KV peak of the admitted set, request by request.

The paper's CLT bound treats every admitted request as if it sat at its final length at the
same moment; in continuous batching they are spread over their lifetimes, so it admits about
half of what fits. This bound follows each request instead. A running request holds
`num_tokens` now and grows by one token per step until it finishes; how much longer it runs
is read from the finished requests' output lengths, conditioned on the output it has already
produced, and capped by its own max_tokens. At each future step t of a grid, the pool's use is
a sum of independent terms (a request's blocks at t if it still runs, else 0): its mean plus z
standard deviations must stay within the pool at every t. Waiting requests are admitted, in
queue order, while the bound holds with each one added.

Before any request has finished there is no length data and no prior: a request is assumed
to run to its max_tokens (clipped), which never over-admits.
"""

from __future__ import annotations

import math
from collections import deque
from functools import lru_cache
from statistics import NormalDist

import numpy as np

from batchpilot.controllers.base import SchedulerView
from batchpilot.controllers.step_cost import StepCost

GRID_POINTS = 24  # future steps at which the peak is checked (0, then geometric to the horizon)
# The bound holds each future step's use under the pool with probability 1 - epsilon / PEAK_MARGINALS:
# overflow at *any* step is likelier than at one (the Monte Carlo test in tests/test_controllers.py
# holds it to epsilon; docs/design_notes.md has the factor's measurement).
PEAK_MARGINALS = 4


class OutputLengths:
    """A sliding window of finished requests' output lengths, sorted on demand."""

    def __init__(self, window: int = 1024):
        self.window: deque[int] = deque(maxlen=window)
        self._sorted: np.ndarray | None = None

    def add(self, lengths: tuple[int, ...]) -> None:
        if lengths:
            self.window.extend(lengths)
            self._sorted = None

    def sorted(self) -> np.ndarray:
        if self._sorted is None:
            self._sorted = np.sort(np.fromiter(self.window, dtype=np.int64, count=len(self.window)))
        return self._sorted

    def __len__(self) -> int:
        return len(self.window)


class PeakBound:
    """Admits while Pr(KV use > pool) stays under epsilon at every future step (normal approximation)."""

    def __init__(self, epsilon: float = 0.05, window: int = 1024, min_finished: int = 8,
                 cold_output_cap: int = 4096, marginals: int = PEAK_MARGINALS):
        self.z = _z(epsilon / marginals)
        self.lengths = OutputLengths(window)
        self.min_finished = min_finished
        self.cold_output_cap = cold_output_cap

    def survival(self, out: np.ndarray, cap: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """P(request i still runs t steps from now), shape (requests, steps), from each request's
        output so far (`out`, shape (requests, 1)) and output cap (`cap`, likewise)."""
        later = out + steps[None, :]
        if len(self.lengths) < self.min_finished:  # cold: to its cap, clipped
            return (later < np.minimum(cap, self.cold_output_cap)).astype(np.float64)
        seen = self.lengths.sorted()
        n = seen.size
        longer_now = n - np.searchsorted(seen, out, side="right")  # finished samples longer than it is
        longer_then = n - np.searchsorted(seen, later, side="right")
        p = np.where(longer_now > 0, longer_then / np.maximum(longer_now, 1), 0.0)
        # Longer than every finished request: assume it runs as long again as it has (Lindy).
        tail = (longer_now == 0) & (later < 2 * out + 1)
        p = np.where(tail, 1.0, p)
        return np.where(later < cap, p, 0.0)

    def knows_lengths(self, states: np.ndarray) -> bool:
        """Whether every request's remaining length is known or estimated from finished ones."""
        return len(self.lengths) >= self.min_finished or bool(np.all(states[:, 3] > 0))

    def admissible(self, view: SchedulerView, candidates: int, cost: StepCost | None = None,
                   cold: str = "cap") -> int | None:
        """How many of the first `candidates` waiting requests fit with the running ones.

        With a `cost`, a candidate whose admission makes the bound fail at a future step t (not
        now) is admitted anyway when what it adds to the batch until then is worth more than
        recomputing it at t (it is the newest request, the one preempted): t * fixed / b seconds
        saved against (its tokens + t) * per_prefill. `cold="defer"` returns None instead of
        assuming every request runs to its cap while lengths are unknown."""
        waiting = view.waiting(candidates)
        if not waiting:
            return 0
        running = view.running()
        states = np.array(running + waiting, dtype=np.float64).reshape(-1, 4)  # tokens, output, cap, exact
        if cold == "defer" and not self.knows_lengths(states):
            return None
        out, cap = states[:, 1:2], states[:, 2:3]
        bs = view.block_size
        capacity = (view.num_total_blocks + view.num_saved_blocks) * bs  # per-sequence sizes count shared blocks
        exact = states[:, 3:4] > 0
        # To the last step any request may still run (survival's own reach): its cap when its length
        # is known, else the finished ones' longest, or its own tail past them; a long request must
        # not grow beyond a horizon drawn from a history of short ones.
        reach = np.where(exact, cap, np.minimum(cap, np.maximum(self._longest(), 2 * out + 1)))
        steps = _grid(max(1.0, float(np.max(reach - out))))
        if exact.any():  # use peaks just before a known-length request ends: check those steps too
            ends = (cap - out - 1)[exact]
            steps = np.unique(np.concatenate([steps, ends[(ends >= 0) & (ends <= steps[-1])].astype(np.int64)]))
        p = self.survival(out, cap, steps)
        p = np.where(exact, (out + steps[None, :] < cap).astype(np.float64), p)  # known lengths
        size = np.ceil((states[:, 0:1] + steps[None, :]) / bs) * bs  # its tokens in whole blocks, if it runs
        held = size * p
        var = size**2 * p * (1 - p)
        mean = held[: len(running)].sum(axis=0)
        spread = var[: len(running)].sum(axis=0)
        admitted = 0
        for j in range(len(running), len(states)):
            mean = mean + held[j]
            spread = spread + var[j]
            over = np.flatnonzero(mean + self.z * np.sqrt(spread) > capacity)
            if over.size and not (cost is not None and self._worth_overflow(cost, steps[over[0]], states[j, 0], j + 1)):
                break
            admitted += 1
        return admitted

    @staticmethod
    def _worth_overflow(cost: StepCost, step: float, tokens: float, batch: int) -> bool:
        """A preemption `step` steps ahead of a request of `tokens` tokens, in a batch of `batch` rows."""
        return step > 0 and step * cost.fixed_s / batch > (tokens + step) * cost.per_prefill_s

    def _longest(self) -> float:
        if len(self.lengths) < self.min_finished:
            return float(self.cold_output_cap)
        return float(self.lengths.sorted()[-1]) * 2 + 1


def _grid(horizon: float) -> np.ndarray:
    """Step 0, then geometric steps to the horizon (rounded up to a power of two, so grids repeat)."""
    return _grid_to(1 << max(0, math.ceil(math.log2(horizon))))


@lru_cache(maxsize=64)
def _grid_to(horizon: int) -> np.ndarray:
    return np.unique(np.concatenate([[0.0], np.geomspace(1.0, horizon, GRID_POINTS - 1)]).astype(np.int64))


def _z(epsilon: float) -> float:
    return NormalDist().inv_cdf(1 - epsilon)
