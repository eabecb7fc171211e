"""The policy tournament on the real engine, every contender in lockstep inside one process.

    python benchmarks/lockstep_tournament.py --threads 2 --output-json docs/results/lockstep.json

`real_tournament.py` runs each (workload, policy) as its own `bench throughput` process, one after
the other; on a shared 2-core cloud host the machine's speed drifts by 10-30% within minutes, more
than most regrets, and runs of one configuration minutes apart differ as much. Here every
contender of a workload is an engine of its own (its own KV pool, scheduler and controller; the
model's weights shared) in one process, all given the same requests at t=0, and the engines take one step
each in turn (in a random order every cycle). Each engine's clock is the sum of its own step times,
so a slow minute of the host slows every contender alike, a few tens of milliseconds apart.
Throughput is output tokens over that clock; TTFT and TPOT are read on it too. Requests that
arrive over time (a trace's times, or a Poisson rate) are given to each engine when its own clock
passes their arrival (an idle engine's clock jumps to the next); those workloads are scored by
goodput, the requests per second that met the workload's SLA (real_tournament.TIMED), since every
policy serves them all.

What it does not remove: steps of one engine run with the caches the previous engine left (the
same for all), and outputs sampled by the model can differ between engines where batch shapes
change the numerics (the real-text workload). Workloads and policies are real_tournament.py's.

Capacity at the SLA (`--rates 3,4,5,6,7`, Poisson workloads): every contender runs in lockstep at each
rate of the grid, and each one's capacity is read off its own attainment curve (the rate where it first
falls below `--target`, interpolated between grid points: bench.capacity.capacity_on_grid); regret on it
against the best static limit.

    python benchmarks/lockstep_tournament.py --workloads uniform-poisson --rates 3,4,5,6,7

How much a controller that adapts could win on a shift (`--phase-schedule 32,8,32`, shift workloads): one more
contender, a hindsight schedule of static limits, each phase's own limit while the next request to admit is one
of that phase's (a diagnostic that knows the workload's phases, not a policy a server could run).
"""

from __future__ import annotations

import argparse
import bisect
import gc
import itertools
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from real_tournament import POLICIES, TIMED, workloads  # noqa: E402

from batchpilot.bench.capacity import capacity_on_grid  # noqa: E402
from batchpilot.bench.metrics import SLA, RequestRecord, summarize  # noqa: E402
from batchpilot.bench.results import write_json  # noqa: E402
from batchpilot.bench.serve import arrival_offsets  # noqa: E402
from batchpilot.bench.workload import workload_requests  # noqa: E402
from batchpilot.cli import build_parser, engine_config  # noqa: E402
from batchpilot.controllers.base import SchedulerView, StepStats  # noqa: E402
from batchpilot.llm import build_engine  # noqa: E402
from batchpilot.sampling_params import SamplingParams  # noqa: E402
from batchpilot.sim.tournament import SHIFTS, hindsight_regret, shift_phases, sla_targets  # noqa: E402


class PhaseSchedule:
    """Static limits switched at a shift's phase boundaries: `limits[i]` while the next request to admit is one of
    phase i's `sizes[i]` (queue order; every request queued at t=0, so those admitted are the ones not waiting)."""

    name = "phase-schedule"
    trace: dict[str, float] = {}

    def __init__(self, sizes: list[int], limits: list[int]):
        self.ends = list(itertools.accumulate(sizes))
        self.limits = limits

    def limit(self, view: SchedulerView) -> int:
        admitted = self.ends[-1] - view.num_waiting
        return self.limits[min(bisect.bisect_right(self.ends, admitted), len(self.limits) - 1)]

    def observe(self, stats: StepStats) -> None:
        pass


def contenders(statics: list[int], policies: list[str]) -> dict[str, list[str]]:
    """Names -> flags; a name given twice runs twice, the second as NAME#2 (an A/A check of the method)."""
    flags: dict[str, list[str]] = {}
    for name, f in [(f"static-{n}", ["--batch-controller", "static", "--max-num-seqs", str(n)]) for n in statics] + [
            (name, POLICIES[name]) for name in policies]:
        k = 2
        while name in flags:
            name, k = f"{name.split('#')[0]}#{k}", k + 1
        flags[name] = f
    return flags


