"""Per-request generation options, shaped like vLLM's SamplingParams."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What a sequence's output must match (vLLM's StructuredOutputsParams): exactly one of
    `json` (a JSON schema, as a dict or its text), `json_object` (any JSON object), `regex`,
    `choice` (one of these strings) or `grammar` (Lark or GBNF)."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise SamplingParamsError("structured_outputs", "give exactly one of json, json_object, regex, "
                                      f"choice and grammar, got {', '.join(given) or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise SamplingParamsError("structured_outputs", "choice must be a non-empty list of strings")

    def key(self) -> str:
        """A canonical text naming the spec (its cache key)."""
        body = self.json if not isinstance(self.json, dict) else json.dumps(self.json, sort_keys=True)
        return json.dumps([body, self.json_object, self.regex, self.choice, self.grammar])


# Temperatures below this are treated as greedy decoding (as vLLM does).
GREEDY_EPSILON = 1e-5


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. Validated on creation (ValueError names the field)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16  # None: until the context is full
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return with each token
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # the output must match this grammar
    logit_bias: dict[int, float] | None = None  # added to a token's logit before sampling
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    bad_words: list[str] = field(default_factory=list)  # never generated (as vLLM: with and without a leading space)
    min_tokens: int = 0  # stop tokens are not sampled before this many tokens
    repetition_penalty: float = 1.0  # >1 discourages tokens of the prompt and output (as in HF / vLLM)
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs, with this many top alternatives each

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.bad_words = list(self.bad_words or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (self.temperature >= 0, "temperature", "must be non-negative"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be -1 (off) or a positive integer"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs", "must be in [0, 20]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (self.min_tokens >= 0 and (self.max_tokens is None or self.min_tokens <= self.max_tokens), "min_tokens",
             "must be in [0, max_tokens]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be positive"),
            (all(-100 <= v <= 100 for v in (self.logit_bias or {}).values()), "logit_bias",
             "values must be in [-100, 100]"),
            (self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "allowed_token_ids",
             "must not be empty"),
            (all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words", "must be non-empty strings"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise SamplingParamsError(name, f"{name} {message}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def shapes_logits(self) -> bool:
        """Anything besides temperature/top-k/top-p/min-p changes the logits before sampling."""
        return bool(self.structured_outputs or self.logit_bias or self.allowed_token_ids or self.bad_words
                    or self.min_tokens or self.repetition_penalty != 1.0)


def fan_out(params: SamplingParams) -> list[SamplingParams]:
    """n > 1 as n single-sequence requests (each engine request makes one sequence); a seeded
    request gives its k-th sequence seed + k, so the n are distinct and each reproducible."""
    if params.n == 1:
        return [params]
    return [replace(params, n=1, seed=None if params.seed is None else params.seed + k) for k in range(params.n)]


class SamplingParamsError(ValueError):
    """An invalid sampling option; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probability of the sampled token and of the most likely alternatives."""

    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None  # the token's rank in the distribution (1: the most likely), when known
