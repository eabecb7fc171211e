"""Mixed SLA classes on the real engine: the policies of `sla_classes.py`, one server each,
alternated over rounds, the same seeded traffic for all.

    python benchmarks/sla_classes_real.py --rates 3,5 --rounds 1 --output-json docs/results/sla_classes_real.json

Traffic: `bench serve` random prompts (100-300 tokens, outputs 64-192 forced), Poisson at each
rate, `--interactive-share` of requests in class `interactive` (`--interactive` targets), the rest
in `batch`. Every server defines both class names (so requests may name them); only the per-class
policy gives them targets. "ordering only" gives `interactive` a TTFT target and nothing else:
interactive requests are queued first (as priorities would) and no SLA loop runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from batchpilot.bench.servers import server

SERVE = [sys.executable, "-m", "batchpilot.cli", "--log-level", "WARNING", "serve"]
NAMES = ["--sla-class", "interactive", "--sla-class", "batch"]


def policies(tpot: float, ttft: float, statics: list[int]) -> dict[str, list[str]]:
    found = {f"static-{b}": ["--batch-controller", "static", "--max-num-seqs", str(b), *NAMES] for b in statics}
    found["ordering only, static-256"] = ["--batch-controller", "static", "--max-num-seqs", "256", "--sla-class",
                                          f"interactive:ttft={ttft}", "--sla-class", "batch"]
    found["combined, one SLA"] = ["--sla-tpot-ms", str(tpot), *NAMES]
    found["combined, per-class SLAs"] = ["--sla-class", f"interactive:tpot={tpot},ttft={ttft}", "--sla-class", "batch"]
    return found


def run_one(args, server_args: list[str], rate: float, tmp: Path) -> dict:
    out = tmp / "result.json"
    with server([*SERVE, *args.server_args.split(), *server_args], tmp / "server.log", 300) as (url, _):
        subprocess.run([sys.executable, "-m", "batchpilot.cli", "bench", "serve", "--base-url", url,
                        "--num-prompts", str(args.num_prompts), "--request-rate", str(rate),
                        "--input-dist", "uniform:100:300", "--output-dist", "uniform:64:192", "--ignore-eos",
                        "--sla-mix", f"interactive:{args.interactive_share},batch:{1 - args.interactive_share}",
                        "--sla-class", f"interactive:{args.interactive}", "--seed", str(args.seed), "--no-progress",
                        "--output-json", str(out)], check=True, capture_output=True, text=True, timeout=3600)
    result = json.loads(out.read_text())
    inter = result["classes"]["interactive"]
    return {"output_throughput": result["output_throughput"], "interactive_attainment": inter["sla_attainment"],
            "interactive_p90_tpot_ms": inter.get("p90_tpot_ms"), "interactive_p90_ttft_ms": inter.get("p90_ttft_ms"),
            "batch_p90_ttft_ms": result["classes"]["batch"].get("p90_ttft_ms"), "failed": result["failed"]}


def find_lstar(args, statics: list[int], tmp: Path) -> float:
    """The highest rate at which a static limit keeps --lstar-target of requests inside the
    interactive SLA when every request is interactive (bench capacity, one server per limit)."""
    best = 0.0
    for b in statics:
        out = tmp / "capacity.json"
        cmd = [*SERVE, *args.server_args.split(), "--batch-controller", "static", "--max-num-seqs", str(b), *NAMES]
        with server(cmd, tmp / "server.log", 300) as (url, _):
            subprocess.run([sys.executable, "-m", "batchpilot.cli", "bench", "capacity", "--base-url", url,
                            "--input-dist", "uniform:100:300", "--output-dist", "uniform:64:192", "--ignore-eos",
                            "--sla-mix", "interactive:1", "--sla-class", f"interactive:{args.interactive}",
                            "--capacity-class", "interactive", "--target", str(args.lstar_target),
                            "--start-rate", "1", "--tolerance", "0.15", "--probe-seconds", str(args.probe_seconds),
                            "--num-prompts", "40", "--seed", str(args.seed), "--no-progress",
                            "--output-json", str(out)], check=True, capture_output=True, text=True, timeout=3600)
        found = json.loads(out.read_text())
        curve = ", ".join(f"{c['rate']:.2f}: {c['sla_attainment']:.2f}" for c in found["curve"])
        print(f"  one class, static-{b}: capacity {found['capacity']:.2f} req/s ({curve})", file=sys.stderr, flush=True)
        best = max(best, found["capacity"])
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="3,5", help="request rates, or 'lstar' to measure L* first (--lstar-statics)")
    p.add_argument("--lstar-statics", default="16,32", help="static limits whose one-class capacity defines L*")
    p.add_argument("--lstar-target", type=float, default=0.99)
    p.add_argument("--probe-seconds", type=float, default=40)
    p.add_argument("--rounds", type=int, default=1, help="each round runs every policy, in reversed order")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--interactive", default="tpot=40,ttft=2000")
    p.add_argument("--interactive-share", type=float, default=0.3)
    p.add_argument("--statics", default="8,16,32,256")
    p.add_argument("--server-args", default="--threads 2 --kv-cache-gib 0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    targets = dict(item.split("=") for item in args.interactive.split(","))
    configs = policies(float(targets["tpot"]), float(targets["ttft"]), [int(b) for b in args.statics.split(",")])
    results: dict[str, dict[str, list[dict]]] = {}
    lstar = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.rates == "lstar":
            lstar = find_lstar(args, [int(b) for b in args.lstar_statics.split(",")], Path(tmp))
            print(f"L* = {lstar:.2f} req/s (all traffic interactive, {args.lstar_target:.0%} in SLA)", flush=True)
            rates = [lstar]
        else:
            rates = [float(r) for r in args.rates.split(",")]
        for rate in rates:
            runs = results.setdefault(str(rate), {name: [] for name in configs})
            for k in range(args.rounds):
                for name in (list(configs) if k % 2 == 0 else list(reversed(configs))):
                    r = run_one(args, configs[name], rate, Path(tmp))
                    runs[name].append(r)
                    print(f"  {rate} req/s round {k} {name}: {json.dumps(r)}", file=sys.stderr, flush=True)
            print(f"\n{rate} req/s, {args.num_prompts} requests, {100 * args.interactive_share:.0f}% interactive "
                  f"({args.interactive}); each cell: the rounds' values")
            print("| policy | interactive in SLA | out tok/s | interactive P90 TPOT ms | interactive P90 TTFT ms | "
                  "batch P90 TTFT ms |")
            print("|---|---|---|---|---|---|")
            for name, rs in runs.items():
                def cells(key, fmt, rs=rs):
                    return " / ".join(fmt.format(r[key]) if r[key] is not None else "-" for r in rs)
                print(f"| {name} | {cells('interactive_attainment', '{:.1%}')} | {cells('output_throughput', '{:.1f}')}"
                      f" | {cells('interactive_p90_tpot_ms', '{:.0f}')} | {cells('interactive_p90_ttft_ms', '{:.0f}')}"
                      f" | {cells('batch_p90_ttft_ms', '{:.0f}')} |", flush=True)
    if args.output_json:
        report = {"args": vars(args), "lstar": lstar, "results": results}
        Path(args.output_json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
