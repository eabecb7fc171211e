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
        shape, sampled_ids = _shape_and_samples(sched)
        self.clock.advance(self.step_time(shape))
        return RunnerOutput(dict.fromkeys(sampled_ids, PLACEHOLDER_TOKEN))


def step_shape(sched: SchedulerOutput) -> StepShape:
    """What a cost model needs to know of a scheduled step."""
    return _shape_and_samples(sched)[0]


def _shape_and_samples(sched: SchedulerOutput) -> tuple[StepShape, list[str]]:
    """The step's shape and the ids of the requests it samples, in one pass (once per simulated step)."""
    num_decodes = decode_context = 0
    prefills = []
    sampled_ids = []
    for s in sched.scheduled:
        if s.num_new_tokens == 1:
            num_decodes += 1
            decode_context += s.start + 1
        else:
            prefills.append((s.num_new_tokens, s.start + s.num_new_tokens))
        if s.sample:
            sampled_ids.append(s.request.request_id)
    return StepShape(num_decodes, decode_context, tuple(prefills), len(sampled_ids)), sampled_ids
