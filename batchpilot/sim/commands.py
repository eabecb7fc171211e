"""`batchpilot simulate [sweep | paper]` and `batchpilot profile`: the engine's scheduler on modelled hardware."""

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
from batchpilot.bench.results import write_json
from batchpilot.bench.serve import arrival_offsets
from batchpilot.bench.traces import add_trace_args, trace_requests
from batchpilot.config import DTYPES, CacheConfig, ControllerConfig, EngineConfig, SchedulerConfig
from batchpilot.sim.driver import SimRequest, make_workload, simulate
from batchpilot.sim.measure import (
    CALIBRATION_RUNS,
    DEFAULT_BATCH_SIZES,
    DEFAULT_CONTEXT_LENS,
    DEFAULT_PREFILL_TOKENS,
    measure_profile,
    recalibrate,
)
from batchpilot.sim.profile import CALIBRATION_KV_TOKENS, ProfileGrid, ProfileModel
from batchpilot.sim.roofline import Hardware, ModelShape, RooflineModel
from batchpilot.sim.tournament import add_tournament_parser

# ShareGPT-like lengths (our assumption, fitted by eye to vLLM's filtered ShareGPT: prompt
# median ~170 tokens, output median ~150, both heavy-tailed), with vLLM's filters as caps.
SHAREGPT_LIKE = {"input": "lognormal:170:1.0", "output": "lognormal:150:1.0", "max_prompt": 1024, "max_total": 2048}


def add_simulation_args(p: argparse.ArgumentParser) -> None:
    """The simulated machine (roofline preset or measured profile), its workload and its SLA."""
    p.add_argument("--hardware", default="A100-80GB", help="roofline: preset in batchpilot/sim/hardware.json")
    p.add_argument("--model", default="Llama-2-7B", help="roofline: preset in batchpilot/sim/models.json")
    p.add_argument("--tp", type=int, default=1, help="roofline: tensor-parallel degree")
    p.add_argument("--mem-util", type=float, default=0.9,
                   help="roofline: share of device memory for weights + KV cache")
    p.add_argument("--profile", default=None, metavar="JSON",
                   help="cost model measured by `batchpilot profile` instead of the roofline")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV pool size (needed with --profile; with the roofline it overrides --mem-util)")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--request-rate", type=float, default=None,
                   help="Poisson arrivals per second, or inf (all at once); with --dataset, the trace's own "
                        "times by default, and a rate rescales them to that mean rate")
    p.add_argument("--dataset", default=None, metavar="FILE",
                   help="a trace (Azure or BurstGPT CSV, or JSON Lines: its lengths and arrival times) or a "
                        "ShareGPT JSON (lengths by --tokenizer; all at once, or Poisson at --request-rate)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer that counts a ShareGPT file's tokens: HF folder or .gguf (default: the "
                        "default model's)")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--input-dist", default=SHAREGPT_LIKE["input"])
    p.add_argument("--output-dist", default=SHAREGPT_LIKE["output"])
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--replicas", type=int, default=1, help="engine replicas behind one router (each a whole engine)")
    p.add_argument("--routing", default="load-aware", help="load-aware (power of two choices) or round-robin")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sla", default=None, help="ttft:MS,tpot:MS for attainment and goodput")
    p.add_argument("--output-json", default=None)
    add_trace_args(p)


def add_simulate_parser(sub, add_controller_args, controller_config) -> None:
    sim = sub.add_parser("simulate", help="the scheduler and controllers on modelled hardware (no model)")
    add_simulation_args(sim)
    add_controller_args(sim)
    sim.set_defaults(func=lambda a: cmd_simulate(a, controller_config(a)))
    modes = sim.add_subparsers(dest="sim_command")
    sweep = modes.add_parser("sweep", help="static limits vs controllers over request rates, with capacity")
    add_simulation_args(sweep)
    add_controller_args(sweep)
    sweep.add_argument("--static", default="8,32,64,128,256,512")
    sweep.add_argument("--controllers", default="memory,combined")
    sweep.add_argument("--target", type=float, default=0.9)
    sweep.add_argument("--plot", default=None, metavar="PNG",
                       help="throughput per configuration, and SLA attainment over request rate (with --sla)")
    sweep.set_defaults(func=lambda a: cmd_sweep(a, controller_config(a)))
    add_tournament_parser(modes, add_simulation_args)
    paper = modes.add_parser("paper", help="the paper's comparison (Llama-2-7B/13B on A100-80GB)")
    paper.add_argument("--num-prompts", type=int, default=2000)
    paper.add_argument("--seed", type=int, default=0)
    paper.add_argument("--sla-tpot-ms", type=float, default=50.0)
    paper.add_argument("--sla-ttft-ms", type=float, default=2000.0,
                       help="TTFT bound of the capacity SLA (a TPOT-only SLA lets a queue grow without limit)")
    paper.add_argument("--output-json", default=None)
    paper.set_defaults(func=cmd_paper)


