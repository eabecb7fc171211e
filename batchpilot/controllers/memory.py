"""b_mem: how many sequences the KV pool can hold (docs/method.md).

Four forms:
- `cost` (the default): the `peak` bound's prediction of when the pool would overflow, and an
  admission past it only when the measured batch gain pays for the recompute it will cause
  (`controllers/peak.py`, `controllers/step_cost.py`); `blocks` decides until lengths are known.
- `peak`: admits while the predicted KV peak of the admitted set stays in the pool (`peak.py`).
- `blocks`: the authors' vLLM patch. While requests both wait and run, divide the pool by
  the blocks a running sequence holds on average (times a memory factor); otherwise keep
  the previous value. It only sees what is already in the cache, not the outputs to come.
- `clt`: the paper's bound. Per-request tokens (prompt + output) have mean mu and spread
  sigma; the total of b requests is ~Normal(b mu, b sigma^2), and the largest b with
  Pr(total > capacity) <= epsilon solves mu x^2 + z sigma x - eta = 0 for x = sqrt(b).

`blocks` divides by the blocks the pool lends out, so a prefix shared by several sequences
counts once; `clt`, `peak` and `cost` (lengths per request) add the blocks sharing saves to the
pool instead.
Either way the result is clamped to [B_min, B_max] and never below the running count; the
block pool stays the hard limit (the scheduler admits nothing it cannot allocate).
"""

from __future__ import annotations

import math
from collections import deque
from functools import lru_cache
from statistics import NormalDist

from batchpilot.controllers.base import SchedulerView, StepStats
from batchpilot.controllers.peak import PeakBound
from batchpilot.controllers.step_cost import StepCostModel

PEAK_LOOKAHEAD = 32  # waiting requests the peak bound considers per step
# Steps the peak bound's answer is reused while nothing it depends on changes (no request finished,
# was preempted, admitted or arrived): it costs ~0.2-0.8 ms, 1-4% of a small model's decode step on a
# CPU, and between such events it only loosens slowly as the running requests age (docs/method.md).
PEAK_REFRESH_STEPS = 8
# The cost mode's overflow step: where the predicted use passes the pool by one standard deviation
# (z = 1). A z sweep in the simulator (docs/reproduction.md) put 1 ahead of 0 and 2.24.
COST_OVERFLOW_EPSILON = 0.1587


def clt_batch_limit(mu: float, sigma: float, capacity_tokens: float, epsilon: float) -> int:
    """Largest b with b mu + z sigma sqrt(b) <= capacity, z = Phi^-1(1 - epsilon)."""
    if mu <= 0:
        raise ValueError(f"mean tokens per request must be positive, got {mu}")
    z = _normal_quantile(1 - epsilon)
    x = (-z * sigma + math.sqrt(z * z * sigma * sigma + 4 * mu * capacity_tokens)) / (2 * mu)
    return math.floor(x * x + 1e-9)


@lru_cache(maxsize=16)
def _normal_quantile(p: float) -> float:
    """Phi^-1(p); cached, since the limit is computed every step with the same epsilon."""
    return NormalDist().inv_cdf(p)


def blocks_batch_limit(total_blocks: int, free_blocks: int, num_running: int, memory_factor: float) -> int:
    """The authors' heuristic: total_blocks * factor / (used blocks per running sequence)."""
    blocks_per_seq = (total_blocks - free_blocks) / num_running
    if blocks_per_seq <= 0:
        return 0
    return math.floor(total_blocks * memory_factor / blocks_per_seq)


class TokenStats:
    """Online mean and spread of tokens per request.

    Finished requests (their final length) fill a sliding window. Until `min_finished` have
    been seen, running requests' current lengths stand in as the prior; they only grow,
    so they underestimate, and the window takes over as soon as it can.
    """

    def __init__(self, window: int = 256, min_finished: int = 16):
        self.finished: deque[int] = deque(maxlen=window)
        self.min_finished = min_finished
        # NOTE: integer sums of the window, kept as it slides: the estimate is read every step
        # and its window changes at nearly every step, so it is not recomputed from the window.
        self._sum = self._sum_sq = 0

    def add_finished(self, lengths: tuple[int, ...]) -> None:
        window = self.finished
        for n in lengths:
            if len(window) == window.maxlen:
                old = window[0]
                self._sum -= old
                self._sum_sq -= old * old
            window.append(n)
            self._sum += n
            self._sum_sq += n * n

    def estimate(self, view: SchedulerView) -> tuple[float, float] | None:
        """(mu, sigma) in tokens, or None with no data at all."""
        if len(self.finished) >= self.min_finished:
            return _mean_std(len(self.finished), self._sum, self._sum_sq)
        samples = list(self.finished) + [s.num_tokens for s in view.running()]
        return _mean_std(len(samples), sum(samples), sum(s * s for s in samples)) if samples else None


