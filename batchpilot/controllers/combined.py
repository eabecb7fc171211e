"""The paper's method: b_t = min(b_mem, b_sla); memory-aware only when no SLA is set."""

from __future__ import annotations

from batchpilot.controllers.base import SchedulerView, StepStats
from batchpilot.controllers.memory import MemoryController
from batchpilot.controllers.sla import SLAController


class CombinedController:
    name = "combined"

    def __init__(self, memory: MemoryController, sla: SLAController | None):
        self.memory = memory
        self.sla = sla

    @property
    def trace(self) -> dict[str, float]:
        return {**self.memory.trace, **(self.sla.trace if self.sla else {})}

    def limit(self, view: SchedulerView) -> int:
        b_mem = self.memory.limit(view)
        return b_mem if self.sla is None else min(b_mem, self.sla.limit(view))

    def observe(self, stats: StepStats) -> None:
        self.memory.observe(stats)
        if self.sla is not None:
            self.sla.observe(stats)
