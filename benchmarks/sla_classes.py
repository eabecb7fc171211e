"""Mixed SLA classes in the simulator: does the per-class controller keep the strict class's SLA
while the rest of the capacity goes to throughput?

    python benchmarks/sla_classes.py --hardware A100-80GB --model Llama-2-7B --num-prompts 2000

Traffic: Poisson arrivals, ShareGPT-like lengths, a share (`--interactive-share`, 0.3) of
requests in the class `interactive` (TPOT and TTFT targets, `--interactive`) and the rest in
`batch` (no target). Steps:
1. The load L*: the highest rate at which a static limit (swept) keeps 99% of requests inside the
   interactive SLA when all traffic is interactive (one class) - what an operator can promise today.
2. At L* (and at multiples of it, `--load-factors`), on the mixed traffic, each policy: FCFS
   static limits (the sweep), vLLM-style priorities alone (interactive first, static 256), our
   single-SLA combined controller (one --sla-tpot-ms for everyone), and per-class SLAs
   (`--sla-class`, the combined controller). Reported: the interactive class's attainment, the
   total output tok/s, and that against the best static limit's.

Deterministic (roofline cost model, seeded workload).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path

from batchpilot.bench.capacity import search_capacity
from batchpilot.bench.datasets import LengthDist
from batchpilot.bench.metrics import SLA, summarize, summarize_classes
from batchpilot.config import ControllerConfig, SchedulerConfig, SLAClass
from batchpilot.sim.commands import SHAREGPT_LIKE
from batchpilot.sim.driver import SimRequest, make_workload, simulate
from batchpilot.sim.roofline import Hardware, ModelShape, RooflineModel

STATICS = (8, 16, 32, 64, 128, 256)


def workload(args: argparse.Namespace, rate: float, share: float) -> list[SimRequest]:
    reqs = make_workload(args.num_prompts, rate, LengthDist.parse(SHAREGPT_LIKE["input"], "input"),
                         LengthDist.parse(SHAREGPT_LIKE["output"], "output"), args.seed, 1.0,
                         SHAREGPT_LIKE["max_prompt"], SHAREGPT_LIKE["max_total"])
    rng = random.Random(args.seed)
    return [replace(r, sla_class="interactive" if rng.random() < share else "batch") for r in reqs]


def run(args, cost, capacity: int, reqs: list[SimRequest], controller: ControllerConfig,
        scheduler: SchedulerConfig, interactive: SLA) -> dict:
    res = simulate(reqs, cost.step_time, capacity, controller, scheduler, cost.model.max_context, 16)
    assert not res.rejected, "the simulator refused requests"
    total = summarize(res.records, res.duration_s)
    by_class = summarize_classes(res.records, res.duration_s, {"interactive": interactive, "batch": None})
    return {"output_throughput": total["output_throughput"], "preemptions": res.num_preemptions,
            "interactive_attainment": by_class["interactive"].get("sla_attainment", 1.0),
            "interactive_p90_tpot_ms": by_class["interactive"].get("p90_tpot_ms"),
            "interactive_p90_ttft_ms": by_class["interactive"].get("p90_ttft_ms"),
            "batch_output_throughput": by_class["batch"]["output_throughput"],
            "batch_p90_ttft_ms": by_class["batch"].get("p90_ttft_ms")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hardware", default="A100-80GB")
    p.add_argument("--model", default="Llama-2-7B")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="pool size (default: what the weights leave)")
    p.add_argument("--num-prompts", type=int, default=2000)
    p.add_argument("--interactive", default="tpot=40,ttft=2000", help="the interactive class's targets")
    p.add_argument("--interactive-share", type=float, default=0.3)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--load-factors", type=lambda t: [float(x) for x in t.split(",")], default=[1.0, 1.5, 2.0],
                   help="rates to run the mixed traffic at, as multiples of L*")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    cls = SLAClass.parse(f"interactive:{args.interactive}")
    interactive = SLA(ttft_ms=cls.ttft_ms, tpot_ms=cls.tpot_ms)
    cost = RooflineModel(ModelShape.preset(args.model), Hardware.preset(args.hardware))
    capacity = cost.kv_capacity_tokens(args.kv_cache_gib)
    # the baselines know the class names (to label their requests) but no targets: FCFS order, no SLA loop
    fcfs = SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                           sla_classes=(SLAClass("interactive"), SLAClass("batch")))

    # 1. L*: the best static limit's capacity at 99% when every request is interactive
    best_rate, best_static = 0.0, None
    for b in STATICS:
        static = ControllerConfig(name="static", max_num_seqs=b)
        found = search_capacity(lambda r, c=static: run(args, cost, capacity, workload(args, r, 1.0), c, fcfs,
                                                        interactive)["interactive_attainment"],
                                target=0.99, start_rate=4.0, tolerance=0.05, max_probes=14)
        print(f"  one class, static-{b}: capacity {found.capacity:.2f} req/s at 99%", file=sys.stderr)
        if found.capacity > best_rate:
            best_rate, best_static = found.capacity, b
    print(f"L* = {best_rate:.2f} req/s (static-{best_static}, all traffic interactive)", file=sys.stderr)

    # 2. the mixed traffic at L* (and above it: --load-factors)
    classes = replace(fcfs, sla_classes=(cls, SLAClass("batch")))
    tables = {}
    for factor in args.load_factors:
        rate = best_rate * factor
        reqs = workload(args, rate, args.interactive_share)
        policies: dict[str, tuple[ControllerConfig, SchedulerConfig, list[SimRequest]]] = {
            f"static-{b}": (ControllerConfig(name="static", max_num_seqs=b), fcfs, reqs) for b in STATICS}
        prioritised = [replace(r, priority=0 if r.sla_class == "interactive" else 1) for r in reqs]
        policies["priority, static-256"] = (ControllerConfig(name="static", max_num_seqs=256),
                                            replace(fcfs, scheduling_policy="priority"), prioritised)
        policies["combined, one SLA"] = (ControllerConfig(sla_tpot_ms=cls.tpot_ms), fcfs, reqs)
        policies["combined, per-class SLAs"] = (ControllerConfig(), classes, reqs)
        results = {}
        for name, (controller, scheduler, traffic) in policies.items():
            results[name] = run(args, cost, capacity, traffic, controller, scheduler, interactive)
            print(f"  x{factor} {name}: {json.dumps(results[name])}", file=sys.stderr)
        tables[factor] = results
        best = max((v["output_throughput"], k) for k, v in results.items() if k.startswith("static-"))
        rows = [[name, f"{100 * r['interactive_attainment']:.1f}%", f"{r['output_throughput']:.0f}",
                 f"{r['output_throughput'] / best[0]:.3f}", f"{r['interactive_p90_tpot_ms']:.1f}",
                 f"{r['interactive_p90_ttft_ms']:.0f}", f"{r['batch_p90_ttft_ms']:.0f}", str(r["preemptions"])]
                for name, r in results.items()]
        print(f"\n{args.hardware} / {args.model}, {args.num_prompts} requests at {factor} x L* = {rate:.2f} req/s, "
              f"{100 * args.interactive_share:.0f}% interactive ({args.interactive}); best static by throughput: "
              f"{best[1]}")
        header = ["policy", "interactive in SLA", "out tok/s", "vs best static", "interactive P90 TPOT ms",
                  "interactive P90 TTFT ms", "batch P90 TTFT ms", "preemptions"]
        for row in [header, ["---"] * len(header), *rows]:
            print("| " + " | ".join(row) + " |")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"l_star": best_rate, "l_star_static": best_static,
                                                      "args": vars(args), "results": tables}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
