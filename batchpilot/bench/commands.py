"""`batchpilot bench serve | capacity | compare`: the client side of the benchmarks."""

from __future__ import annotations

import argparse
import math
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

from batchpilot.bench.capacity import search_capacity
from batchpilot.bench.metrics import DEFAULT_PERCENTILES, SLA
from batchpilot.bench.results import print_result, write_json
from batchpilot.bench.serve import benchmark
from batchpilot.bench.workload import add_workload_args, assign_sla_classes, build_payloads, parse_sla_mix
from batchpilot.config import DEFAULT_MODEL_NAME, SLAClass

TABLE_KEYS = ["completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
              "mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
              "p90_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms", "p99_e2el_ms",
              "sla_attainment", "request_goodput"]
CLASS_KEYS = ["completed", "failed", "output_throughput", "p90_ttft_ms", "p90_tpot_ms", "sla_attainment",
              "request_goodput"]


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
    p.add_argument("--sla", default=None, help="ttft:MS,tpot:MS,e2el:MS for SLA attainment and goodput")
    p.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="vLLM's spelling of --sla: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--sla-mix", default=None, metavar="NAME:SHARE,...",
                   help="send each request in an SLA class (body field sla_class), e.g. interactive:0.3,batch:0.7")
    p.add_argument("--sla-class", action="append", default=[], metavar="NAME:tpot=MS,ttft=MS",
                   help="a class's targets (the server's syntax), for per-class attainment and goodput")
    p.add_argument("--timeout", type=float, default=600, help="seconds per request")
    p.add_argument("--output-json", default=None)
    p.add_argument("--save-result", action="store_true", help="vLLM's: write the result to --result-dir")
    p.add_argument("--result-dir", default=None, help="with --save-result (default: the current directory)")
    p.add_argument("--result-filename", default=None, help="with --save-result (default: vLLM's naming)")
    p.add_argument("--no-progress", "--disable-tqdm", action="store_true", dest="no_progress")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                   help="vLLM's: metrics whose percentiles are reported (any of ttft, tpot, itl, e2el; "
                        "all four always get mean, median, std, p90, p99)")
    p.add_argument("--metric-percentiles", default="99", help="vLLM's: extra percentiles, e.g. 25,50,75")
    add_workload_args(p)


def add_bench_commands(sub) -> None:
    serve = sub.add_parser("serve", help="load an OpenAI-compatible endpoint (Poisson arrivals, streaming)")
    add_client_args(serve)
    serve.add_argument("--request-rate", type=_rate, default=None,
                       help="requests/s, or inf (default: a trace's own times, else all at once)")
    serve.set_defaults(func=cmd_serve)

    cap = sub.add_parser("capacity", help="highest request rate meeting the SLA for --target of requests")
    add_client_args(cap)
    cap.add_argument("--target", type=float, default=0.9)
    cap.add_argument("--start-rate", type=_rate, default=1.0)
    cap.add_argument("--tolerance", type=float, default=0.1, help="relative width of the final bracket")
    cap.add_argument("--probe-seconds", type=float, default=60, help="arrivals per probe span this long")
    cap.add_argument("--max-probes", type=int, default=10)
    cap.add_argument("--arrival-seeds", type=int, default=1,
                     help="Poisson arrival patterns (seeds --seed, --seed + 1, ...) each probe runs and pools: one "
                          "pattern's bursts can move a capacity by several percent")
    cap.add_argument("--capacity-class", default=None, metavar="NAME",
                     help="search the rate at which this --sla-mix class keeps its --sla-class targets (the other "
                          "classes ride along: the report gives the total throughput at each probe)")
    cap.set_defaults(func=cmd_capacity)


PERCENTILE_METRICS = ("ttft", "tpot", "itl", "e2el")


def percentiles(args: argparse.Namespace) -> tuple[float, ...]:
    """Our p90 and p99 plus --metric-percentiles, after checking both vLLM flags."""
    for name in args.percentile_metrics.split(","):
        if name.strip() not in PERCENTILE_METRICS:
            raise ValueError(f"--percentile-metrics: unknown metric {name!r} (any of {', '.join(PERCENTILE_METRICS)})")
    extra = []
    for text in args.metric_percentiles.split(","):
        try:
            p = float(text)
        except ValueError:
            p = -1.0
        if not 0 < p < 100:
            raise ValueError(f"--metric-percentiles: {text!r} is not a percentile between 0 and 100")
        extra.append(p)
    return tuple(sorted(set(DEFAULT_PERCENTILES) | set(extra)))


