"""Where does the profile's step time differ from the real engine's? One run, step by step.

Runs one of benchmarks/sim_fidelity.py's workloads through `bench throughput` in this
process, records every step's shape, the runner's time and the whole step's time
(scheduler, runner, output processing), and sets them beside the profile's prediction for
the same shape, grouped by decode batch, mean decode context and prefill tokens. The
profile's correction is measured again right before the run (`--recalibrate`), so both
see the host in the same minutes.

    python benchmarks/step_fidelity.py --profile docs/results/profile_cpu.json \
        --workload offline-uniform --controller combined --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import batchpilot.llm
from batchpilot.bench.throughput import run_throughput
from batchpilot.config import CacheConfig, EngineConfig, SchedulerConfig
from batchpilot.executors.simulated import step_shape
from batchpilot.sim.profile import CALIBRATION_KV_TOKENS, NO_CORRECTION, ProfileModel, recalibrate
from batchpilot.sim.roofline import StepShape

sys.path.insert(0, str(Path(__file__).parent))
from sim_fidelity import BUDGET, CONTROLLERS, WORKLOADS  # noqa: E402

DECODE_BINS = (0, 1, 8, 24, 48, 96, 10**9)
CONTEXT_BINS = (0, 128, 256, 512, 10**9)


def timed_engine(steps: list[dict]):
    """build_engine, with every step's shape, runner time and whole-step time appended to `steps`."""
    build = batchpilot.llm.build_engine

    def build_timed(config):
        engine = build(config)
        runner, engine_step = engine.executor, engine.step

        class TimedRunner:
            def execute(self, sched):
                t0 = time.perf_counter()
                out = runner.execute(sched)
                steps.append({"shape": step_shape(sched), "runner_s": time.perf_counter() - t0})
                return out

        def step():
            t0 = time.perf_counter()
            out = engine_step()
            steps[-1]["step_s"] = time.perf_counter() - t0
            return out

        engine.executor, engine.step = TimedRunner(), step
        return engine

    return build_timed


def bin_of(edges: tuple[int, ...], x: float) -> str:
    i = next(k for k in range(len(edges) - 1) if x < edges[k + 1])
    return f"{edges[i]}-{edges[i + 1] - 1}" if edges[i + 1] < 10**9 else f"{edges[i]}+"


def key(shape: StepShape) -> tuple[str, str, str]:
    prefill = sum(n for n, _ in shape.prefills)
    context = shape.decode_context / shape.num_decodes if shape.num_decodes else 0
    return (bin_of(DECODE_BINS, shape.num_decodes), bin_of(CONTEXT_BINS, context) if shape.num_decodes else "-",
            "0" if not prefill else ("<256" if prefill < 256 else "256+"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--workload", default="offline-uniform", choices=list(WORKLOADS))
    ap.add_argument("--controller", default="combined", choices=list(CONTROLLERS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-recalibrate", action="store_true", help="use the profile's correction as saved")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    w, controller = WORKLOADS[args.workload], CONTROLLERS[args.controller]
    profile = ProfileModel.load(args.profile).profile
    if not args.no_recalibrate:
        config = EngineConfig(dtype=profile["dtype"], threads=args.threads,
                              cache=CacheConfig(num_blocks=CALIBRATION_KV_TOKENS // 16))
        profile = recalibrate(config, profile, progress=False)
    model, grid = ProfileModel(profile), ProfileModel({**profile, "correction": NO_CORRECTION})

    steps: list[dict] = []
    batchpilot.llm.build_engine = timed_engine(steps)
    config = EngineConfig(dtype=profile["dtype"], threads=args.threads, seed=args.seed,
                          cache=CacheConfig(kv_cache_gib=w["kv_cache_gib"]),
                          scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET), controller=controller)
    bench_args = argparse.Namespace(
        num_prompts=w["num_prompts"], input_len=None, output_len=None, input_dist=w["input_dist"],
        output_dist=w["output_dist"], dataset_name="random", dataset=None, request_rate=w["rate"], burstiness=1.0,
        ignore_eos=True, output_json=None, no_progress=True, seed=args.seed, batch_controller=controller.name,
        max_num_seqs=controller.max_num_seqs, dtype=profile["dtype"], threads=args.threads)
    run_throughput(bench_args, config)

    groups: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])
    for s in steps:
        g = groups[key(s["shape"])]
        g[0] += 1
        g[1] += s["runner_s"]
        g[2] += s["step_s"]
        g[3] += grid.step_time(s["shape"])
        g[4] += model.step_time(s["shape"])
    total = [sum(g[i] for g in groups.values()) for i in range(5)]
    print(f"correction now: {profile['correction']}")
    print("| decodes | context | prefill | steps | real step ms | runner / grid | step / grid | step / model |")
    print("|---|---|---|---|---|---|---|---|")
    for k in sorted(groups, key=lambda k: (DECODE_BINS.index(int(k[0].split('-')[0].rstrip('+'))), k[1], k[2])):
        n, runner, step, g, m = groups[k]
        print(f"| {' | '.join(k)} | {n} | {step / n * 1000:.1f} | {runner / g:.3f} | {step / g:.3f} | {step / m:.3f} |")
    n, runner, step, g, m = total
    print(f"| all | | | {n} | {step / n * 1000:.1f} | {runner / g:.3f} | {step / g:.3f} | {step / m:.3f} |")
    print(f"outside the runner: {(step - runner) / step:.1%} of step time")
    if args.output_json:
        rows = [{"key": list(k), "steps": v[0], "runner_s": v[1], "step_s": v[2], "grid_s": v[3], "model_s": v[4]}
                for k, v in groups.items()]
        Path(args.output_json).write_text(json.dumps({"correction": profile["correction"], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
