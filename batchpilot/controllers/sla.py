"""b_sla: the largest batch whose decode latency stays inside the SLA band (docs/method.md).

D(b), the step latency at batch b, is unknown and not even convex, so the limit is found by
an online interval search: too slow moves [b_low, b_high] down, too fast moves it up, inside
the band tightens it around the batch that was measured; b_sla is its midpoint.

Signal (our choice, `--sla-signal`):
- `tpot` (default): the time per output token that decoding requests actually see: over the
  window, the mean step time weighted by the decode tokens in each step, counting steps that
  also prefill a chunk. Those stalls are part of every user's TPOT, so an SLA on TPOT must
  see them. The window is 16 steps until requests finish, then about a request's life (the mean
  output length of recent requests, up to 256 steps): what each user's TPOT averages over.
- `decode`: the paper's D(b), measured on decode-only steps; steps with any prefill tokens
  are dropped. It identifies the latency curve cleanly but cannot keep a TPOT SLA when
  admissions are frequent: the mixed steps users wait through never enter the signal
  (docs/design_notes.md).

Percentile (`--sla-percentile`, 90 by default; 0 holds the mean, as the paper): users state an
SLA as a percentile of requests' TPOT, and requests spread around the mean (prefill stalls hit
some more than others). The loop keeps its fast per-step signal but scales it by how far the
chosen percentile of recently finished requests' TPOT sits above their mean, so it holds that
percentile, not the mean, inside the band.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from batchpilot.controllers.base import SchedulerView, StepStats

# While the request next in line has waited this share of its TTFT target (its SLA class's, else --sla-ttft-ms),
# the loop lets go: a request that misses its TTFT misses the SLA whatever its TPOT (docs/design_notes.md).
TTFT_RELEASE = 0.8
SPREAD_WINDOW = 32  # finished requests whose TPOT spread scales the signal (few: docs/design_notes.md)
MIN_SPREAD_SAMPLES = 16
# The signal's window follows the mean output length of the last SPREAD_WINDOW finished requests (a request's
# life in steps), from `window` up to this many steps (docs/design_notes.md).
MAX_WINDOW = 256


class SLAController:
    name = "sla"

    def __init__(self, tpot_ms: float, tolerance_ms: float | None = None, alpha: int = 4, delta: int = 2,
                 window: int = 16, min_num_seqs: int = 1, max_num_seqs: int = 256, signal: str = "tpot",
                 percentile: float = 90.0, ttft_ms: float | None = None):
        tolerance_ms = 0.1 * tpot_ms if tolerance_ms is None else tolerance_ms
        self.signal = signal
        self.percentile = percentile
        self.finished_tpots: deque[float] = deque(maxlen=SPREAD_WINDOW)
        self.finished_outputs: deque[int] = deque(maxlen=SPREAD_WINDOW)
        self.min_window = window
        self.spread = 1.0  # percentile / mean of the recent requests' TPOT
        self.target_s = tpot_ms / 1000
        self.release_wait_s = None if ttft_ms is None else TTFT_RELEASE * ttft_ms / 1000
        self.tolerance_s = tolerance_ms / 1000
        # The band is centred on the target (docs/design_notes.md: a band under it lost capacity).
        self.center_s = self.target_s
        self.alpha, self.delta = alpha, delta
        self.b_min, self.b_max = min_num_seqs, max_num_seqs
        self.samples: deque[tuple[float, int]] = deque(maxlen=window)  # (step seconds, decode tokens)
        self.b_low, self.b_high = min_num_seqs, max_num_seqs
        self.b_sla = (self.b_low + self.b_high) // 2

    @property
    def trace(self) -> dict[str, float]:
        return {"b_sla": self.b_sla, "b_low": self.b_low, "b_high": self.b_high}

    def _learn_spread(self, tpots: tuple[float, ...]) -> None:
        self.finished_tpots.extend(tpots)
        n = len(self.finished_tpots)
        if self.percentile and n >= MIN_SPREAD_SAMPLES:
            ordered = sorted(self.finished_tpots)
            at = ordered[min(n - 1, int(self.percentile / 100 * n))]
            self.spread = max(1.0, at / (sum(ordered) / n))

    def _follow_lifetimes(self, output_lens: tuple[int, ...]) -> None:
        """Window the signal over about a request's life: a user's TPOT averages every step it lives through, so
        a window of a few steps reads a long prefill chunk as a passing spike and the quiet steps between as room,
        and the loop admits into a batch whose requests already sit at the target."""
        self.finished_outputs.extend(output_lens)
        mean = sum(self.finished_outputs) / len(self.finished_outputs)
        steps = max(self.min_window, min(MAX_WINDOW, round(mean)))
        if steps != self.samples.maxlen:
            self.samples = deque(self.samples, maxlen=steps)

    def limit(self, view: SchedulerView) -> int:
        release_s = self.release_wait_s if view.next_ttft_ms is None else TTFT_RELEASE * view.next_ttft_ms / 1000
        if release_s is not None and view.next_wait_s > release_s:
            return self.b_max  # the TTFT at risk outweighs the TPOT target: memory alone bounds admissions
        # The SLA limit only stops admissions: it never asks to evict decoding sequences.
        return min(max(self.b_sla, view.num_decoding), self.b_max)

    def observe(self, stats: StepStats) -> None:
        if stats.finished_tpots:
            self._learn_spread(stats.finished_tpots)
        if stats.finished_output_lens:
            self._follow_lifetimes(stats.finished_output_lens)
        if not stats.num_decode_tokens or (self.signal == "decode" and stats.num_prefill_tokens):
            return
        self.samples.append((stats.step_time_s, stats.num_decode_tokens))
        tokens = sum(b for _, b in self.samples)
        # seconds per output token as users see it, at the chosen percentile of requests
        tau = sum(t * b for t, b in self.samples) / tokens * self.spread
        b_avg = round(tokens / len(self.samples))
        self.update(tau, b_avg)

    def update(self, tau_s: float, b_avg: int) -> None:
        """One step of the interval search, given mean latency and mean batch of the window."""
        a, d = self.alpha, self.delta
        if tau_s > self.center_s + self.tolerance_s:  # too slow: move the interval down
            self.b_high = max(b_avg, self.b_low + a)
            self.b_low = max(self.b_low - d, self.b_min)
        elif tau_s < self.center_s - self.tolerance_s:  # too fast: room to grow
            self.b_low = min(b_avg, self.b_high - a)
            self.b_high = min(self.b_high + d, self.b_max)
        else:  # inside the band: tighten around the measured batch
            self.b_high = min(b_avg + a // 2, self.b_max)
            self.b_low = max(b_avg - a // 2, self.b_min)
        self.b_low = max(self.b_low, self.b_min)
        self.b_high = min(max(self.b_high, self.b_low), self.b_max)
        self.b_sla = (self.b_low + self.b_high) // 2


class ClassSLAController:
    """Per-request SLA classes: one SLA loop per TPOT target, the limit of the strictest target
    that an unfinished request holds.

    Every loop learns from every step (a step's time per token is the same for all the requests
    in it), so a class that comes back finds its loop where the measurements left it. With no
    target in force (only requests of classes without one), the limit is B_max: throughput.
    """

    name = "sla"

    def __init__(self, default_tpot_ms: float | None, class_tpots_ms: tuple[float, ...],
                 make_loop: Callable[[float], SLAController], max_num_seqs: int):
        self.default_tpot_ms = default_tpot_ms
        self.make_loop = make_loop
        self.b_max = max_num_seqs
        targets = {*class_tpots_ms, *([default_tpot_ms] if default_tpot_ms is not None else [])}
        self.loops = {t: make_loop(t) for t in sorted(targets)}
        self.target_ms: float | None = None  # the target in force at the last limit()

    @property
    def trace(self) -> dict[str, float]:
        if self.target_ms is None:
            return {"b_sla": self.b_max, "sla_target_ms": 0.0}
        return {**self.loops[self.target_ms].trace, "sla_target_ms": self.target_ms}

    def limit(self, view: SchedulerView) -> int:
        default = self.default_tpot_ms if view.has_classless else None
        self.target_ms = min((t for t in (view.sla_tpot_ms, default) if t is not None), default=None)
        if self.target_ms is None:
            return self.b_max
        if self.target_ms not in self.loops:  # a class the controller was not told about
            self.loops[self.target_ms] = self.make_loop(self.target_ms)
        return self.loops[self.target_ms].limit(view)

    def observe(self, stats: StepStats) -> None:
        for loop in self.loops.values():
            loop.observe(stats)