def _mean_std(n: int, total: int, total_sq: int) -> tuple[float, float]:
    """Mean and sample standard deviation of n integers from their sum and sum of squares (exact)."""
    var = (n * total_sq - total * total) / (n * max(1, n - 1))
    return total / n, math.sqrt(var)


class MemoryController:
    name = "memory"

    def __init__(self, mode: str = "cost", memory_factor: float = 0.95, epsilon: float = 0.05,
                 min_num_seqs: int = 1, max_num_seqs: int = 256, window: int = 256):
        self.mode = mode
        self.memory_factor = memory_factor
        self.epsilon = epsilon
        self.b_min, self.b_max = min_num_seqs, max_num_seqs
        self.stats = TokenStats(window=window)
        self.peak: PeakBound | None = None
        self.step_cost: StepCostModel | None = None
        if mode == "peak":
            self.peak = PeakBound(epsilon)
        elif mode == "cost":  # the overflow step is located, not avoided: the cost rule decides (docs/method.md)
            self.peak, self.step_cost = PeakBound(COST_OVERFLOW_EPSILON, marginals=1), StepCostModel()
        self.b_mem = max_num_seqs  # no information yet: the pool alone gates admission
        self._peak_key: tuple[int, int] | None = None  # (running, waiting) the peak bound last answered for
        self._peak_age = 0  # steps since it answered
        self.peak_refresh_steps = PEAK_REFRESH_STEPS

    @property
    def trace(self) -> dict[str, float]:
        cost = self.step_cost.cost() if self.step_cost is not None else None
        if cost is None:
            return {"b_mem": self.b_mem}
        return {"b_mem": self.b_mem, "step_fixed_ms": cost.fixed_s * 1e3, "prefill_token_ms": cost.per_prefill_s * 1e3,
                "decode_row_ms": cost.per_decode_s * 1e3}

    def limit(self, view: SchedulerView) -> int:
        if self.peak is not None:  # peak and cost
            if view.num_waiting and self._peak_stale(view):  # only admissions depend on it
                # A step admits a few prompts at most (its token budget): look a bounded way down the queue.
                lookahead = min(self.b_max - view.num_running, PEAK_LOOKAHEAD)
                if self.step_cost is None:
                    admitted = self.peak.admissible(view, lookahead)
                else:
                    admitted = self.peak.admissible(view, lookahead, self.step_cost.cost(), cold="defer")
                if admitted is None:  # no lengths known yet: the pool's current occupancy is all there is
                    self._blocks_limit(view)
                else:
                    self.b_mem = self._clamp(view.num_running + admitted, view.num_running)
            return max(self.b_mem, view.num_running)
        if self.mode == "blocks":
            self._blocks_limit(view)
        else:
            estimate = self.stats.estimate(view)
            if estimate is not None:
                # Request lengths count a shared prefix once per sequence: so does this capacity.
                capacity = (view.num_total_blocks + view.num_saved_blocks) * view.block_size
                raw = clt_batch_limit(estimate[0], estimate[1], capacity, self.epsilon)
                self.b_mem = self._clamp(raw, view.num_running)
        return self.b_mem

    def _peak_stale(self, view: SchedulerView) -> bool:
        """Whether the peak bound must answer again: the running set or the queue changed, a
        request finished or was preempted (observe() forgets the key), or its answer is
        PEAK_REFRESH_STEPS old."""
        key = (view.num_running, view.num_waiting)
        self._peak_age += 1
        if key == self._peak_key and self._peak_age < self.peak_refresh_steps:
            return False
        self._peak_key, self._peak_age = key, 0
        return True

    def observe(self, stats: StepStats) -> None:
        self.stats.add_finished(stats.finished_lens)
        if self.peak is not None:
            self.peak.lengths.add(stats.finished_output_lens)
            if stats.finished_lens or stats.num_preemptions:
                self._peak_key = None
        if self.step_cost is not None:
            self.step_cost.add(stats)

    def _blocks_limit(self, view: SchedulerView) -> None:
        if view.num_waiting > 0 and view.num_running > 0:
            raw = blocks_batch_limit(view.num_total_blocks, view.num_free_blocks, view.num_running, self.memory_factor)
            self.b_mem = self._clamp(raw, view.num_running)

    def _clamp(self, b: int, num_running: int) -> int:
        return min(max(b, num_running, self.b_min), self.b_max)
