"""Timed request traces: one reader for every format, used by bench, simulate and the tournament.

Formats, told by the file's header:
- Azure LLM inference traces (2023 and 2024 releases): CSV `TIMESTAMP,ContextTokens,GeneratedTokens`;
- BurstGPT: CSV with `Timestamp`, `Request tokens`, `Response tokens` (rows with no response,
  failed requests in the trace, are dropped and counted);
- JSON Lines: `{"timestamp": s, "prompt": text | "prompt_len": n, "output_len": n}` per line;
- ShareGPT JSON (a list of `{"conversations": [{"from", "value"}, ...]}`): the first human turn is
  the prompt and the reply's token count its output length (so it needs a tokenizer); no arrival
  times (all at 0: offline, or a synthetic rate), vLLM's filters (prompt and reply of 4 tokens or
  more, prompt <= 1024, prompt + reply <= 2048), a seeded shuffle as vLLM's sampler does.
A malformed row is an error naming the file, line and column, or is skipped and counted.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np


class TraceError(ValueError):
    """A trace that cannot be read: the message names the file, line and column."""


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # from the trace's first arrival
    prompt_len: int
    output_len: int
    prompt: str | None = None  # the text, when the trace has it


@dataclass
class Trace:
    path: Path
    format: str
    requests: list[TraceRequest]
    skipped_rows: int = 0  # malformed rows skipped (--skip-bad-rows)
    dropped_empty: int = 0  # requests with no output (failed in the trace), or filtered (ShareGPT)
    timed: bool = True  # False: the format has no arrival times (ShareGPT)

    def window(self, start_s: float = 0.0, duration_s: float | None = None, time_scale: float = 1.0,
               ) -> list[TraceRequest]:
        """The requests arriving in [start, start + duration) of the trace, re-based to start at 0 and
        sped up `time_scale` times (2: twice as fast)."""
        if time_scale <= 0:
            raise ValueError(f"--time-scale must be positive, got {time_scale}")
        if start_s < 0 or (duration_s is not None and duration_s <= 0):
            raise ValueError(f"--trace-start must be >= 0 and --trace-duration > 0, got {start_s}, {duration_s}")
        end = float("inf") if duration_s is None else start_s + duration_s
        chosen = [r for r in self.requests if start_s <= r.arrival_s < end]
        if not chosen:
            raise ValueError(f"{self.path}: no request arrives in the window [{start_s}, {end}) s")
        t0 = chosen[0].arrival_s
        return [TraceRequest((r.arrival_s - t0) / time_scale, r.prompt_len, r.output_len, r.prompt) for r in chosen]


_AZURE = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_BURSTGPT = ("Timestamp", "Request tokens", "Response tokens")


def trace_kind(path: str | Path) -> str:
    """"sharegpt" (a JSON list), "jsonl" (JSON objects) or "csv" (Azure or BurstGPT), from the
    file's first characters."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            first = f.read(256).lstrip()
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e}") from e
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not a text file ({e})") from e
    return "sharegpt" if first.startswith("[") else "jsonl" if first.startswith("{") else "csv"


def read_trace(path: str | Path, skip_bad_rows: bool = False, encode: Callable[[str], list[int]] | None = None,
               limit: int | None = None, seed: int = 0) -> Trace:
    """Read a trace file in any supported format (sorted by arrival). `encode` (a tokenizer's) is
    needed for ShareGPT only; `limit` and `seed` pick its first `limit` usable conversations in a
    seeded order (tokenizing 90k conversations to use 1,000 would take minutes)."""
    path = Path(path)
    try:
        kind = trace_kind(path)
        with open(path, newline="", encoding="utf-8") as f:
            if kind == "sharegpt":
                trace = _read_sharegpt(path, f, skip_bad_rows, encode, limit, seed)
            elif kind == "jsonl":
                trace = _read_jsonl(path, f, skip_bad_rows)
            else:
                trace = _read_csv(path, f, skip_bad_rows)
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e}") from e
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not a text file ({e})") from e
    if not trace.requests:
        raise TraceError(f"{path}: no requests")
    trace.requests.sort(key=lambda r: r.arrival_s)
    t0 = trace.requests[0].arrival_s
    trace.requests = [TraceRequest(r.arrival_s - t0, r.prompt_len, r.output_len, r.prompt) for r in trace.requests]
    return trace


