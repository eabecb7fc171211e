"""A phase shift whose best static limit does change: chat, then long-context documents, then chat.

The tournament's phase-shift workload changes output lengths only, and its best static limit is
the same in every phase (benchmarks/sim_phase_split.py). A TPOT SLA can make the limit move:
each decoding row costs its context's KV read, so the batch that keeps TPOT inside the SLA
shrinks when contexts are long. Each phase has its own arrival rate (chat arrives fast, documents
slowly), given as `prompt,output,requests,rate` with uniform lengths `lo:hi`; the capacity search
scales all times together, as for a trace, and pools the attainment of `--arrival-seeds` draws of
the whole workload (one draw's bursts move a capacity by several percent). The script reports the
capacity of every static limit and of the contenders on each phase alone and on the whole run.

`--balance`: the whole run's phases arrive at rates proportional to each phase's capacity under its own
best static limit, so both kinds of traffic load the server alike (a server kept at one utilisation
while its mix shifts). Without it the phases keep their nominal rates, and whichever phase is loaded
more decides the whole run alone.

    python benchmarks/sim_context_shift.py --hardware H100-80GB --model Llama-3-8B \\
        --sla ttft:5000,tpot:50 --static 48,64,80,96,112,128,160,192,256

Other flags are `batchpilot simulate tournament`'s (cost model, pool, SLA, target).
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

from batchpilot.bench.datasets import LengthDist
from batchpilot.cli import build_parser
from batchpilot.config import ControllerConfig
from batchpilot.sim.commands import Setup
from batchpilot.sim.driver import SimRequest, make_workload
from batchpilot.sim.tournament import Runner, configurations

PHASES = ("100:400,16:64,1200,115", "1500:3000,100:300,600,5", "100:400,16:64,1200,115")
CONTENDERS = ("combined-cost", "combined-blocks", "sglang")


def phase(spec: str, seed: int) -> list[SimRequest]:
    """One phase's requests with arrival offsets from its start."""
    prompt, output, n, rate = spec.split(",")
    return make_workload(int(n), float(rate), LengthDist.parse(f"uniform:{prompt}", "input"),
                         LengthDist.parse(f"uniform:{output}", "output"), seed)


def workload(seed: int, documents_stretch: float = 1.0
             ) -> tuple[list[SimRequest], list[SimRequest], list[SimRequest]]:
    """The first chat phase, the documents, and the whole run, each phase drawn with seed + its index;
    in the whole run the documents' arrival offsets are multiplied by `documents_stretch`."""
    phases = [phase(spec, seed + 10 + k) for k, spec in enumerate(PHASES)]
    whole: list[SimRequest] = []
    for k, reqs in enumerate(phases):  # each phase starts when the previous one's last request has arrived
        start = whole[-1].arrival_s if whole else 0.0
        factor = documents_stretch if k == 1 else 1.0
        whole += [replace(r, arrival_s=start + factor * r.arrival_s) for r in reqs]
    return phases[0], phases[1], whole


def main(argv: list[str]) -> int:
    balance = "--balance" in argv
    args = build_parser().parse_args(["simulate", "tournament", *(a for a in argv if a != "--balance")])
    setup = Setup(args)
    if setup.sla is None:
        raise SystemExit("--sla is required: capacity is measured at an SLA")
    runner = Runner(setup.cost, args.block_size, setup.max_model_len, setup.sla, args.max_num_batched_tokens,
                    args.capacity_tolerance, args.arrival_seeds)
    # draw d of the workload: each phase drawn with its own seed (draw 0 is the one of earlier notes)
    draws = [workload(100 * d) for d in range(args.arrival_seeds)]
    statics = tuple(int(n) for n in args.static.split(","))
    configs = configurations(statics, ControllerConfig(), setup.sla.tpot_ms)
    names = [f"static-{n}" for n in statics] + list(CONTENDERS)
    print(f"pool {setup.capacity} tokens; capacity (req/s) at {args.sla} for {args.target:.0%} of requests, "
          f"pooled over {len(draws)} draws")
    best_of_phase: list[float] = []  # per phase alone: its best static limit's capacity, and its nominal rate
    nominal_of_phase: list[float] = []
    for part, label in enumerate(("chat", "documents", "whole run")):
        if part == 2 and balance:  # each phase at a rate proportional to its best static limit's capacity
            stretch = nominal_of_phase[1] / best_of_phase[1] * best_of_phase[0] / nominal_of_phase[0]
            draws = [workload(100 * d, stretch) for d in range(args.arrival_seeds)]
            label = f"whole run, balanced (documents' offsets x{stretch:.3g})"
        reqs, *more = [d[part] for d in draws]
        nominal = len(reqs) / reqs[-1].arrival_s
        nominal_of_phase.append(nominal)
        started = time.perf_counter()
        found = {n: runner.capacity(reqs, setup.capacity, configs[n], True, nominal, args.target, more)
                 for n in names}
        best = max((n for n in names if n.startswith("static-")), key=lambda n: found[n] or float("inf"))
        best_of_phase.append(found[best] or float("inf"))
        cells = ", ".join(f"{n.removeprefix('static-')} {'unbounded' if c is None else f'{c:.3g}'}"
                          for n, c in found.items())
        print(f"{label} (nominal {nominal:.2f}/s, {time.perf_counter() - started:.0f} s): {cells}")
        if found[best] is not None and found["combined-cost"] is not None:
            print(f"  best static {best}; combined-cost against it {found['combined-cost'] / found[best] - 1:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
