"""`batchpilot bench serve | capacity | compare`: the client side of the benchmarks."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from batchpilot.bench.capacity import search_capacity
from batchpilot.bench.metrics import SLA
from batchpilot.bench.serve import benchmark
from batchpilot.bench.workload import add_workload_args, build_payloads
from batchpilot.config import DEFAULT_MODEL_NAME

TABLE_KEYS = ["completed", "failed", "duration_s", "request_throughput", "output_throughput", "total_token_throughput",
              "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
              "p90_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms",
              "sla_attainment", "goodput"]


def _rate(text: str) -> float:
    value = float(text)
    if value <= 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be positive or inf, got {text}")
    return value


def add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=DEFAULT_MODEL_NAME, help="model id sent in requests")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals (1 = Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sla", default=None, help="ttft:MS,tpot:MS for SLA attainment and goodput")
    p.add_argument("--timeout", type=float, default=600, help="seconds per request")
    p.add_argument("--output-json", default=None)
    p.add_argument("--no-progress", action="store_true")
    add_workload_args(p)


def add_bench_commands(sub) -> None:
    serve = sub.add_parser("serve", help="load an OpenAI-compatible endpoint (Poisson arrivals, streaming)")
    add_client_args(serve)
    serve.add_argument("--request-rate", type=_rate, default=float("inf"), help="requests/s, or inf")
    serve.set_defaults(func=cmd_serve)

    cap = sub.add_parser("capacity", help="highest request rate meeting the SLA for --target of requests")
    add_client_args(cap)
    cap.add_argument("--target", type=float, default=0.9)
    cap.add_argument("--start-rate", type=_rate, default=1.0)
    cap.add_argument("--tolerance", type=float, default=0.1, help="relative width of the final bracket")
    cap.add_argument("--probe-seconds", type=float, default=60, help="arrivals per probe span this long")
    cap.add_argument("--max-probes", type=int, default=10)
    cap.set_defaults(func=cmd_capacity)

    from batchpilot.bench.compare import add_compare_parser

    add_compare_parser(sub, add_client_args)


def _check(args: argparse.Namespace) -> SLA | None:
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    if args.burstiness <= 0:
        raise ValueError(f"--burstiness must be positive, got {args.burstiness}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    return SLA.parse(args.sla) if args.sla else None


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(burstiness=args.burstiness, max_concurrency=args.max_concurrency, seed=args.seed,
                api_key=args.api_key, timeout_s=args.timeout, progress=not args.no_progress)


def run_serve(args: argparse.Namespace, rate: float, num_prompts: int, sla: SLA | None) -> dict[str, Any]:
    from batchpilot.model.loader import load_tokenizer  # torch: only when a tokenizer is needed

    tokenizer = load_tokenizer(args.tokenizer)
    payloads = build_payloads(args, tokenizer, args.model, num_prompts, args.seed)
    return benchmark(args.base_url.rstrip("/"), payloads, rate, sla, **load_kwargs(args))


def cmd_serve(args: argparse.Namespace) -> int:
    sla = _check(args)
    result = run_serve(args, args.request_rate, args.num_prompts, sla)
    print_table(result, f"bench serve: {args.base_url} ({args.dataset_name}, rate {args.request_rate})")
    _write(args.output_json, result)
    return 1 if result["completed"] == 0 else 0


def capacity(args: argparse.Namespace, sla: SLA) -> dict[str, Any]:
    """Run the capacity search against args.base_url; returns the rate, the curve and the probes."""
    probes: list[dict[str, Any]] = []

    def probe(rate: float) -> float:
        n = max(args.num_prompts, int(rate * args.probe_seconds))
        result = run_serve(args, rate, n, sla)
        probes.append(result)
        print(f"  probe {rate:.3f} req/s: SLA attainment {result['sla_attainment']:.3f} ({n} requests)", flush=True)
        return result["sla_attainment"]

    found = search_capacity(probe, args.target, args.start_rate, args.tolerance, args.max_probes)
    return {"capacity": found.capacity, "target": args.target, "sla": args.sla,
            "curve": [{"rate": r, "sla_attainment": a} for r, a in found.curve], "probes": probes}


def cmd_capacity(args: argparse.Namespace) -> int:
    sla = _check(args)
    if sla is None:
        raise ValueError("--sla is required for bench capacity (for example --sla tpot:100)")
    result = capacity(args, sla)
    print(f"capacity: {result['capacity']:.3f} req/s at SLA {args.sla} for {args.target:.0%} of requests")
    for point in result["curve"]:
        print(f"  {point['rate']:8.3f} req/s  attainment {point['sla_attainment']:.3f}")
    _write(args.output_json, result)
    return 0


def print_table(result: dict[str, Any], title: str) -> None:
    print(f"==== {title} ====")
    for key in TABLE_KEYS:
        if key in result:
            value = result[key]
            print(f"{key:<26}{value:>14.2f}" if isinstance(value, float) else f"{key:<26}{value:>14}")
    if result.get("errors"):
        print(f"{'errors':<26}{json.dumps(result['errors'])}")
    if result.get("interrupted"):
        print("(interrupted: partial result)")


def _write(path: str | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2))