def _read_csv(path: Path, f, skip_bad_rows: bool) -> Trace:
    reader = csv.reader(f)
    header = [h.strip() for h in next(reader, [])]
    if all(c in header for c in _AZURE):
        kind, columns, when = "azure", _AZURE, _azure_time
    elif all(c in header for c in _BURSTGPT):
        kind, columns, when = "burstgpt", _BURSTGPT, float
    else:
        raise TraceError(f"{path}:1: unknown trace header {header[:6]} (Azure: {', '.join(_AZURE)}; "
                         f"BurstGPT: {', '.join(_BURSTGPT)}; or JSON Lines)")
    index = [header.index(c) for c in columns]
    trace = Trace(path, kind, [])
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        values = []
        for name, i in zip(columns, index):
            try:
                text = row[i].strip()
                values.append(when(text) if name == columns[0] else int(float(text)))
            except (IndexError, ValueError):
                if not skip_bad_rows:
                    raise TraceError(f"{path}:{line}: column {name!r}: bad value "
                                     f"{row[i] if i < len(row) else '(missing)'!r} (--skip-bad-rows skips such rows)"
                                     ) from None
                trace.skipped_rows += 1
                break
        else:
            _add(trace, path, line, values[0], values[1], values[2], None, skip_bad_rows)
    return trace