def check_client_args(args: argparse.Namespace) -> SLA | None:
    """Reject bad load flags before any request is sent; the SLA they state, if any."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    if args.burstiness <= 0:
        raise ValueError(f"--burstiness must be positive, got {args.burstiness}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    percentiles(args)  # bad percentile flags fail before any load, not after it
    if args.sla and args.goodput:
        raise ValueError("--sla and --goodput are two spellings of the same targets: give one")
    class_slas(args)
    if args.goodput:
        return SLA.parse(" ".join(args.goodput), "--goodput")
    return SLA.parse(args.sla) if args.sla else None


def class_slas(args: argparse.Namespace, mix: dict[str, float] | None = None) -> dict[str, SLA | None]:
    """Each class of --sla-mix (`mix`, parsed here if not given) with its --sla-class targets (None: none)."""
    targets = {c.name: SLA(ttft_ms=c.ttft_ms, tpot_ms=c.tpot_ms) if c.tpot_ms or c.ttft_ms else None
               for c in (SLAClass.parse(text) for text in args.sla_class)}
    if mix is None:
        mix = parse_sla_mix(args.sla_mix) if args.sla_mix else {}
    missing = sorted(set(targets) - set(mix))
    if mix and missing:
        raise ValueError(f"--sla-class {', '.join(missing)}: not in --sla-mix ({args.sla_mix})")
    if getattr(args, "capacity_class", None) and targets.get(args.capacity_class) is None:
        raise ValueError(f"--capacity-class {args.capacity_class}: give its targets with --sla-class "
                         f"{args.capacity_class}:tpot=MS,ttft=MS")
    return {name: targets.get(name) for name in mix}


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(burstiness=args.burstiness, max_concurrency=args.max_concurrency, seed=args.seed,
                api_key=args.api_key, timeout_s=args.timeout, progress=not args.no_progress,
                percentiles=percentiles(args))


def run_serve(args: argparse.Namespace, rate: float, num_prompts: int, sla: SLA | None,
              arrival_seed: int | None = None) -> dict[str, Any]:
    """One load run; `arrival_seed` draws the arrival times alone (default --seed, which draws the prompts too)."""
    from batchpilot.model.loader import load_tokenizer  # torch: only when a tokenizer is needed

    tokenizer = load_tokenizer(args.tokenizer)
    payloads = build_payloads(args, tokenizer, args.model, num_prompts, args.seed)
    mix = parse_sla_mix(args.sla_mix) if args.sla_mix else {}
    if mix:
        assign_sla_classes(payloads, mix, args.seed)
    load = load_kwargs(args) | ({} if arrival_seed is None else {"seed": arrival_seed})
    result = benchmark(args.base_url.rstrip("/"), payloads, rate, sla, class_slas=class_slas(args, mix), **load)
    chat = any(p.path.endswith("/chat/completions") for p in payloads)
    return {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai-chat" if chat else "openai",
            "model_id": args.model, "tokenizer_id": args.tokenizer or args.model, "num_prompts": num_prompts,
            "burstiness": args.burstiness, "max_concurrency": args.max_concurrency} | result


def cmd_serve(args: argparse.Namespace) -> int:
    sla = check_client_args(args)
    result = run_serve(args, args.request_rate, args.num_prompts, sla)
    print_result(result, f"bench serve: {args.base_url} ({args.dataset_name}, rate {args.request_rate})", TABLE_KEYS)
    for name, summary in result.get("classes", {}).items():
        print_result(summary, f"SLA class {name}", CLASS_KEYS)
    _write(args.output_json, result)
    if args.save_result:
        _write(str(Path(args.result_dir or ".") / (args.result_filename or _vllm_result_name(result))), result)
    return 1 if result["completed"] == 0 else 0


def _vllm_result_name(result: dict[str, Any]) -> str:
    """vLLM's default file name: backend, concurrency, rate, model and date."""
    concurrency = f"concurrency{result['max_concurrency']}-" if result["max_concurrency"] else ""
    model = str(result["model_id"]).split("/")[-1]
    return f"{result['backend']}-{concurrency}{result['request_rate']}qps-{model}-{result['date']}.json"


def capacity(args: argparse.Namespace, sla: SLA | None) -> dict[str, Any]:
    """Run the capacity search against args.base_url; returns the rate, the curve and the probes.
    With --capacity-class, the attainment searched is that class's, against its own targets. Each probe
    runs --arrival-seeds arrival patterns of the same prompts and pools their attainment (the mean:
    every pattern sends the same number of requests)."""
    if args.arrival_seeds < 1:
        raise ValueError(f"--arrival-seeds must be at least 1, got {args.arrival_seeds}")
    probes: list[dict[str, Any]] = []
    held = args.capacity_class

    def probe(rate: float) -> float:
        n = max(args.num_prompts, int(rate * args.probe_seconds))
        runs = [run_serve(args, rate, n, sla, arrival_seed=args.seed + k) for k in range(args.arrival_seeds)]
        probes.extend(runs)
        attainment = statistics.fmean(r["classes"][held]["sla_attainment"] if held else r["sla_attainment"]
                                      for r in runs)
        throughput = statistics.fmean(r["output_throughput"] for r in runs)
        patterns = f", {len(runs)} arrival patterns" if len(runs) > 1 else ""
        print(f"  probe {rate:.3f} req/s: SLA attainment {attainment:.3f}{f' ({held})' if held else ''}, "
              f"{throughput:.1f} out tok/s ({n} requests{patterns})", flush=True)
        return attainment

    found = search_capacity(probe, args.target, args.start_rate, args.tolerance, args.max_probes)
    return {"capacity": found.capacity, "capacity_bounded": found.bounded, "target": args.target, "sla": args.sla,
            "capacity_class": held, "arrival_seeds": args.arrival_seeds,
            "curve": [{"rate": r, "sla_attainment": a} for r, a in found.curve], "probes": probes}


def cmd_capacity(args: argparse.Namespace) -> int:
    sla = check_client_args(args)
    if sla is None and not args.capacity_class:
        raise ValueError("--sla (or --capacity-class) is required for bench capacity (for example --sla tpot:100)")
    result = capacity(args, sla)
    held = f"class {args.capacity_class}'s SLA" if args.capacity_class else f"SLA {args.sla}"
    print(f"capacity: {result['capacity']:.3f} req/s at {held} for {args.target:.0%} of requests")
    for point in result["curve"]:
        print(f"  {point['rate']:8.3f} req/s  attainment {point['sla_attainment']:.3f}")
    _write(args.output_json, result)
    return 0


def _write(path: str | None, result: dict[str, Any]) -> None:
    if path:
        write_json(path, result)
