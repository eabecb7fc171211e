"""An executor without a model: each step costs what a cost model says, on a virtual clock.

It fills the same RunnerOutput as the torch runner. Sampled tokens are placeholders; the
simulated requests end by their max_tokens (their workload output length, ignore_eos).
"""

from __future__ import annotations

from collections.abc import Callable

from batchpilot.engine.outputs import RunnerOutput, SchedulerOutput
from batchpilot.sim.roofline import StepShape

PLACEHOLDER_TOKEN = 0


class VirtualClock:
    """Time that moves only when told to (the simulator's `clock` for the engine and controllers)."""

    def __init__(self, start: float = 0.0):
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        if dt < 0:
            raise ValueError(f"time cannot go back ({dt})")
        self.t += dt


class SimulatedExecutor:
    def __init__(self, step_time: Callable[[StepShape], float], clock: VirtualClock):
        self.step_time = step_time
        self.clock = clock

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        shape = StepShape(
            new_tokens=tuple(s.num_new_tokens for s in sched.scheduled),
            context_lens=tuple(s.start + s.num_new_tokens for s in sched.scheduled),
            num_sampled=sum(s.sample for s in sched.scheduled),
        )
        self.clock.advance(self.step_time(shape))
        return RunnerOutput({s.request.request_id: PLACEHOLDER_TOKEN for s in sched.scheduled if s.sample})
