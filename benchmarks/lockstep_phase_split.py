"""A shift workload's phases, each run alone on the real engine in lockstep: does its best static
limit move from one phase to the next here, as the simulator says (benchmarks/sim_phase_split.py)?

    python benchmarks/lockstep_phase_split.py --workload output-shift --scale 200 --static 8,16,32,64 \\
        --policies combined-cost,sglang

Each phase is given as lockstep_tournament.py gives the whole workload (its flags: all at once,
forced lengths, the same pool), with the phase's requests in place of the workload's; output tok/s,
P90 TPOT and preemptions per contender. Minutes per phase: nothing else should run on the machine
meanwhile.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lockstep_tournament import contenders, run_lockstep  # noqa: E402
from real_tournament import POLICIES, forced_lengths_trace, workloads  # noqa: E402

from batchpilot.sim.tournament import shift_phases  # noqa: E402

WORKLOADS = ("output-shift", "phase-shift")  # the shifts the real tournament draws at `scale` (documents: 2x)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="output-shift", choices=WORKLOADS)
    p.add_argument("--scale", type=int, default=200, help="the whole workload's scale, as lockstep_tournament's")
    p.add_argument("--phases", default="short,long", help="comma list of the phases to run: short, long, "
                                                          "short again")
    p.add_argument("--static", default="8,16,32,64")
    p.add_argument("--policies", default="combined-cost,sglang", help=f"comma list of {', '.join(POLICIES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    phases = shift_phases(args.workload, args.scale)
    wanted = args.phases.split(",")
    if unknown := [w for w in wanted if w not in phases]:
        p.error(f"--phases: unknown {', '.join(unknown)} (phases: {', '.join(phases)})")
    configs = contenders([int(n) for n in args.static.split(",")], [s for s in args.policies.split(",") if s])
    with tempfile.TemporaryDirectory() as tmp:
        flags = workloads(Path(tmp), args.scale)[args.workload]
        at = flags.index("--dataset") + 1
        for label in wanted:
            path = forced_lengths_trace(Path(tmp) / "phase.jsonl", phases[label])
            rows = run_lockstep([*flags[:at], str(path), *flags[at + 1:]], configs, args.threads, args.seed)
            for name, r in rows.items():
                print(f"{label:<12} {name:<16} {r['output_throughput']:7.1f} tok/s  p90 TPOT {r['p90_tpot_ms']:6.1f} ms"
                      f"  preempt {r['num_preemptions']:3d}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
