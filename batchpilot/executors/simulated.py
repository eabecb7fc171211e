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
        num_decodes = decode_context = 0
        prefills = []
        sampled = {}
        for s in sched.scheduled:
            if s.num_new_tokens == 1:
                num_decodes += 1
                decode_context += s.start + 1
            else:
                prefills.append((s.num_new_tokens, s.start + s.num_new_tokens))
            if s.sample:
                sampled[s.request.request_id] = PLACEHOLDER_TOKEN
        self.clock.advance(self.step_time(StepShape(num_decodes, decode_context, tuple(prefills), len(sampled))))
        return RunnerOutput(sampled)