def told_the_sla(configs: dict[str, list[str]], sla: SLA | None) -> dict[str, list[str]]:
    """Each contender's flags with the SLA targets sim.tournament.sla_targets gives its controller."""
    if sla is None:
        return configs
    told = {}
    for name, flags in configs.items():
        tpot, ttft = sla_targets(flags[flags.index("--batch-controller") + 1], sla.tpot_ms, sla.ttft_ms)
        told[name] = [*flags, *(["--sla-tpot-ms", str(tpot)] if tpot else []),
                      *(["--sla-ttft-ms", str(ttft)] if ttft else [])]
    return told


def run_lockstep(workload_flags: list[str], configs: dict[str, list[str]], threads: int, seed: int,
                 sla: SLA | None = None, schedules: dict[str, PhaseSchedule] | None = None) -> dict[str, dict]:
    parser = build_parser()
    base = ["bench", "throughput", *workload_flags, "--threads", str(threads), "--seed", str(seed)]
    args = {name: parser.parse_args([*base, *flags]) for name, flags in told_the_sla(configs, sla).items()}
    engines: dict = {}
    for name, a in args.items():  # one model, shared: every engine reads the same weights at the same addresses
        engines[name] = build_engine(engine_config(a), next(iter(engines.values())).executor.model if engines else None)
    clock = dict.fromkeys(engines, 0.0)
    step_start: dict[str, float | None] = dict.fromkeys(engines)
    for name, engine in engines.items():
        # each engine's own clock (the sum of its steps), also for the arrival stamps from which its scheduler
        # tells the SLA loop how long the next request in line has waited; real time inside a step, so that
        # the engine times its steps as ever
        def own_clock(name: str = name) -> float:
            start = step_start[name]
            return clock[name] + (0.0 if start is None else time.perf_counter() - start)
        engine.clock = engine.scheduler.clock = own_clock
        if name in (schedules or {}):
            engine.scheduler.controller = schedules[name]
        engine.start_time = 0.0
    first = next(iter(args.values()))
    requests, ignore_eos = workload_requests(first, next(iter(engines.values())).tokenizer, first.num_prompts, seed)
    arrivals = arrival_offsets([r.arrival_s for r in requests], first.request_rate, first.burstiness, seed)
    order = sorted(range(len(requests)), key=lambda i: arrivals[i])
    pending = dict.fromkeys(engines, 0)  # per engine: how many of `order` it has been given
    arrival_of: dict[str, dict[str, tuple[int, float]]] = {name: {} for name in engines}

    def admit(name: str) -> None:
        """Give the engine every request that has arrived by its own clock (an idle engine waits for the next)."""
        engine = engines[name]
        if not engine.has_unfinished_requests() and pending[name] < len(order):
            clock[name] = max(clock[name], arrivals[order[pending[name]]])
        while pending[name] < len(order) and arrivals[order[pending[name]]] <= clock[name]:
            i = order[pending[name]]
            r = requests[i]
            params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=r.max_tokens, ignore_eos=ignore_eos,
                                    seed=seed + i)
            arrival_of[name][engine.add_request(r.prompt, params)] = (r.prompt_len, arrivals[i])
            pending[name] += 1

    first_token: dict[str, dict[str, float]] = {name: {} for name in engines}
    produced: dict[str, dict[str, int]] = {name: {} for name in engines}
    records: dict[str, list[RequestRecord]] = {name: [] for name in engines}
    active, cycle = list(engines), 0
    rng = random.Random(seed)  # a fresh order every cycle: no engine always runs after the same one
    gc.collect()
    gc.disable()  # collected between cycles, off every engine's clock, rather than inside whichever step it hits
    while active:
        if cycle % 64 == 63:
            gc.collect()
        for name in rng.sample(active, len(active)):
            admit(name)
            start = step_start[name] = time.perf_counter()
            outputs = engines[name].step()
            clock[name] += time.perf_counter() - start
            step_start[name] = None
            now = clock[name]
            for o in outputs:
                rid = o.request_id
                produced[name][rid] = produced[name].get(rid, 0) + len(o.outputs[0].token_ids)
                first_token[name].setdefault(rid, now)
                if o.finished:
                    prompt_len, arrived = arrival_of[name][rid]
                    records[name].append(RequestRecord(prompt_len, produced[name][rid],
                                                       first_token[name][rid] - arrived, now - arrived,
                                                       start_s=arrived))
        cycle += 1
        active = [name for name in active
                  if engines[name].has_unfinished_requests() or pending[name] < len(order)]
    gc.enable()
    rows = {}
    for name, engine in engines.items():
        summary = summarize(records[name], clock[name], sla)
        rows[name] = {"output_throughput": summary["output_throughput"], "p90_tpot_ms": summary["p90_tpot_ms"],
                      "p90_ttft_ms": summary["p90_ttft_ms"], "num_preemptions": engine.snapshot().num_preemptions,
                      "busy_s": clock[name], "num_steps": engine.counters.num_steps}
        if sla is not None:
            rows[name] |= {"sla_attainment": summary["sla_attainment"], "request_goodput": summary["request_goodput"]}
    engines.clear()
    gc.collect()
    return rows


