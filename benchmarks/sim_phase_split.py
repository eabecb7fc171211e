"""A shift workload (phase-shift, output-shift, document-shift) split into its phases, each run
alone in the simulator: does its best static limit change from one phase to the next? (If it does
not, no controller can beat every static limit on the whole run by adapting.)

    python benchmarks/sim_phase_split.py --hardware H100-80GB --model Llama-3-8B --scale 500
    python benchmarks/sim_phase_split.py --workload output-shift --profile docs/results/profile_cpu_zen4.json \\
        --kv-cache-gib 1 --max-num-batched-tokens 512 --scale 200
    python benchmarks/sim_phase_split.py --profile docs/results/profile_cpu_xeon.json --kv-cache-gib 1 \\
        --max-num-batched-tokens 512 --scale 200

Arguments are `batchpilot simulate tournament`'s (cost model, pool, scale). Offline (all requests at
once), output tok/s and preemptions per policy, for each phase and the whole run; the pool is the
tournament's for the whole workload.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from batchpilot.cli import build_parser
from batchpilot.config import ControllerConfig
from batchpilot.sim.commands import Setup
from batchpilot.sim.tournament import SHIFTS, Runner, builtin_workloads, configurations, shift_phases

STATICS = (4, 8, 12, 16, 24, 32, 48, 64, 256)
POLICIES = (*(f"static-{n}" for n in STATICS), "combined-cost", "combined-peak", "combined-blocks", "sglang")


def main(argv: list[str]) -> int:
    workload = "phase-shift"
    if "--workload" in argv:
        at = argv.index("--workload")
        workload, argv = argv[at + 1], argv[:at] + argv[at + 2:]
    if workload not in SHIFTS:
        print(f"error: --workload must be one of {', '.join(SHIFTS)}, got {workload!r}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(["simulate", "tournament", *argv])
    setup = Setup(args)
    runner = Runner(setup.cost, args.block_size, setup.max_model_len, None, args.max_num_batched_tokens)
    phases = shift_phases(workload, args.scale)
    whole = [r for phase in phases.values() for r in phase]
    kv_requests = next(w.kv_requests for w in builtin_workloads() if w.name == workload)
    pool = runner.capacity_tokens(whole, kv_requests)
    configs = configurations(STATICS, ControllerConfig())
    print(f"{workload}: pool {pool} tokens; output tok/s (preemptions)")
    for label, reqs in (*phases.items(), ("whole run", whole)):
        offline = [replace(r, arrival_s=0.0) for r in reqs]
        runs = {name: runner.run(offline, pool, configs[name]) for name in POLICIES}
        best = max((name for name in runs if name.startswith("static-")), key=lambda n: runs[n]["output_throughput"])
        print(f"{label:>11}: " + ", ".join(f"{name} {r['output_throughput']:.0f} ({r['num_preemptions']})"
                                           for name, r in runs.items()))
        print(f"{'':>11}  best static {best}; combined-cost "
              f"{runs['combined-cost']['output_throughput'] / runs[best]['output_throughput'] - 1:+.1%}, sglang "
              f"{runs['sglang']['output_throughput'] / runs[best]['output_throughput'] - 1:+.1%} against it")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
