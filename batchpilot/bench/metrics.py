"""Pure metric computation over per-request records (fed by the engine, the server or the simulator)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RequestRecord:
    prompt_len: int
    output_len: int
    ttft_s: float
    e2el_s: float

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); undefined for one-token outputs."""
        if self.output_len < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_len - 1)


def _summary(name: str, values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=float) * 1000 if values_s else np.zeros(1)
    return {
        f"mean_{name}": float(ms.mean()),
        f"median_{name}": float(np.median(ms)),
        f"std_{name}": float(ms.std()),
        f"p90_{name}": float(np.percentile(ms, 90)),
        f"p99_{name}": float(np.percentile(ms, 99)),
    }


def summarize(records: list[RequestRecord], duration_s: float) -> dict[str, float]:
    """vLLM's benchmark keys: throughputs and latency percentiles in milliseconds."""
    inp = sum(r.prompt_len for r in records)
    outp = sum(r.output_len for r in records)
    result: dict[str, float] = {
        "completed": len(records),
        "duration_s": duration_s,
        "total_input_tokens": inp,
        "total_output_tokens": outp,
        "request_throughput": len(records) / duration_s,
        "output_throughput": outp / duration_s,
        "total_token_throughput": (inp + outp) / duration_s,
    }
    result |= _summary("ttft_ms", [r.ttft_s for r in records])
    result |= _summary("tpot_ms", [t for r in records if (t := r.tpot_s) is not None])
    result |= _summary("e2el_ms", [r.e2el_s for r in records])
    return result
