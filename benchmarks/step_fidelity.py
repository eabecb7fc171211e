"""Where does the profile's step time differ from the real engine's? One run, step by step.

Runs one of benchmarks/sim_fidelity.py's workloads through `bench throughput` (the same
arguments as its real runs) in this process, records every step's shape, the runner's time
and the whole step's time (scheduler, runner, output processing), and sets them beside the
profile's prediction for the same shape, grouped by decode batch, mean decode context and
prefill tokens. The profile's correction is measured again right before the run (`profile
--recalibrate`), so both see the host in the same minutes. The profile must be of this CPU.

    python benchmarks/step_fidelity.py --profile docs/results/profile_cpu_xeon.json \
        --workload offline-uniform --controller combined --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import batchpilot.cli
import batchpilot.llm
from batchpilot.executors.simulated import StepShape
from batchpilot.sim.measure import TimedRunner
from batchpilot.sim.profile import NO_CORRECTION, ProfileModel

sys.path.insert(0, str(Path(__file__).parent))
from sim_fidelity import CONTROLLERS, WORKLOADS, bench_args, recalibrated  # noqa: E402

DECODE_BINS = (0, 1, 8, 24, 48, 96, 10**9)
CONTEXT_BINS = (0, 128, 256, 512, 10**9)


def timed_engine(runners: list[TimedRunner], step_times: list[float]):
    """build_engine, with the engine's runner wrapped in a TimedRunner (appended to `runners`)
    and each whole step's time appended to `step_times`."""
    build = batchpilot.llm.build_engine

    def build_timed(config):
        engine = build(config)
        engine_step = engine.step

        def step():
            t0 = time.perf_counter()
            out = engine_step()
            step_times.append(time.perf_counter() - t0)
            return out

        runners.append(TimedRunner(engine.executor))
        engine.executor, engine.step = runners[-1], step
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
    model = ProfileModel.load(args.profile) if args.no_recalibrate else recalibrated(args.profile, args.threads, 0)
    profile = model.profile
    grid = ProfileModel({**profile, "correction": NO_CORRECTION})

    runners: list[TimedRunner] = []
    step_times: list[float] = []
    batchpilot.llm.build_engine = timed_engine(runners, step_times)
    if batchpilot.cli.main(bench_args(w, controller, args.threads, args.seed)):
        return 1

    groups: dict[tuple[str, str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0])
    for (shape, runner_s), step_s in zip(runners[0].steps, step_times, strict=True):
        g = groups[key(shape)]
        g[0] += 1
        g[1] += runner_s
        g[2] += step_s
        g[3] += grid.step_time(shape)
        g[4] += model.step_time(shape)
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