def add_profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure the real engine's step times for `simulate --profile`")
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch-sizes", default=_csv(DEFAULT_BATCH_SIZES), help="decodes per step (grid axis)")
    p.add_argument("--context-lens", default=_csv(DEFAULT_CONTEXT_LENS), help="decode context (grid axis)")
    p.add_argument("--prefill-tokens", default=_csv(DEFAULT_PREFILL_TOKENS), help="prefill chunk (grid axis)")
    p.add_argument("--reps", type=int, default=5, help="timed runs per point (the median is kept)")
    p.add_argument("--calibration-prompts", type=int, default=96,
                   help="requests of the real calibration workload timed beside the grid (0: none)")
    p.add_argument("--recalibrate", default=None, metavar="JSON",
                   help="keep this profile's grid; run its calibration workload again and replace "
                        "its correction (the host now)")
    p.add_argument("--output", required=True, metavar="JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_profile)


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from e


def _profile_engine_config(args: argparse.Namespace, num_blocks: int) -> EngineConfig:
    """The engine `profile` times: the flags' model, dtype and threads, a pool of num_blocks."""
    cache = CacheConfig(block_size=args.block_size, num_blocks=num_blocks)
    return EngineConfig(model=args.model, dtype=args.dtype, threads=args.threads, cache=cache)


def cmd_profile(args: argparse.Namespace) -> int:
    if args.recalibrate:
        old = ProfileModel.load(args.recalibrate, "--recalibrate").profile
        config = _profile_engine_config(args, CALIBRATION_KV_TOKENS // args.block_size)
        profile = recalibrate(config, old, progress=not args.no_progress)
        Path(args.output).write_text(json.dumps(profile, indent=1))
        knots = profile["correction"]
        print("correction of the grid: " + ", ".join(f"x{k:.3f} for {t * 1000:.0f} ms steps"
                                                      for t, k in zip(knots["step_s"], knots["scale"]))
              + f" -> {args.output}")
        return 0
    grid = ProfileGrid(_ints(args.batch_sizes, "--batch-sizes"), _ints(args.context_lens, "--context-lens"),
                       _ints(args.prefill_tokens, "--prefill-tokens"))
    config = _profile_engine_config(args, grid.max_blocks(args.block_size))
    profile = measure_profile(config, grid, args.reps, args.calibration_prompts, progress=not args.no_progress)
    Path(args.output).write_text(json.dumps(profile, indent=1))
    times = profile["step_time_s"]
    print(f"profile of {profile['model']} on {profile['host']['cpu']} ({args.threads or 'all'} threads) "
          f"-> {args.output}")
    if "calibration" in profile:
        cal = profile["calibration"]
        print(f"  calibration workload, {CALIBRATION_RUNS} runs: {cal['steps']} steps, real / grid "
              f"{', '.join(f'{r:.3f}' for r in cal['ratios'])} (median {cal['ratio']:.3f})")
    for i, b in enumerate(grid.batch_sizes):
        row = "  ".join(f"{times[i][0][k] * 1000:8.1f}" for k in range(len(grid.prefill_tokens)))
        print(f"  decodes {b:>4} @ ctx {grid.context_lens[0]}, prefill {list(grid.prefill_tokens)}: {row} ms")
    return 0


class Setup:
    """Everything a simulation needs besides the controller: cost model, capacity, workload."""

    def __init__(self, args: argparse.Namespace):
        kv_gib = getattr(args, "kv_cache_gib", None)
        if kv_gib is not None and kv_gib <= 0:
            raise ValueError(f"--kv-cache-gib must be positive, got {kv_gib}")
        self.cost: RooflineModel | ProfileModel
        if getattr(args, "profile", None):
            if kv_gib is None:
                raise ValueError("--profile needs --kv-cache-gib (the pool size of the engine to model)")
            self.cost = ProfileModel.load(args.profile)
            self.capacity = self.cost.kv_capacity_tokens(kv_gib)
            self.max_model_len = self.cost.max_model_len
        else:
            model, hw = ModelShape.preset(args.model), Hardware.preset(args.hardware)
            self.cost = RooflineModel(model, hw, args.tp, args.mem_util)
            self.capacity = self.cost.kv_capacity_tokens(kv_gib)
            self.max_model_len = model.max_context
        self.args = args
        self._trace: list | None = None
        self._tokenizer = None
        self.sla = SLA.parse(args.sla) if getattr(args, "sla", None) else None
        self.input_dist = LengthDist.parse(args.input_dist, "--input-dist")
        self.output_dist = LengthDist.parse(args.output_dist, "--output-dist")
        if args.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")

    def workload(self, rate: float | None, n: int | None = None) -> list[SimRequest]:
        a = self.args
        if a.dataset:
            return self._traced(rate, n)
        rate = float("inf") if rate is None else rate
        return make_workload(n or a.num_prompts, rate, self.input_dist, self.output_dist, a.seed, a.burstiness,
                             SHAREGPT_LIKE["max_prompt"], min(SHAREGPT_LIKE["max_total"], self.max_model_len))

    def _traced(self, rate: float | None, n: int | None) -> list[SimRequest]:
        """The trace window as simulated requests (outputs forced to the traced lengths): at its own
        times, all at once (rate inf), or rescaled to a mean `rate`."""
        a = self.args
        if self._trace is None:
            self._trace = trace_requests(a.dataset, a, encode=self.encode)
        chosen = self._trace[: n or a.num_prompts]
        untimed = all(r.arrival_s == 0 for r in chosen)  # ShareGPT: no times, so the gamma process at `rate`
        times = arrival_offsets([None if untimed else r.arrival_s for r in chosen], rate, a.burstiness, a.seed)
        return [SimRequest(t, r.prompt_len, r.output_len) for t, r in zip(times, chosen)]

    def encode(self, text: str) -> list[int]:
        """The tokenizer's count of a ShareGPT turn, loaded on first use (only ShareGPT needs it)."""
        if self._tokenizer is None:
            from batchpilot.model.loader import load_tokenizer

            self._tokenizer = load_tokenizer(getattr(self.args, "tokenizer", None))
        return self._tokenizer.encode(text)

    def run(self, controller: ControllerConfig, rate: float | None, n: int | None = None, trace: str | None = None
            ) -> dict[str, Any]:
        sched = SchedulerConfig(max_num_batched_tokens=self.args.max_num_batched_tokens)
        a = self.args
        replicas, routing = getattr(a, "replicas", 1), getattr(a, "routing", "load-aware")
        res = simulate(self.workload(rate, n), self.cost.step_time, self.capacity, controller, sched,
                       self.max_model_len, a.block_size, trace, replicas, routing, a.seed)
        out = summarize(res.records, res.duration_s, self.sla)
        out.update(num_preemptions=res.num_preemptions, num_steps=res.num_steps, rejected=res.rejected,
                   request_rate=rate, kv_capacity_tokens=self.capacity)
        if replicas > 1:
            out.update(replicas=replicas, routing=routing, requests_per_replica=res.requests_per_replica)
        return out

    def capacity_search(self, controller: ControllerConfig, target: float, start: float) -> dict[str, Any]:
        if self.sla is None:
            raise ValueError("capacity needs --sla")

        def probe(rate: float) -> float:
            # two simulated minutes of arrivals, capped so a runaway bracket stays cheap
            n = min(max(self.args.num_prompts, int(rate * 120)), 20_000)
            return self.run(controller, rate, n)["sla_attainment"]

        found = search_capacity(probe, target, start, tolerance=0.05, max_probes=12)
        # the shape bench capacity and bench compare write (and plots.plot_capacity reads)
        return {"capacity": found.capacity, "capacity_bounded": found.bounded,
                "capacity_curve": [{"rate": r, "sla_attainment": a} for r, a in found.curve]}


def cmd_simulate(args: argparse.Namespace, controller: ControllerConfig) -> int:
    setup = Setup(args)
    start = time.perf_counter()
    result = setup.run(controller, args.request_rate, trace=controller.trace_path)
    result["wall_s"] = time.perf_counter() - start
    if args.profile:
        result |= {"profile": args.profile, "controller": controller.name}
    else:
        result |= {"hardware": args.hardware, "model": args.model, "tp": args.tp, "controller": controller.name}
    _print(result)
    if args.output_json:
        write_json(args.output_json, result)
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
        print(f"{name:>12}: {json.dumps({k: v for k, v in row.items() if k != 'capacity_curve'})}", flush=True)
    from batchpilot.bench.results import markdown_table

    print(markdown_table(results, baseline=next(iter(results))))
    if args.output_json:
        write_json(args.output_json, results)
    if args.plot:
        from batchpilot.bench.plots import plot_sweep

        plot_sweep(results, args.plot)
    return 0


def _print(result: dict[str, Any]) -> None:
    for key in ("profile", "hardware", "model", "tp", "controller", "kv_capacity_tokens", "completed", "duration",
                "output_throughput", "request_throughput", "mean_ttft_ms", "p90_ttft_ms", "mean_tpot_ms",
                "p90_tpot_ms", "num_preemptions", "sla_attainment", "request_goodput", "replicas", "routing",
                "requests_per_replica", "wall_s"):
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
        write_json(args.output_json, out)
    return 0


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"
