"""Per-step controller trace as JSON lines: what the operator asks "what did the controller do?"."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from batchpilot.controllers.base import BatchController, StepStats


class TraceWriter:
    """Appends one JSON object per engine step; flushed per line so a crash keeps the history."""

    def __init__(self, path: str | Path):
        self._file: TextIO = open(path, "w", buffering=1)

    def write(self, t: float, step: int, limit: int, controller: dict[str, float], stats: StepStats) -> None:
        row = {"t": round(t, 6), "step": step, "b_t": limit, **controller, **asdict(stats)}
        row["finished"] = len(row.pop("finished_lens"))
        row.pop("finished_output_lens")
        row.pop("finished_tpots")
        self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._file.close()


def observe_step(controller: BatchController, stats: StepStats, trace: TraceWriter | None, t: float, step: int,
                 limit: int) -> None:
    """Let the controller learn from a step, writing its trace row first, so that the row shows the
    limits the step ran under (every driver of a controller calls this: the engine, the vLLM plug-in)."""
    if trace is not None:
        trace.write(t, step, limit, controller.trace, stats)
    controller.observe(stats)
