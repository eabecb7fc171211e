"""The phase-shift workload split into its phases, each run alone in the simulator: does its best
static limit change from one phase to the next? (If it does not, no controller can beat every
static limit on the whole run by adapting.)

    python benchmarks/sim_phase_split.py --hardware H100-80GB --model Llama-3-8B --scale 500
    python benchmarks/sim_phase_split.py --profile docs/results/profile_cpu_xeon.json --kv-cache-gib 1 \\
        --max-num-batched-tokens 512 --scale 200

Arguments are `batchpilot simulate tournament`'s (cost model, pool, scale). Offline (all requests at
once), output tok/s and preemptions per policy, for the short phase, the long phase and the whole run;
the pool is the tournament's for the whole workload.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from batchpilot.cli import build_parser
from batchpilot.config import ControllerConfig
from batchpilot.sim.commands import Setup
from batchpilot.sim.tournament import Runner, builtin_workloads, configurations, phase_shift_phases

POLICIES = ("static-4", "static-8", "static-16", "static-32", "static-64", "static-256", "combined-cost",
            "combined-blocks", "sglang")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(["simulate", "tournament", *argv])
    setup = Setup(args)
    runner = Runner(setup.cost, args.block_size, setup.max_model_len, None, args.max_num_batched_tokens)
    short, long, short_again = phase_shift_phases(args.scale, 6)  # the tournament's phase-shift workload
    whole = short + long + short_again
    kv_requests = next(w.kv_requests for w in builtin_workloads() if w.name == "phase-shift")
    pool = runner.capacity_tokens(whole, kv_requests)
    configs = configurations((4, 8, 16, 32, 64, 256), ControllerConfig())
    print(f"pool {pool} tokens; output tok/s (preemptions)")
    for label, reqs in (("short", short), ("long", long), ("whole run", whole)):
        offline = [replace(r, arrival_s=0.0) for r in reqs]
        runs = {name: runner.run(offline, pool, configs[name]) for name in POLICIES}
        print(f"{label:>10}: " + ", ".join(f"{name} {r['output_throughput']:.0f} ({r['num_preemptions']})"
                                          for name, r in runs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
