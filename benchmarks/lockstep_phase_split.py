"""A shift workload's phases, each run alone on the real engine in lockstep: does its best static
limit move from one phase to the next here, as the simulator says (benchmarks/sim_phase_split.py)?

    python benchmarks/lockstep_phase_split.py --workload output-shift --scale 200 --static 8,16,32,64 \\
        --policies combined-cost,sglang

Each phase is given all at once (forced lengths, as the whole workload in lockstep_tournament.py),
on the pool lockstep_tournament.py gives both shifts (0.1 GiB); output tok/s, P90 TPOT and preemptions
per contender. Minutes per phase: nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lockstep_tournament import contenders, run_lockstep  # noqa: E402
from real_tournament import POLICIES, forced_lengths_trace  # noqa: E402

from batchpilot.sim.tournament import shift_phases  # noqa: E402

WORKLOADS = ("output-shift", "phase-shift")  # the shifts the real tournament runs on a 0.1 GiB pool, at `scale`


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
        for label in wanted:
            path = forced_lengths_trace(Path(tmp) / "phase.jsonl", phases[label])
            rows = run_lockstep(["--dataset-name", "trace", "--dataset", str(path), "--num-prompts",
                                 str(len(phases[label])), "--request-rate", "inf", "--kv-cache-gib", "0.1"],
                                configs, args.threads, args.seed)
            for name, r in rows.items():
                print(f"{label:<12} {name:<16} {r['output_throughput']:7.1f} tok/s  p90 TPOT {r['p90_tpot_ms']:6.1f} ms"
                      f"  preempt {r['num_preemptions']:3d}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
