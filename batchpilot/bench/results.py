"""Results: strict JSON files that vLLM's result tooling and any JSON parser read, the table a run
prints, and the Markdown table that compares runs.

Python's json writes `Infinity` and `NaN`, which are not JSON; vLLM's benchmark writes an
infinite request rate as the string "inf", and so do we, for every non-finite number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def strict(value: Any) -> Any:
    """`value` with every non-finite float replaced by "inf", "-inf" or "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_json(path: str | Path, result: Any) -> None:
    Path(path).write_text(json.dumps(strict(result), indent=2, allow_nan=False))


def print_result(result: dict[str, Any], title: str, keys: list[str] | None = None) -> None:
    """One line per measure (`keys` in that order where present, else all), under a title."""
    shown = [k for k in (keys if keys is not None else result) if k in result]
    print(f"==== {title} ====")
    for key in shown:
        value = result[key]
        text = (f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}") if isinstance(value, float) else str(value)
        print(f"{key:<26}{text:>14}")
    if result.get("error_counts"):
        print(f"{'errors':<26}{json.dumps(result['error_counts'])}")
    if result.get("interrupted"):
        print("(interrupted: partial result)")


COLUMNS = [("output_throughput", "out tok/s"), ("request_throughput", "req/s"), ("request_goodput", "goodput"),
           ("sla_attainment", "SLA %"), ("median_ttft_ms", "TTFT p50"), ("p90_ttft_ms", "TTFT p90"),
           ("median_tpot_ms", "TPOT p50"), ("p90_tpot_ms", "TPOT p90"), ("p99_tpot_ms", "TPOT p99"),
           ("num_preemptions", "preempt"), ("capacity", "capacity")]


def markdown_table(results: dict[str, dict[str, Any]], baseline: str) -> str:
    """Runs side by side (COLUMNS that any run has), with throughput and capacity gains over `baseline`."""
    cols = [(k, label) for k, label in COLUMNS if any(r.get(k) is not None for r in results.values())]
    lines = ["| config | " + " | ".join(label for _, label in cols) + " | out tok/s vs base | capacity vs base |",
             "|---" * (len(cols) + 3) + "|"]
    base = results[baseline]
    for name, r in results.items():
        cells = []
        for key, _ in cols:
            v = r.get(key)
            cells.append("" if v is None else f"{100 * v:.1f}" if key == "sla_attainment" else f"{v:.2f}"
                         if isinstance(v, float) else str(v))
        gain = _gain(r.get("output_throughput"), base.get("output_throughput"))
        cap_gain = _gain(r.get("capacity"), base.get("capacity"))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {gain} | {cap_gain} |")
    return "\n".join(lines)


def _gain(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    return f"{100 * (value / base - 1):+.1f}%"
