"""Pure metric computation over per-request records (fed by the engine, the server or the simulator).

Conventions follow vLLM's benchmarks: TPOT = (E2E - TTFT) / (output tokens - 1) per request,
ITL = every gap between streamed chunks, percentiles over requests (or gaps), times in ms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    prompt_len: int
    output_len: int
    ttft_s: float
    e2el_s: float
    itl_s: list[float] = field(default_factory=list)
    success: bool = True
    error: str | None = None

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

    @classmethod
    def parse(cls, spec: str) -> SLA:
        """`ttft:MS,tpot:MS` (either part optional)."""
        values: dict[str, float] = {}
        for part in spec.split(","):
            key, _, value = part.partition(":")
            key = key.strip()
            if key not in ("ttft", "tpot") or not value:
                raise ValueError(f"--sla: expected ttft:MS,tpot:MS, got {spec!r}")
            try:
                values[f"{key}_ms"] = float(value)
            except ValueError:
                raise ValueError(f"--sla: {value!r} is not a number of milliseconds") from None
            if values[f"{key}_ms"] <= 0:
                raise ValueError(f"--sla: {key} must be positive, got {value}")
        return cls(**values)

    def met(self, r: RequestRecord) -> bool:
        if not r.success:
            return False
        if self.ttft_ms is not None and r.ttft_s * 1000 > self.ttft_ms:
            return False
        tpot = r.tpot_s
        return not (self.tpot_ms is not None and tpot is not None and tpot * 1000 > self.tpot_ms)


def _summary(name: str, values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=float) * 1000 if values_s else np.zeros(1)
    return {
        f"mean_{name}": float(ms.mean()),
        f"median_{name}": float(np.median(ms)),
        f"std_{name}": float(ms.std()),
        f"p90_{name}": float(np.percentile(ms, 90)),
        f"p99_{name}": float(np.percentile(ms, 99)),
    }


def summarize(records: list[RequestRecord], duration_s: float, sla: SLA | None = None) -> dict[str, float]:
    """vLLM's benchmark keys: throughputs and latency percentiles in milliseconds (successes only),
    plus SLA attainment and goodput when an SLA is given."""
    ok = [r for r in records if r.success]
    inp = sum(r.prompt_len for r in ok)
    outp = sum(r.output_len for r in ok)
    duration_s = max(duration_s, 1e-9)
    result: dict[str, float] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": inp,
        "total_output_tokens": outp,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": outp / duration_s,
        "total_token_throughput": (inp + outp) / duration_s,
    }
    result |= _summary("ttft_ms", [r.ttft_s for r in ok])
    result |= _summary("tpot_ms", [t for r in ok if (t := r.tpot_s) is not None])
    result |= _summary("itl_ms", [gap for r in ok for gap in r.itl_s])
    result |= _summary("e2el_ms", [r.e2el_s for r in ok])
    if sla is not None:
        good = sum(sla.met(r) for r in records)
        result["sla_attainment"] = good / len(records) if records else 0.0
        result["goodput"] = good / duration_s
    return result