def _median(values: list[float | None]) -> float | None:
    """The median of the runs that have a regret (none when no static limit met the SLA at all)."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def with_rate(flags: list[str], rate: float) -> list[str]:
    """A workload's flags with its Poisson --request-rate replaced."""
    if "--request-rate" not in flags:
        raise ValueError("--rates needs a workload that arrives at a --request-rate (a Poisson workload)")
    i = flags.index("--request-rate")
    return [*flags[:i + 1], str(rate), *flags[i + 2:]]


def print_table(configs: dict, cells: dict[str, list[str]]) -> None:
    """A markdown table: a row per workload, a column per contender."""
    print("| workload | " + " | ".join(configs) + " |")
    print("|---" * (len(configs) + 1) + "|")
    for wname, shown in cells.items():
        print(f"| {wname} | " + " | ".join(shown) + " |")


def capacity_tournament(args: argparse.Namespace, configs: dict[str, list[str]]) -> int:
    """Each contender's capacity at the workload's SLA, read off attainments measured at every rate of the grid."""
    rates = sorted(float(r) for r in args.rates.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    table: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = workloads(Path(tmp), args.scale)
        for wname in (args.workloads.split(",") if args.workloads else [w for w in work if w in TIMED]):
            sla = TIMED.get(wname)
            if sla is None:
                raise ValueError(f"{wname} has no SLA (real_tournament.TIMED): capacity needs one")
            curves: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
            runs: dict[str, list[dict]] = {name: [] for name in configs}
            for rate in rates:
                rows = [run_lockstep(with_rate(work[wname], rate), configs, args.threads, seed, sla) for seed in seeds]
                for name in configs:  # seeds pooled: the mean attainment of the arrival patterns
                    attainment = statistics.fmean(r[name]["sla_attainment"] for r in rows)
                    curves[name].append((rate, attainment))
                    runs[name].extend(r[name] | {"rate": rate} for r in rows)
                    print(f"{wname:<18} {rate:5.2f} req/s  {name:<16} SLA met {100 * attainment:5.1f}%  p90 TPOT "
                          f"{statistics.fmean(r[name]['p90_tpot_ms'] for r in rows):6.1f} ms  preempt "
                          f"{sum(r[name]['num_preemptions'] for r in rows):3d}", flush=True)
            found = {name: capacity_on_grid(curve, args.target) for name, curve in curves.items()}
            cells = {name: {"capacity": f.capacity, "capacity_unbounded": not f.bounded} for name, f in found.items()}
            regret = hindsight_regret(cells, "capacity")
            table[wname] = {name: cells[name] | {"regret": regret[name], "curve": curves[name], "runs": runs[name]}
                            for name in configs}
    print(f"\ncapacity (req/s with {args.target:.0%} of requests in the SLA) and regret against the best static")

    def shown(c: dict) -> str:
        regret = "n/a" if c["regret"] is None else f"{100 * c['regret']:+.1f}%"
        return f"{'>=' if c['capacity_unbounded'] else ''}{c['capacity']:.2f} ({regret})"

    print_table(configs, {wname: [shown(cells[name]) for name in configs] for wname, cells in table.items()})
    if args.output_json:
        write_json(args.output_json, {"args": vars(args), "capacity": table})
    return 0


def with_schedule(configs: dict[str, list[str]], wname: str, args: argparse.Namespace
                  ) -> tuple[dict[str, list[str]], dict[str, PhaseSchedule]]:
    """The contenders, and on a shift workload with --phase-schedule the schedule's contender too."""
    if not args.phase_schedule or wname not in SHIFTS:
        return configs, {}
    limits = args.phase_schedule
    name = "schedule-" + "/".join(map(str, limits))
    sizes = [len(phase) for phase in shift_phases(wname, args.scale).values()]
    return configs | {name: ["--batch-controller", "static", "--max-num-seqs", str(max(limits))]}, \
        {name: PhaseSchedule(sizes, limits)}


def phase_limits(text: str) -> list[int]:
    """--phase-schedule's value: positive limits, comma-separated."""
    try:
        limits = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of limits") from None
    if min(limits) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: limits must be positive")
    return limits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scale", type=int, default=60, help="requests per workload (long outputs: half)")
    p.add_argument("--static", default="16,32,64,256")
    p.add_argument("--policies", default="combined-blocks,combined-cost", help=f"comma list of {', '.join(POLICIES)}")
    p.add_argument("--workloads", default=None, help="comma list (default: all)")
    p.add_argument("--seeds", default="0", help="one lockstep run per seed (the workload's draw and sampling)")
    p.add_argument("--rates", default=None,
                   help="comma list of Poisson rates (req/s): capacity at the SLA instead of one rate's goodput")
    p.add_argument("--target", type=float, default=0.9, help="share of requests in the SLA that capacity keeps")
    p.add_argument("--phase-schedule", type=phase_limits, default=None, metavar="LIMITS",
                   help="one static limit per phase (e.g. 32,8,32): a hindsight contender on the shift workloads")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    if args.phase_schedule:
        if args.rates:
            p.error("--phase-schedule: only without --rates")
        for wname in SHIFTS.keys() & set(args.workloads.split(",") if args.workloads else SHIFTS):
            phases = len(shift_phases(wname, args.scale))
            if len(args.phase_schedule) != phases:
                p.error(f"--phase-schedule: {wname} has {phases} phases, {len(args.phase_schedule)} limits given")
    configs = contenders([int(n) for n in args.static.split(",")], [s for s in args.policies.split(",") if s])
    if args.rates:
        return capacity_tournament(args, configs)
    table: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = workloads(Path(tmp), args.scale)
        names = args.workloads.split(",") if args.workloads else list(work)
        for wname in names:
            contestants, schedules = with_schedule(configs, wname, args)
            runs: dict[str, list[dict]] = {name: [] for name in contestants}
            for seed in (int(s) for s in args.seeds.split(",")):
                sla = TIMED.get(wname)
                rows = run_lockstep(work[wname], contestants, args.threads, seed, sla, schedules)
                # offline: throughput; timed: requests/s within the SLA (all are served: throughput is the load)
                regret = hindsight_regret(rows, "output_throughput" if sla is None else "request_goodput")
                for name, row in rows.items():
                    row["regret"] = regret[name]
                    runs[name].append(row)
                    within = "" if sla is None else f"  SLA met {100 * row['sla_attainment']:5.1f}%"
                    shown = "   n/a" if row["regret"] is None else f"{100 * row['regret']:+6.1f}"
                    print(f"{wname:<24} {name:<16} {row['output_throughput']:7.1f} tok/s  regret "
                          f"{shown}%{within}  p90 TTFT {row['p90_ttft_ms']:7.0f} ms  "
                          f"p90 TPOT {row['p90_tpot_ms']:6.1f} ms  preempt {row['num_preemptions']:3d}  (seed {seed})",
                          flush=True)
            table[wname] = {name: {"runs": r, "median_regret": _median([x["regret"] for x in r])}
                            for name, r in runs.items()}
    print()
    columns = dict.fromkeys(name for rows in table.values() for name in rows)  # a schedule only on the shifts
    print_table(columns, {wname: ["n/a" if c not in rows or rows[c]["median_regret"] is None
                                  else f"{100 * rows[c]['median_regret']:+.1f}%" for c in columns]
                          for wname, rows in table.items()})
    if args.output_json:
        write_json(args.output_json, {"args": vars(args), "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
