"""Workloads: synthetic length distributions and ShareGPT-format conversations."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from batchpilot.bench.traces import read_trace


@dataclass
class BenchRequest:
    prompt: str | list[int]  # text or token ids (a chat's prompt: rendered by the chat template)
    prompt_len: int
    max_tokens: int
    messages: list[dict[str, str]] | None = None  # a chat request's messages (sent as such to a server)
    arrival_s: float | None = None  # a trace's own arrival time


@dataclass(frozen=True)
class LengthDist:
    """`N` (fixed), `uniform:LOW:HIGH` or `lognormal:MEDIAN:SIGMA`, sampled as positive ints."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str, flag: str) -> LengthDist:
        parts = spec.split(":")
        try:
            if len(parts) == 1:
                dist = cls("fixed", float(int(parts[0])))
            elif parts[0] == "uniform" and len(parts) == 3:
                dist = cls("uniform", float(int(parts[1])), float(int(parts[2])))
            elif parts[0] == "lognormal" and len(parts) == 3:
                dist = cls("lognormal", float(parts[1]), float(parts[2]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{flag}: expected N, uniform:LOW:HIGH or lognormal:MEDIAN:SIGMA, got {spec!r}"
            ) from None
        if dist.a < 1 or (dist.kind == "uniform" and dist.b < dist.a) or dist.b < 0:
            raise ValueError(f"{flag}: lengths must be positive and LOW <= HIGH, got {spec!r}")
        return dist

    def widened(self, ratio: float) -> LengthDist:
        """A fixed length N as uniform:N*(1-ratio):N*(1+ratio) (vLLM's --random-range-ratio)."""
        if self.kind != "fixed" or ratio == 0:
            return self
        return LengthDist("uniform", float(max(1, int(self.a * (1 - ratio)))), float(int(self.a * (1 + ratio))))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, int(self.a))
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, size=n)
        return np.maximum(1, np.round(rng.lognormal(np.log(self.a), self.b, size=n))).astype(int)


def length_dist(fixed: int | None, spec: str | None, flag: str, default: int) -> LengthDist:
    """The distribution given by --{flag}-len N or --{flag}-dist SPEC (exclusive), else `default`."""
    if fixed is not None and spec is not None:
        raise ValueError(f"--{flag}-len and --{flag}-dist are exclusive")
    return LengthDist.parse(spec if spec is not None else str(fixed or default), f"--{flag}-dist")


def synthetic_requests(n: int, input_dist: LengthDist, output_dist: LengthDist, vocab_size: int,
                       seed: int, first_token: int = 0) -> list[BenchRequest]:
    """Prompts of random token ids (as vLLM's random dataset), lengths from the distributions."""
    rng = np.random.default_rng(seed)
    in_lens, out_lens = input_dist.sample(rng, n), output_dist.sample(rng, n)
    return _random_prompts(rng, in_lens, out_lens, vocab_size, first_token)


def traced_requests(prompt_lens: list[int], output_lens: list[int], vocab_size: int, seed: int,
                    first_token: int = 0) -> list[BenchRequest]:
    """A trace's lengths as requests: random token prompts of the traced length (as vLLM's random
    dataset), outputs of the traced length."""
    return _random_prompts(np.random.default_rng(seed), prompt_lens, output_lens, vocab_size, first_token)


def _random_prompts(rng: np.random.Generator, prompt_lens, output_lens, vocab_size: int,
                    first_token: int) -> list[BenchRequest]:
    return [BenchRequest(rng.integers(first_token, vocab_size, size=int(i)).tolist(), int(i), int(o))
            for i, o in zip(prompt_lens, output_lens)]


def sharegpt_requests(path: Path, n: int, encode, seed: int) -> list[BenchRequest]:
    """First human turn as prompt, the reply's token count as max_tokens (vLLM's filters; the
    reader is the traces module's, shared with simulate)."""
    trace = read_trace(path, encode=encode, limit=n, seed=seed)
    return [BenchRequest(r.prompt, r.prompt_len, r.output_len) for r in trace.requests]


INSTRUCTIONS = (
    "Summarise the following documentation in a few sentences:\n\n{text}",
    "Explain the following to a beginner, with an example:\n\n{text}",
    "List the key points of this text as bullet points:\n\n{text}",
    "Translate the first two sentences of this text into French:\n\n{text}",
    "Write a short Python program that illustrates this:\n\n{text}",
    "In one word, which Python feature does this text describe?\n\n{text}",
    "Write three quiz questions, with answers, about this text:\n\n{text}",
)


def builtin_conversations(n: int, seed: int) -> list[list[dict[str, str]]]:
    """Varied real-text chat prompts, built offline from Python's own documentation.

    Each pairs an instruction of a different kind (summarise, explain, list, translate, code,
    one word, quiz) with an excerpt of a `pydoc_data` topic, so output lengths come from the
    model, as in real traffic. Deterministic for a seed.
    """
    from pydoc_data.topics import topics

    rng = np.random.default_rng(seed)
    names = sorted(k for k, v in topics.items() if len(v) > 400)
    out = []
    for _ in range(n):
        text = topics[names[rng.integers(len(names))]].strip()
        start = int(rng.integers(0, max(1, len(text) - 400)))
        excerpt = text[start : start + int(rng.integers(300, 1200))]
        instruction = INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))]
        out.append([{"role": "user", "content": instruction.format(text=excerpt)}])
    return out
