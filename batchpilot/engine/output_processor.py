"""Turns sampled tokens into text: incremental detokenization and stop strings.

Stop strings never reach the caller: text is cut before the stop string, and while a
request is still running the last `len(longest stop) - 1` characters are held back, since
they may be the start of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers.decoders import DecodeStream

from batchpilot.engine.outputs import RequestUpdate
from batchpilot.engine.request import Request
from batchpilot.model.tokenizer import TextTokenizer
from batchpilot.sampling_params import TokenLogprobs


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence (cumulative in LLM results, a delta in engine step results)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class RequestOutput:
    """vLLM-shaped result of a request; `engine.step()` returns the step's delta."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_preemptions: int = 0
    queue_time_s: float | None = None  # arrival to first admission; set on the finished output
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Asked for with sampling_params.prompt_logprobs: None for the first prompt token, then one per
    # token; on the first output of a request (its prompt is computed by then).
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class _TextState:
    request: Request
    prompt: str | None
    stream: DecodeStream
    text: str = ""
    sent: int = 0  # characters already returned
    stop_hit: bool = False
    logprobs: list[TokenLogprobs] = field(default_factory=list)


class OutputProcessor:
    """Keeps each live request's decoded text and cuts it at stop strings."""

    def __init__(self, tokenizer: TextTokenizer | None):
        """Without a tokenizer, outputs carry token ids only (and stop strings cannot apply)."""
        self.tokenizer = tokenizer
        self._states: dict[str, _TextState] = {}

    def add(self, request: Request, prompt: str | None) -> None:
        if self.tokenizer is None:  # token ids only: no text state to keep
            if request.sampling_params.stop:
                raise ValueError("stop strings need a tokenizer")
            return
        stream = self.tokenizer.decode_stream(request.sampling_params.skip_special_tokens)
        self._states[request.request_id] = _TextState(request, prompt, stream)

    def remove(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def process(self, update: RequestUpdate) -> RequestOutput:
        """Detokenize a step's new tokens. Sets `stop_hit` when a stop string ended the text."""
        if self.tokenizer is None:
            return _token_output(update)
        st = self._states[update.request.request_id]
        req = st.request
        # A stop token's own text is never shown (vLLM behaviour); its id still is.
        text_ids = update.new_token_ids
        if req.stopped_by_token and req.status.finished:
            text_ids = text_ids[:-1]
        for tid in text_ids:
            piece = st.stream.step(self.tokenizer.tokenizer, tid)
            if piece:
                st.text += piece
        if req.sampling_params.stop and not st.stop_hit:
            self._cut_at_stop(st)
        return self._delta(st, update)

    def _cut_at_stop(self, st: _TextState) -> None:
        params = st.request.sampling_params
        longest = max(len(s) for s in params.stop)
        # Text before `sent - longest` was searched in earlier steps.
        search_from = max(0, st.sent - longest)
        hits = [(i, s) for s in params.stop if (i := st.text.find(s, search_from)) != -1]
        if hits:
            i, s = min(hits)
            st.text = st.text[: i + len(s)] if params.include_stop_str_in_output else st.text[:i]
            st.stop_hit = True

    def _delta(self, st: _TextState, update: RequestUpdate) -> RequestOutput:
        """The step's output; update's token lists are fresh each step, so they are passed on, not copied."""
        req = st.request
        done = req.status.finished or st.stop_hit
        visible = len(st.text)
        stops = req.sampling_params.stop
        if stops and not done:
            visible = max(st.sent, visible - (max(len(s) for s in stops) - 1))
        delta, st.sent = st.text[st.sent : visible], visible
        reason = "stop" if st.stop_hit else req.status.finish_reason
        logprobs = update.new_logprobs if req.sampling_params.logprobs is not None else None
        if done:
            del self._states[req.request_id]
        return RequestOutput(req.request_id, st.prompt, req.prompt_token_ids,
                             [CompletionOutput(0, delta, update.new_token_ids, logprobs, reason)], done,
                             req.num_preemptions, _queue_time(req) if done else None, req.num_cached_tokens,
                             _prompt_logprobs(req))


def _token_output(update: RequestUpdate) -> RequestOutput:
    """A token-only engine's output (no tokenizer: no text, no stop strings)."""
    req = update.request
    status = req.status
    logprobs = update.new_logprobs if req.sampling_params.logprobs is not None else None
    return RequestOutput(req.request_id, None, req.prompt_token_ids,
                         [CompletionOutput(0, "", update.new_token_ids, logprobs, status.finish_reason)],
                         status.finished, req.num_preemptions, _queue_time(req) if status.finished else None,
                         req.num_cached_tokens, _prompt_logprobs(req))


def _prompt_logprobs(req: Request) -> list[TokenLogprobs | None] | None:
    """The prompt's logprobs on a request's first output only."""
    if req.sampling_params.prompt_logprobs is None or len(req.output_token_ids) != 1:
        return None
    return [None, *req.prompt_logprobs]


def _queue_time(req: Request) -> float | None:
    return None if req.first_scheduled_time is None else req.first_scheduled_time - req.arrival_time
