"""Plain data passed between scheduler, executor and engine each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from batchpilot.engine.request import Request
from batchpilot.sampling_params import TokenLogprobs


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step. Executors read it and never change the request."""

    request: Request
    start: int  # num_computed_tokens before this step: positions [start, start + num_new_tokens)
    num_new_tokens: int
    block_table: list[int]
    sample: bool  # the step computes the request's last token, so a next token is sampled


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_prefill_tokens: int
    num_decode_tokens: int
    num_new_prompt_tokens: int = 0  # prompts of requests that start their first prefill (not a recompute)
    preempted_ids: list[str] = field(default_factory=list)
    # Requests admitted for the first time (not back from preemption): the engine stamps their start.
    started: list[Request] = field(default_factory=list)
    # Requests finished since the previous step, so executors can drop per-request state.
    finished_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_tokens


@dataclass
class RunnerOutput:
    """What an executor returns: one sampled token per request that samples."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # Requests that asked for prompt logprobs: (the first prompt position they are for, one per
    # prompt token from there on), for the prompt tokens this step computed.
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)


@dataclass(slots=True)
class RequestUpdate:
    """One request's new token(s) of a step, as the output processor takes them (built by `LLMEngine.step`)."""

    request: Request
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs]
