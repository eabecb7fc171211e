"""An executor without a model: each step costs what a cost model says, on a virtual clock.

It fills the same RunnerOutput as the torch runner. Sampled tokens are placeholders; a
simulated request ends by its max_tokens (ignore_eos), or, when it has an entry in `stop_at`
(its output length, below a larger declared max_tokens), by sampling STOP_TOKEN there: the
scheduler and its controller then see a request whose length the model chose, as in real traffic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from batchpilot.engine.outputs import RunnerOutput, SchedulerOutput

PLACEHOLDER_TOKEN = 0
STOP_TOKEN = 1  # simulated requests that stop by themselves list it in stop_token_ids


@dataclass(frozen=True)
class StepShape:
    """What a step computes, in the terms cost models need.

    Decodes (one new token each) are summed, since a step has hundreds of them and their
    cost depends on their number and total context only; prefill chunks are few and listed.
    """

    num_decodes: int
    decode_context: int  # sum over decodes of the context after the step
    prefills: tuple[tuple[int, int], ...]  # (new tokens, context after the step) per chunk
    num_sampled: int

    @property
    def num_tokens(self) -> int:
        return self.num_decodes + sum(n for n, _ in self.prefills)


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
    def __init__(self, step_time: Callable[[StepShape], float], clock: VirtualClock,
                 stop_at: dict[str, int] | None = None):
        self.step_time = step_time
        self.clock = clock
        self.stop_at = stop_at if stop_at is not None else {}  # request id -> output length at which it stops

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        shape, sampled_ids = _shape_and_samples(sched)
        self.clock.advance(self.step_time(shape))
        tokens = dict.fromkeys(sampled_ids, PLACEHOLDER_TOKEN)
        if self.stop_at:
            for s in sched.scheduled:
                target = self.stop_at.get(s.request.request_id)
                if target is not None and s.sample and len(s.request.output_token_ids) + 1 >= target:
                    tokens[s.request.request_id] = STOP_TOKEN
        return RunnerOutput(tokens)


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
