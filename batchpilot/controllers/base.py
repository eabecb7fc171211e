"""The seam between the scheduler and a batch-size policy.

A controller never sees requests or tensors: before each step it gets a read-only
`SchedulerView` and answers how many sequences may run; after the step it gets the
`StepStats` that were measured. The same objects run under the real engine, the
simulator and the vLLM adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol


class SeqState(NamedTuple):
    """Where one request stands, as a memory policy sees it."""

    num_tokens: int  # prompt + output so far (what its KV cache holds once computed)
    num_output: int  # output tokens so far
    max_output: float  # its output cap: max_tokens, or what the context leaves (inf: none known)
    exact: bool = False  # it runs to max_output for certain (ignore_eos with a max_tokens)


def _no_waiting(_: int) -> list[SeqState]:
    return []


@dataclass(frozen=True)
class SchedulerView:
    """What the scheduler knows before a step."""

    num_running: int
    num_waiting: int
    num_decoding: int  # running requests whose prompt is fully in the KV cache
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    # The running requests in admission order, and the first k waiting ones in the order they would
    # be admitted: computed on demand (O(requests)), valid during the limit() call.
    running: Callable[[], list[SeqState]]
    waiting: Callable[[int], list[SeqState]] = _no_waiting
    # Prefix caching: blocks held by two running sequences or more, and the references beyond
    # the first (the blocks sharing saves: per-sequence token counts overstate usage by this
    # many blocks); free blocks (in num_free_blocks) that still hold a cached prefix.
    num_shared_blocks: int = 0
    num_saved_blocks: int = 0
    num_cached_free_blocks: int = 0
    # Per-request SLA classes: the strictest TPOT target (ms) among the classes of unfinished
    # requests (None: none sets one), and whether some unfinished request names no class (the
    # controller's own --sla-tpot-ms holds for those).
    sla_tpot_ms: float | None = None
    has_classless: bool = True
    # How long the request next in line has waited (s) by the engine's clock; 0 when none waits (or the
    # driver keeps no clock): a TTFT at risk that the SLA loop weighs against TPOT.
    next_wait_s: float = 0.0
    # That request's own TTFT target (ms), from its SLA class; None where it names no class or its class sets no
    # TTFT (the controller's --sla-ttft-ms then holds for it).
    next_ttft_ms: float | None = None


@dataclass(frozen=True)
class StepStats:
    """What happened in one step, measured after it ran."""

    batch_size: int  # sequences in the step
    num_prefill_tokens: int
    num_decode_tokens: int
    step_time_s: float  # wall (or virtual) time of schedule + execute + update
    kv_usage: float  # fraction of KV blocks in use after the step
    num_preemptions: int  # in this step
    num_running: int
    num_waiting: int
    # prompt + output tokens of each request that finished in this step, and its output tokens alone
    finished_lens: tuple[int, ...] = ()
    finished_output_lens: tuple[int, ...] = ()
    # time per output token (s) of each request that finished in this step with two tokens or more
    finished_tpots: tuple[float, ...] = ()


class BatchController(Protocol):
    """A batch-size policy: `limit` before each step, `observe` after it."""

    name: str

    @property
    def trace(self) -> dict[str, float]:
        """The controller's internal limits (b_mem, b_sla, ...) as of the last `limit`, for traces."""
        ...

    def limit(self, view: SchedulerView) -> int:
        """Most sequences that may be running after this step's admissions (>= 1)."""
        ...

    def observe(self, stats: StepStats) -> None:
        """Learn from the step that just ran."""
        ...
