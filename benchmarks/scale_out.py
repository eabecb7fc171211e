"""Capacity of N replicas of T threads behind Ray Serve against one server of N*T threads.

Each configuration is a fresh `batchpilot serve` on a free port; once every replica reports
on /metrics, `batchpilot bench capacity` (a separate process, the same seeded workload for
all) searches the highest Poisson rate that meets the SLA for --target of requests.

    python benchmarks/scale_out.py --output-json docs/results/scale_out.json

On a 2-core machine the default compares 2 replicas x 1 thread with 1 server x 2 threads;
Ray's own processes (GCS, raylet, controller, proxy) run on the same two cores, and their
cost is part of what is measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from batchpilot.bench.metrics import PER_REQUEST_KEYS
from batchpilot.bench.servers import server, wait_for_replicas

CONFIGS = {"1x2": ["--threads", "2"], "2x1": ["--replicas", "2", "--threads", "1"]}


def measure(name: str, serve_args: list[str], client_args: list[str], logs: Path) -> dict:
    cmd = [sys.executable, "-m", "batchpilot.cli", "--log-level", "WARNING", "serve", *serve_args]
    replicas = int(serve_args[serve_args.index("--replicas") + 1]) if "--replicas" in serve_args else 1
    with server(cmd, logs / f"{name}.log", timeout=900) as (url, _):
        wait_for_replicas(url, replicas, timeout=600)
        out = logs / f"{name}.json"
        subprocess.run([sys.executable, "-m", "batchpilot.cli", "bench", "capacity", "--base-url", url,
                        "--no-progress", "--output-json", str(out), *client_args], check=True)
        result = json.loads(out.read_text())
    for probe in result["probes"]:
        for key in PER_REQUEST_KEYS:  # the report keeps the summaries
            probe.pop(key, None)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="1x2,2x1", help=f"comma list of {sorted(CONFIGS)}")
    p.add_argument("--output-json", default=None)
    p.add_argument("client_args", nargs="*", help="bench capacity flags after --")
    args = p.parse_args()
    client_args = args.client_args or [
        "--sla", "ttft:3000,tpot:100", "--target", "0.9", "--input-dist", "uniform:50:400",
        "--output-dist", "uniform:32:256", "--ignore-eos", "--start-rate", "1", "--probe-seconds", "40",
        "--num-prompts", "40", "--tolerance", "0.15", "--max-probes", "7", "--seed", "0"]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            results[name] = measure(name, CONFIGS[name], client_args, Path(tmp))
            print(f"{name}: capacity {results[name]['capacity']:.3f} req/s", flush=True)
    print("| config | capacity req/s | probes (rate: attainment) |\n|---|---|---|")
    for name, r in results.items():
        curve = ", ".join(f"{c['rate']:.2f}: {c['sla_attainment']:.2f}" for c in r["curve"])
        print(f"| {name} | {r['capacity']:.3f} | {curve} |")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"client_args": client_args, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
