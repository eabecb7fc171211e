"""Pure metric computation over per-request records (fed by the engine, the server or the simulator).

Conventions follow vLLM's benchmarks: TPOT = (E2E - TTFT) / (output tokens - 1) per request,
ITL = every gap between streamed chunks, percentiles over requests (or gaps), times in ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from batchpilot.config import within_targets


@dataclass
class RequestRecord:
    prompt_len: int
    output_len: int
    ttft_s: float
    e2el_s: float
    itl_s: list[float] = field(default_factory=list)
    success: bool = True
    error: str | None = None
    start_s: float = 0.0  # when the request was sent, from the start of the run
    sla_class: str | None = None  # the SLA class it named, if any

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); undefined for one-token outputs."""
        if self.output_len < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_len - 1)


@dataclass(frozen=True)
class SLA:
    """Per-request latency targets in milliseconds (None: not constrained)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, spec: str, flag: str = "--sla") -> SLA:
        """`ttft:MS,tpot:MS,e2el:MS` (any part optional; parts split by commas or spaces, so
        vLLM's `--goodput ttft:MS tpot:MS` reads the same)."""
        values: dict[str, float] = {}
        for part in spec.replace(",", " ").split():
            key, _, value = part.partition(":")
            if key not in ("ttft", "tpot", "e2el") or not value:
                raise ValueError(f"{flag}: expected ttft:MS,tpot:MS,e2el:MS, got {spec!r}")
            try:
                values[f"{key}_ms"] = float(value)
            except ValueError:
                raise ValueError(f"{flag}: {value!r} is not a number of milliseconds") from None
            if not values[f"{key}_ms"] > 0:
                raise ValueError(f"{flag}: {key} must be positive, got {value}")
        if not values:
            raise ValueError(f"{flag}: expected ttft:MS,tpot:MS,e2el:MS, got {spec!r}")
        return cls(**values)

    def met(self, r: RequestRecord) -> bool:
        return r.success and within_targets(r.ttft_s, r.tpot_s, r.e2el_s, ttft_ms=self.ttft_ms, tpot_ms=self.tpot_ms,
                                            e2el_ms=self.e2el_ms)


DEFAULT_PERCENTILES = (90.0, 99.0)


def _summary(name: str, values_s: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=float) * 1000 if values_s else np.zeros(1)
    out = {f"mean_{name}": float(ms.mean()), f"median_{name}": float(np.median(ms)), f"std_{name}": float(ms.std())}
    for p in percentiles:
        out[f"p{p:g}_{name}"] = float(np.percentile(ms, p))
    return out


def summarize(records: list[RequestRecord], duration_s: float, sla: SLA | None = None,
              percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> dict[str, float]:
    """vLLM's benchmark keys: throughputs and latency percentiles in milliseconds (successes only),
    plus SLA attainment and goodput (`request_goodput`, requests/s within the SLA) when an SLA is given."""
    ok = [r for r in records if r.success]
    inp = sum(r.prompt_len for r in ok)
    outp = sum(r.output_len for r in ok)
    duration_s = max(duration_s, 1e-9)
    result: dict[str, float] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration": duration_s,
        "total_input_tokens": inp,
        "total_output_tokens": outp,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": outp / duration_s,
        "total_token_throughput": (inp + outp) / duration_s,
    }
    result |= _summary("ttft_ms", [r.ttft_s for r in ok], percentiles)
    result |= _summary("tpot_ms", [t for r in ok if (t := r.tpot_s) is not None], percentiles)
    result |= _summary("itl_ms", [gap for r in ok for gap in r.itl_s], percentiles)
    result |= _summary("e2el_ms", [r.e2el_s for r in ok], percentiles)
    if sla is not None:
        good = sum(sla.met(r) for r in records)
        result["sla_attainment"] = good / len(records) if records else 0.0
        result["request_goodput"] = good / duration_s
    return result


def summarize_classes(records: list[RequestRecord], duration_s: float, slas: dict[str, SLA | None]
                      ) -> dict[str, dict[str, float]]:
    """`summarize` for each SLA class's requests, judged against that class's targets (None: no
    target, so attainment is not reported for it)."""
    return {name: summarize([r for r in records if r.sla_class == name], duration_s, sla)
            for name, sla in slas.items()}


PER_REQUEST_KEYS = ("input_lens", "output_lens", "ttfts", "itls", "e2els", "start_times", "errors")


def per_request_lists(records: list[RequestRecord]) -> dict[str, list]:
    """vLLM's per-request lists, in request order, times in seconds (`errors`: "" for a success);
    `e2els` is ours (vLLM keeps none), so TPOT per request can be derived from a saved result."""
    return {
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_len for r in records],
        "ttfts": [r.ttft_s for r in records],
        "itls": [r.itl_s for r in records],
        "e2els": [r.e2el_s for r in records],
        "start_times": [r.start_s for r in records],
        "errors": [r.error or "" for r in records],
    }


def tpot_ms_per_request(result: dict) -> list[float]:
    """Each successful request's TPOT in ms, from the per-request lists of a result."""
    return [(e2el - ttft) * 1000 / (n - 1) for ttft, e2el, n, err in
            zip(result["ttfts"], result["e2els"], result["output_lens"], result["errors"]) if n > 1 and not err]
