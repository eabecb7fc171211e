"""Per-request generation options, shaped like vLLM's SamplingParams."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
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
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise SamplingParamsError(name, f"{name} {message}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON


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
