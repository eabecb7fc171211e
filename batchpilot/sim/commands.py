"""`batchpilot simulate [sweep | paper]`: the engine's scheduler on modelled hardware."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from batchpilot.bench.capacity import search_capacity
from batchpilot.bench.datasets import LengthDist
from batchpilot.bench.metrics import SLA, summarize
from batchpilot.config import ControllerConfig, SchedulerConfig
from batchpilot.sim.driver import SimRequest, make_workload, simulate
from batchpilot.sim.roofline import Hardware, ModelShape, RooflineModel

# ShareGPT-like lengths (our assumption, fitted by eye to vLLM's filtered ShareGPT: prompt
# median ~170 tokens, output median ~150, both heavy-tailed), with vLLM's filters as caps.
SHAREGPT_LIKE = {"input": "lognormal:170:1.0", "output": "lognormal:150:1.0", "max_prompt": 1024, "max_total": 2048}


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hardware", default="A100-80GB", help="preset in batchpilot/sim/hardware.json")
    p.add_argument("--model", default="Llama-2-7B", help="preset in batchpilot/sim/models.json")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--mem-util", type=float, default=0.9, help="share of device memory for weights + KV cache")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--input-dist", default=SHAREGPT_LIKE["input"])
    p.add_argument("--output-dist", default=SHAREGPT_LIKE["output"])
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sla", default=None, help="ttft:MS,tpot:MS for attainment and goodput")
    p.add_argument("--output-json", default=None)


def add_simulate_parser(sub, add_controller_args, controller_config) -> None:
    sim = sub.add_parser("simulate", help="the scheduler and controllers on modelled hardware (no model)")
    add_workload_args(sim)
    add_controller_args(sim)
    sim.set_defaults(func=lambda a: cmd_simulate(a, controller_config(a)))
    modes = sim.add_subparsers(dest="sim_command")
    sweep = modes.add_parser("sweep", help="static limits vs controllers over request rates, with capacity")
    add_workload_args(sweep)
    add_controller_args(sweep)
    sweep.add_argument("--static", default="8,32,64,128,256,512")
    sweep.add_argument("--controllers", default="memory,combined")
    sweep.add_argument("--target", type=float, default=0.9)
    sweep.set_defaults(func=lambda a: cmd_sweep(a, controller_config(a)))
    paper = modes.add_parser("paper", help="the paper's comparison (Llama-2-7B/13B on A100-80GB)")
    paper.add_argument("--num-prompts", type=int, default=2000)
    paper.add_argument("--seed", type=int, default=0)
    paper.add_argument("--sla-tpot-ms", type=float, default=50.0)
    paper.add_argument("--sla-ttft-ms", type=float, default=2000.0,
                       help="TTFT bound of the capacity SLA (a TPOT-only SLA lets a queue grow without limit)")
    paper.add_argument("--output-json", default=None)
    paper.set_defaults(func=cmd_paper)


class Setup:
    """Everything a simulation needs besides the controller: cost model, capacity, workload."""

    def __init__(self, args: argparse.Namespace):
        model, hw = ModelShape.preset(args.model), Hardware.preset(args.hardware)
        self.cost = RooflineModel(model, hw, args.tp, args.mem_util)
        self.capacity = self.cost.kv_capacity_tokens()
        self.max_model_len = model.max_context
        self.args = args
        self.sla = SLA.parse(args.sla) if getattr(args, "sla", None) else None
        self.input_dist = LengthDist.parse(args.input_dist, "--input-dist")
        self.output_dist = LengthDist.parse(args.output_dist, "--output-dist")
        if args.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")

    def workload(self, rate: float, n: int | None = None) -> list[SimRequest]:
        a = self.args
        return make_workload(n or a.num_prompts, rate, self.input_dist, self.output_dist, a.seed, a.burstiness,
                             SHAREGPT_LIKE["max_prompt"], min(SHAREGPT_LIKE["max_total"], self.max_model_len))

    def run(self, controller: ControllerConfig, rate: float, n: int | None = None, trace: str | None = None
            ) -> dict[str, Any]:
        sched = SchedulerConfig(max_num_batched_tokens=self.args.max_num_batched_tokens)
        res = simulate(self.workload(rate, n), self.cost.step_time, self.capacity, controller, sched,
                       self.max_model_len, self.args.block_size, trace)
        out = summarize(res.records, res.duration_s, self.sla)
        out.update(num_preemptions=res.num_preemptions, num_steps=res.num_steps, rejected=res.rejected,
                   request_rate=rate, kv_capacity_tokens=self.capacity)
        return out

    def capacity_search(self, controller: ControllerConfig, target: float, start: float) -> dict[str, Any]:
        if self.sla is None:
            raise ValueError("capacity needs --sla")

        def probe(rate: float) -> float:
            # two simulated minutes of arrivals, capped so a runaway bracket stays cheap
            n = min(max(self.args.num_prompts, int(rate * 120)), 20_000)
            return self.run(controller, rate, n)["sla_attainment"]

        found = search_capacity(probe, target, start, tolerance=0.05, max_probes=12)
        return {"capacity": found.capacity, "curve": found.curve}


def cmd_simulate(args: argparse.Namespace, controller: ControllerConfig) -> int:
    setup = Setup(args)
    start = time.perf_counter()
    result = setup.run(controller, args.request_rate, trace=controller.trace_path)
    result["wall_s"] = time.perf_counter() - start
    result |= {"hardware": args.hardware, "model": args.model, "tp": args.tp, "controller": controller.name}
    _print(result)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return 0


def _configs(args: argparse.Namespace, base: ControllerConfig) -> dict[str, ControllerConfig]:
    configs = {f"static-{n}": replace(base, name="static", max_num_seqs=int(n))
               for n in filter(None, args.static.split(","))}
    for name in filter(None, args.controllers.split(",")):
        configs[name] = replace(base, name=name.strip())
    return configs


def cmd_sweep(args: argparse.Namespace, base: ControllerConfig) -> int:
    setup = Setup(args)
    results = {}
    for name, cfg in _configs(args, base).items():
        offline = setup.run(cfg, float("inf"))
        row = {"output_throughput": offline["output_throughput"], "num_preemptions": offline["num_preemptions"],
               "p90_tpot_ms": offline["p90_tpot_ms"]}
        if setup.sla is not None:
            start = max(0.1, offline["request_throughput"] / 4)
            row |= setup.capacity_search(cfg, args.target, start)
        results[name] = row
        print(f"{name:>12}: {json.dumps({k: v for k, v in row.items() if k != 'curve'})}", flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    return 0


def _print(result: dict[str, Any]) -> None:
    for key in ("hardware", "model", "tp", "controller", "kv_capacity_tokens", "completed", "duration_s",
                "output_throughput", "request_throughput", "mean_ttft_ms", "p90_ttft_ms", "mean_tpot_ms",
                "p90_tpot_ms", "num_preemptions", "sla_attainment", "goodput", "wall_s"):
        if key in result:
            v = result[key]
            print(f"{key:<22}{v:>14.2f}" if isinstance(v, float) else f"{key:<22}{v!s:>14}")


def cmd_paper(args: argparse.Namespace) -> int:
    """Static limits 8..512 vs memory / SLA / combined for Llama-2-7B and -13B on one A100-80GB."""
    out: dict[str, Any] = {"assumptions": {
        "hardware": "A100-80GB preset (roofline, see batchpilot/sim/hardware.json)", "tp": 1,
        "workload": f"ShareGPT-like lengths {SHAREGPT_LIKE}, {args.num_prompts} requests, seed {args.seed}",
        "throughput": "offline: all requests at t=0",
        "sla": f"TTFT <= {args.sla_ttft_ms} ms and TPOT <= {args.sla_tpot_ms} ms for 90% of requests",
        "controller": "combined = min(b_mem (CLT, eps 0.05), b_sla) with --sla-tpot-ms set to the SLA",
        "default_static": 256}, "models": {}}
    for model in ("Llama-2-7B", "Llama-2-13B"):
        ns = argparse.Namespace(hardware="A100-80GB", model=model, tp=1, mem_util=0.9, num_prompts=args.num_prompts,
                                request_rate=float("inf"), burstiness=1.0, input_dist=SHAREGPT_LIKE["input"],
                                output_dist=SHAREGPT_LIKE["output"], max_num_batched_tokens=8192, block_size=16,
                                seed=args.seed, sla=f"ttft:{args.sla_ttft_ms},tpot:{args.sla_tpot_ms}")
        setup = Setup(ns)
        base = ControllerConfig(max_num_seqs=1024, sla_tpot_ms=args.sla_tpot_ms)
        configs = {f"static-{n}": replace(base, name="static", max_num_seqs=n) for n in (32, 64, 128, 256, 512)}
        configs |= {"memory": replace(base, name="memory"), "sla": replace(base, name="sla"),
                    "combined": replace(base, name="combined")}
        rows = {}
        for name, cfg in configs.items():
            offline = setup.run(cfg, float("inf"))
            cap = setup.capacity_search(cfg, 0.9, max(0.5, offline["request_throughput"] / 4))
            rows[name] = {"output_throughput": offline["output_throughput"], "capacity": cap["capacity"],
                          "num_preemptions": offline["num_preemptions"], "p90_tpot_ms": offline["p90_tpot_ms"]}
            print(f"{model} {name:>10}: {json.dumps(rows[name])}", flush=True)
        statics = {k: v for k, v in rows.items() if k.startswith("static-")}
        best_tp = max(v["output_throughput"] for v in statics.values())
        best_cap = max(v["capacity"] for v in statics.values())
        c, d = rows["combined"], rows["static-256"]
        out["models"][model] = {
            "configs": rows,
            "throughput_gain": c["output_throughput"] / d["output_throughput"] - 1,
            "capacity_gain": c["capacity"] / d["capacity"] - 1 if d["capacity"] else None,
            "throughput_gain_vs_best_static": c["output_throughput"] / best_tp - 1,
            "capacity_gain_vs_best_static": c["capacity"] / best_cap - 1 if best_cap else None,
        }
        g = out["models"][model]
        print(f"{model}: throughput {g['throughput_gain']:+.1%} vs static-256 "
              f"({g['throughput_gain_vs_best_static']:+.1%} vs best static); capacity "
              f"{_pct(g['capacity_gain'])} vs static-256 ({_pct(g['capacity_gain_vs_best_static'])} vs best)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(out, indent=2))
    return 0


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"
