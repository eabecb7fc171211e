"""A request's state as the scheduler sees it: tokens, progress and lifecycle."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from batchpilot.config import SLAClass
from batchpilot.sampling_params import SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from batchpilot.engine.block_pool import BlockName
    from batchpilot.model.grammar import Grammar


class RequestStatus(enum.Enum):
    # Plain attributes set on each member below, not properties: read for every request at every
    # step (docs/design_notes.md).
    finished: bool
    finish_reason: str | None  # OpenAI's finish_reason for a finished request: 'stop', 'length' or 'abort'

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its KV cache freed; it recomputes on return
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"


for _status in RequestStatus:
    _status.finished = _status.name.startswith("FINISHED_")
    _status.finish_reason = _status.value if _status.finished else None


@dataclass(eq=False)
class Request:
    """One sequence being generated.

    NOTE: there is no prefill/decode flag. Each step the scheduler lets
    `num_computed_tokens` catch up with `num_tokens`; a request "decodes" when only the
    last sampled token is left to compute.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    eos_token_ids: tuple[int, ...] = ()  # the model's end-of-generation tokens (stop it unless ignore_eos)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # when first admitted (the engine's clock), for queue time
    first_token_time: float | None = None  # when its first output token was sampled, for its TPOT
    # Set when the last sampled token was a stop token (EOS or stop_token_ids); its text is hidden.
    stopped_by_token: bool = False
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted
    # Names of its full blocks (block_pool.block_hash), computed once: tokens are only appended.
    block_hashes: list[BlockName] = field(default_factory=list)
    priority: int = 0  # lower runs first (vLLM's convention), under --scheduling-policy priority
    sla_class: SLAClass | None = None  # its latency targets; None: the server-wide --sla-tpot-ms
    # Its place in the waiting order (smaller first), set by the scheduler when it is queued.
    queue_key: float = 0.0
    grammar: Grammar | None = None  # its structured-output matcher (sampling_params.structured_outputs)
    bad_word_ids: tuple[tuple[int, ...], ...] = ()  # sampling_params.bad_words as token sequences
    # Logprobs of prompt tokens 1.. (sampling_params.prompt_logprobs), as the prompt is computed.
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Derived once (the prompt and the parameters never change): the scheduler reads them
        # for every request at every step.
        self.num_prompt_tokens = len(self.prompt_token_ids)
        params = self.sampling_params
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.update(self.eos_token_ids)
        self.stop_token_set = frozenset(stops)  # a sampled token here finishes the request ('stop')
        self.max_output_tokens = params.max_tokens if params.max_tokens is not None else math.inf

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_token_ids)

    @property
    def is_decoding(self) -> bool:
        """All of the prompt is in the KV cache; each step adds one token."""
        return self.num_computed_tokens >= self.num_prompt_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without copying the whole sequence."""
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]
