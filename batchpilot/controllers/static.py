"""The baseline every engine ships: one fixed `max_num_seqs`."""

from __future__ import annotations

from batchpilot.controllers.base import SchedulerView, StepStats


class StaticController:
    name = "static"

    def __init__(self, max_num_seqs: int):
        self.max_num_seqs = max_num_seqs

    @property
    def trace(self) -> dict[str, float]:
        return {}

    def limit(self, view: SchedulerView) -> int:
        return self.max_num_seqs

    def observe(self, stats: StepStats) -> None:
        pass
