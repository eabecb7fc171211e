"""Batch-size controllers, chosen by name (`--batch-controller`)."""

from __future__ import annotations

from batchpilot.config import ControllerConfig
from batchpilot.controllers.base import BatchController, SchedulerView, StepStats
from batchpilot.controllers.combined import CombinedController
from batchpilot.controllers.memory import MemoryController
from batchpilot.controllers.sglang import SGLangController
from batchpilot.controllers.sla import ClassSLAController, SLAController
from batchpilot.controllers.static import StaticController


def make_controller(config: ControllerConfig, class_tpots_ms: tuple[float, ...] = ()) -> BatchController:
    """Build the controller the config names (the config has been validated). `class_tpots_ms`:
    the TPOT targets of the SLA classes requests may name (SchedulerConfig.sla_classes); each gets its
    own loop, with a band of 10% of its target (--sla-tolerance-ms sets --sla-tpot-ms's band only)."""
    if config.name == "static":
        return StaticController(config.max_num_seqs)
    if config.name == "sglang":
        return SGLangController(config.sglang_init_ratio, config.sglang_min_ratio_factor, config.sglang_decay_steps,
                                config.sglang_clip_max_new_tokens, config.min_num_seqs, config.max_num_seqs)
    memory = MemoryController(config.memory_mode, config.memory_factor, config.mem_epsilon,
                              config.min_num_seqs, config.max_num_seqs)
    def sla_loop(tpot_ms: float) -> SLAController:
        tolerance = config.sla_tolerance_ms if tpot_ms == config.sla_tpot_ms else None
        return SLAController(tpot_ms, tolerance, config.sla_alpha, config.sla_delta, config.sla_window,
                             config.min_num_seqs, config.max_num_seqs, config.sla_signal, config.sla_percentile,
                             config.sla_ttft_ms)

    sla: SLAController | ClassSLAController | None = None
    if class_tpots_ms:
        sla = ClassSLAController(config.sla_tpot_ms, class_tpots_ms, sla_loop, config.max_num_seqs)
    elif config.sla_tpot_ms is not None:
        sla = sla_loop(config.sla_tpot_ms)
    if config.name == "memory":
        return memory
    if config.name == "sla":
        return sla
    return CombinedController(memory, sla)


__all__ = ["BatchController", "SchedulerView", "StepStats", "CombinedController", "MemoryController",
           "SGLangController", "SLAController", "ClassSLAController", "StaticController", "make_controller"]
