"""Result files: strict JSON that vLLM's result tooling and any JSON parser read.

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