def _read_jsonl(path: Path, f, skip_bad_rows: bool) -> Trace:
    trace = Trace(path, "jsonl", [])
    for line, text in enumerate(f, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
            if not isinstance(row, dict):
                raise ValueError("not an object")
            prompt = row.get("prompt")
            if prompt is not None and not isinstance(prompt, str):
                raise ValueError("column 'prompt': not a string")
            prompt_len = row.get("prompt_len", len(prompt) if prompt is not None else None)
            if prompt_len is None:
                raise ValueError("needs 'prompt' or 'prompt_len'")
            values = (float(row["timestamp"]), int(prompt_len), int(row["output_len"]))
        except (ValueError, KeyError, TypeError) as e:
            if not skip_bad_rows:
                raise TraceError(f"{path}:{line}: {e} (--skip-bad-rows skips such rows)") from None
            trace.skipped_rows += 1
            continue
        _add(trace, path, line, *values, prompt, skip_bad_rows)
    return trace


SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL, SHAREGPT_MIN_LEN = 1024, 2048, 4  # vLLM's filters


def _read_sharegpt(path: Path, f, skip_bad_rows: bool, encode, limit: int | None, seed: int) -> Trace:
    if encode is None:
        raise TraceError(f"{path}: a ShareGPT file has no token counts; it needs a tokenizer (--tokenizer)")
    try:
        data = json.load(f)
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise TraceError(f"{path}:1:1: a ShareGPT file is a JSON list of conversations")
    trace = Trace(path, "sharegpt", [], timed=False)
    for idx in np.random.default_rng(seed).permutation(len(data)):
        entry = data[idx]
        try:
            turns = entry.get("conversations") if isinstance(entry, dict) else None
            if not isinstance(turns, list):
                raise ValueError("no 'conversations' list")
            if len(turns) < 2:
                trace.dropped_empty += 1
                continue
            prompt, reply = (turn.get("value") if isinstance(turn, dict) else None for turn in turns[:2])
            if not isinstance(prompt, str) or not isinstance(reply, str):
                raise ValueError("a turn's 'value' is not a string")
        except ValueError as e:
            if not skip_bad_rows:
                raise TraceError(f"{path}: conversation {idx}: {e} (--skip-bad-rows skips such rows)") from None
            trace.skipped_rows += 1
            continue
        p_len, o_len = len(encode(prompt)), len(encode(reply))
        if (min(p_len, o_len) < SHAREGPT_MIN_LEN or p_len > SHAREGPT_MAX_PROMPT
                or p_len + o_len > SHAREGPT_MAX_TOTAL):
            trace.dropped_empty += 1
            continue
        trace.requests.append(TraceRequest(0.0, p_len, o_len, prompt))
        if limit is not None and len(trace.requests) == limit:
            break
    return trace


def _add(trace: Trace, path: Path, line: int, arrival: float, prompt_len: int, output_len: int,
         prompt: str | None, skip_bad_rows: bool) -> None:
    if output_len == 0:
        trace.dropped_empty += 1
        return
    if prompt_len < 1 or output_len < 0:
        if not skip_bad_rows:
            raise TraceError(f"{path}:{line}: lengths must be positive, got prompt {prompt_len}, output {output_len}")
        trace.skipped_rows += 1
        return
    trace.requests.append(TraceRequest(arrival, prompt_len, output_len, prompt))


def _azure_time(text: str) -> float:
    """Seconds since the epoch of an Azure timestamp (`2023-11-16 18:15:46.0520000`, 7 digits)."""
    stamp, _, rest = text.partition(".")
    digits = "".join(c for c in rest if c.isdigit())
    zone = rest[len(digits):]
    return datetime.fromisoformat(f"{stamp}.{(digits or '0')[:6].ljust(6, '0')}{zone}").timestamp()


def at_rate(times: list[float], rate: float | None) -> list[float]:
    """A trace's arrival times as recorded (rate None), all at once (inf), or scaled to a mean `rate`
    per second (the capacity search's knob: the trace's pattern, faster or slower)."""
    if rate is None:
        return list(times)
    if math.isinf(rate):
        return [0.0] * len(times)
    if rate <= 0:
        raise ValueError(f"--request-rate must be positive, got {rate}")
    span = times[-1] - times[0] if len(times) > 1 and times[-1] > times[0] else 1.0
    factor = len(times) / span / rate
    return [(t - times[0]) * factor for t in times]


def add_trace_args(p) -> None:
    """The replay flags every command that takes `--dataset-name trace` shares."""
    g = p.add_argument_group("trace replay (--dataset-name trace --dataset FILE)")
    g.add_argument("--time-scale", type=float, default=1.0, help="replay the trace X times as fast (2: twice)")
    g.add_argument("--trace-start", type=float, default=0.0, help="seconds into the trace where the replay starts")
    g.add_argument("--trace-duration", type=float, default=None, help="seconds of the trace to replay (default: all)")
    g.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of failing")
    g.add_argument("--ignore-trace-times", action="store_true",
                   help="the trace's lengths only: arrivals from --request-rate (Poisson, or --burstiness), "
                        "as for synthetic data")


def trace_requests(path: str | None, args, limit: int | None = None, encode: Callable[[str], list[int]] | None = None
                   ) -> list[TraceRequest]:
    """The window of the trace that the replay flags select, at most `limit` requests (`encode`:
    the tokenizer's, for a ShareGPT file)."""
    if not path:
        raise ValueError("--dataset-name trace needs --dataset FILE (Azure or BurstGPT CSV, JSON Lines or ShareGPT)")
    trace = read_trace(path, args.skip_bad_rows, encode, seed=getattr(args, "seed", 0))
    chosen = trace.window(args.trace_start, args.trace_duration, args.time_scale) if trace.timed else trace.requests
    chosen = chosen[:limit] if limit else chosen
    if getattr(args, "ignore_trace_times", False):
        chosen = [TraceRequest(0.0, r.prompt_len, r.output_len, r.prompt) for r in chosen]
    return chosen
