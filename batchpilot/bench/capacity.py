"""Capacity: the highest Poisson request rate at which SLA attainment stays >= a target.

Bracketing (doubling or halving the rate until one probe passes and one fails), then
bisection in log space until the bracket is within the tolerance. `probe(rate)` runs a
load long enough to reach steady state and returns its SLA attainment.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class CapacityResult:
    capacity: float  # highest rate that met the target (0.0: none did)
    curve: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment) in probe order

    target: float = 0.9

    @property
    def bounded(self) -> bool:
        """False when every probe met the target: the capacity is only a lower bound (the SLA did
        not bind at any load tried)."""
        return any(attainment < self.target for _, attainment in self.curve)


def search_capacity(probe: Callable[[float], float], target: float = 0.9, start_rate: float = 1.0,
                    tolerance: float = 0.1, max_probes: int = 12, min_rate: float = 1e-3) -> CapacityResult:
    """Find the capacity to within a relative `tolerance` (hi / lo <= 1 + tolerance)."""
    if not 0 < target <= 1:
        raise ValueError(f"--target must be in (0, 1], got {target}")
    if start_rate <= 0 or tolerance <= 0:
        raise ValueError("--start-rate and --tolerance must be positive")
    result = CapacityResult(0.0, target=target)

    def passes(rate: float) -> bool:
        attainment = probe(rate)
        result.curve.append((rate, attainment))
        return attainment >= target

    lo = hi = None
    rate = start_rate
    while len(result.curve) < max_probes:
        if passes(rate):
            lo = rate
            if hi is not None:
                break
            rate *= 2
        else:
            hi = rate
            if lo is not None:
                break
            rate /= 2
            if rate < min_rate:
                return result
    while lo is not None and hi is not None and hi / lo > 1 + tolerance and len(result.curve) < max_probes:
        mid = math.sqrt(lo * hi)
        if passes(mid):
            lo = mid
        else:
            hi = mid
    result.capacity = lo or 0.0
    return result


def capacity_on_grid(curve: list[tuple[float, float]], target: float = 0.9) -> CapacityResult:
    """The capacity read off attainments measured at fixed rates (contenders run side by side at each
    rate, so no per-contender search): the rate where the curve first falls below `target`, linearly
    interpolated between the last rate that met it and the first that did not. 0.0 when the lowest rate
    already misses; unbounded (`bounded` False, the highest rate as a lower bound) when none misses."""
    result = CapacityResult(0.0, curve=sorted(curve), target=target)
    below = next((i for i, (_, attainment) in enumerate(result.curve) if attainment < target), None)
    if below is None:
        result.capacity = result.curve[-1][0] if result.curve else 0.0
    elif below > 0:
        (r0, a0), (r1, a1) = result.curve[below - 1], result.curve[below]
        result.capacity = r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
    return result
