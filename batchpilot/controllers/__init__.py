"""Batch-size controllers, chosen by name (`--batch-controller`)."""

from __future__ import annotations

from batchpilot.config import ControllerConfig
from batchpilot.controllers.base import BatchController, SchedulerView, StepStats
from batchpilot.controllers.static import StaticController

CONTROLLERS = ("static",)


def make_controller(config: ControllerConfig) -> BatchController:
    """Build the controller the config names."""
    if config.name == "static":
        return StaticController(config.max_num_seqs)
    raise ValueError(f"--batch-controller: unknown controller {config.name!r} (choose from {CONTROLLERS})")


__all__ = ["BatchController", "SchedulerView", "StepStats", "StaticController", "make_controller"]
