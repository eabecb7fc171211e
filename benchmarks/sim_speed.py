"""How fast does the simulator replay a million-request trace, and is the replay deterministic?

Tiles a trace (by default the Azure code 2023 trace in ../shared/traces, 8,819 requests in an
hour) hour after hour until it holds `--requests` requests, writes it in the trace's own CSV
format, and runs `batchpilot simulate --dataset` on it for each controller, twice for the first
one; prints wall time per run and whether the two runs' results agree to the last digit.

    python benchmarks/sim_speed.py --requests 1000000 --hardware A100-80GB --model Llama-2-7B
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "azure_code_2023.csv"


def tile(source: Path, n: int, out: Path) -> None:
    """`n` requests: the source trace repeated, each copy shifted one more hour."""
    with open(source, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(n):
            row = body[i % len(body)]
            stamp, _, frac = row[0].partition(".")
            shifted = datetime.fromisoformat(stamp) + timedelta(hours=i // len(body))
            w.writerow([f"{shifted.isoformat(sep=' ')}.{frac}", *row[1:]])


def simulate(trace: Path, controller: list[str], hardware: str, model: str, out: Path) -> float:
    cmd = [sys.executable, "-m", "batchpilot.cli", "simulate", "--dataset", str(trace), "--num-prompts",
           str(10**9), "--hardware", hardware, "--model", model, *controller, "--output-json", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--requests", type=int, default=1_000_000)
    p.add_argument("--hardware", default="A100-80GB")
    p.add_argument("--model", default="Llama-2-7B")
    args = p.parse_args()
    controllers = {"combined": ["--batch-controller", "combined"],
                   "static-256": ["--batch-controller", "static", "--max-num-seqs", "256"]}
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "tiled.csv"
        tile(args.trace, args.requests, trace)
        results = {}
        for name, flags in [*controllers.items(), ("combined (again)", controllers["combined"])]:
            out = Path(tmp) / f"{len(results)}.json"
            wall = simulate(trace, flags, args.hardware, args.model, out)
            result = json.loads(out.read_text())
            result.pop("wall_s", None)
            results[name] = result
            print(f"{name:<18} {wall:7.1f} s  completed {result['completed']}  rejected {result['rejected']}  "
                  f"out tok/s {result['output_throughput']:.2f}  p90 TPOT {result['p90_tpot_ms']:.1f} ms  "
                  f"preemptions {result['num_preemptions']}", flush=True)
    print("identical results on the repeat:", results["combined"] == results["combined (again)"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
