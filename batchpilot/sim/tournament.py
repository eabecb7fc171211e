"""`batchpilot simulate tournament`: every policy on every workload, and its regret against the
best static limit an operator could have picked in hindsight.

A workload is lengths (forced, or chosen by the "model" below a declared max_tokens), arrival
times (all at once, a Poisson rate, a trace's own times) and a KV pool sized in requests' worth
of tokens (tight or ample). Each policy runs each workload offline (throughput, P90 TPOT,
preemptions) and, with --sla, in a capacity search over the arrival rate (for a trace: over
its time scale). Regret is 1 - value / best static value: 3% means 3% worse than the best
static limit, negative means better than every static limit.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from batchpilot.bench.capacity import search_capacity
from batchpilot.bench.datasets import LengthDist
from batchpilot.bench.metrics import SLA, summarize
from batchpilot.bench.results import write_json
from batchpilot.bench.serve import arrival_offsets
from batchpilot.bench.traces import read_trace, trace_kind
from batchpilot.config import ControllerConfig, SchedulerConfig
from batchpilot.sim.driver import SimRequest, make_workload, simulate

STATIC_SWEEP = (8, 16, 32, 64, 128, 256, 512)
VLLM_DEFAULT = "static-256"
POLICIES = {  # the contenders besides the static sweep
    "combined-clt": ControllerConfig(name="combined", memory_mode="clt"),
    "combined-blocks": ControllerConfig(name="combined", memory_mode="blocks"),
    "combined-peak": ControllerConfig(name="combined", memory_mode="peak"),
    "combined-cost": ControllerConfig(name="combined", memory_mode="cost"),
    "sglang": ControllerConfig(name="sglang"),
}


@dataclass(frozen=True)
class Workload:
    """Requests (from a seed) and the KV pool, in requests' worth of their mean total length."""

    name: str
    make: Callable[[int], list[SimRequest]]  # scale -> requests (arrival times as the workload has them)
    kv_requests: float
    timed: bool = False  # arrivals carry times (a trace): capacity scales them instead of a Poisson rate


def _lengths(n: int, prompt: str, output: str, seed: int, max_tokens: int | None = None) -> list[SimRequest]:
    reqs = make_workload(n, float("inf"), LengthDist.parse(prompt, "input"), LengthDist.parse(output, "output"), seed)
    if max_tokens is None:
        return reqs
    return [replace(r, output_len=min(r.output_len, max_tokens), max_tokens=max_tokens) for r in reqs]


def phase_shift_phases(n: int, seed: int) -> tuple[list[SimRequest], ...]:
    """Short outputs (n // 2), then long ones (n // 4), then short again (n // 2), in queue order:
    served first come first served, the running mix shifts twice. Meant to need a high limit in the
    short phases and a low one in the long phase; measured, it does not (benchmarks/sim_phase_split.py,
    docs/reproduction.md): the short requests' prefills dominate their phase. Shifts whose best limit
    does move: the output shift, and benchmarks/sim_context_shift.py."""
    short = lambda k, s: _lengths(k, "uniform:50:200", "uniform:8:48", s)  # noqa: E731
    return short(n // 2, seed), _lengths(max(1, n // 4), "uniform:20:80", "uniform:400:800", seed + 1), short(
        n // 2, seed + 2)


def output_shift_phases(n: int, seed: int) -> tuple[list[SimRequest], ...]:
    """Short outputs (n // 2), then long ones (n // 8), then short again (n // 2), where decode decides
    every phase: a short request's prompt is 20-60 tokens, so a larger batch still pays in its phase,
    and the pool (builtin_workloads: ~36 short requests at full length, ~5 long) makes a large batch
    of long outputs preempt. The best static limit of a phase run alone moves from ~32 to ~8, on this
    CPU's profile and on the engine (benchmarks/sim_phase_split.py, lockstep_phase_split.py)."""
    short = lambda k, s: _lengths(k, "uniform:20:60", "uniform:60:120", s)  # noqa: E731
    return short(n // 2, seed), _lengths(max(1, n // 8), "uniform:20:80", "uniform:600:1000", seed + 1), short(
        n // 2, seed + 2)


def document_shift_phases(n: int, seed: int) -> tuple[list[SimRequest], ...]:
    """Chat (n // 2), then documents (n // 8), then chat again (n // 2), in queue order, on one pool.
    Meant as the case for a limit that adapts: chat wants the limit where decode throughput stops
    rising with the batch, the documents (long prompts, the pool holding about seven) one the pool
    holds through their outputs. Measured, every limit from 8 up serves it within a few percent: with
    prefix caching a preempted document finds most of its blocks again (docs/reproduction.md)."""
    chat = lambda k, s: _lengths(k, "uniform:50:200", "uniform:8:48", s)  # noqa: E731
    return chat(n // 2, seed), long_prompts(max(1, n // 8), seed + 1), chat(n // 2, seed + 2)


SHIFTS = {  # the shift workloads: their phases from (n, seed), the phases' names, the seed they are drawn with
    "phase-shift": (phase_shift_phases, ("short", "long", "short again"), 6),
    "output-shift": (output_shift_phases, ("short", "long", "short again"), 9),
    "document-shift": (document_shift_phases, ("chat", "documents", "chat again"), 8),
}


def shift_phases(name: str, n: int) -> dict[str, list[SimRequest]]:
    """A shift workload's phases by name, drawn as the tournament draws it (the simulator's and the
    real engine's alike)."""
    make, labels, seed = SHIFTS[name]
    return dict(zip(labels, make(n, seed)))


def shift(name: str, n: int) -> list[SimRequest]:
    """A shift workload whole: its phases in queue order."""
    return [r for phase in shift_phases(name, n).values() for r in phase]


def long_prompts(n: int, seed: int) -> list[SimRequest]:
    """Documents (retrieval-augmented prompts, summaries): prompts of 1,000-2,000 tokens, outputs of 100-300."""
    return _lengths(n, "uniform:1000:2000", "uniform:100:300", seed)


def builtin_workloads(datasets: list[str] | tuple[str, ...] = (), encode: Callable[[str], list[int]] | None = None
                      ) -> list[Workload]:
    """The nine built-in workloads, and for each dataset given: two windows of a timed trace (its first
    requests, and those from half-way through it), or a ShareGPT file's conversations (`encode`
    counts their tokens). Lengths from a dataset are chosen by the "model" below max_tokens 1024
    (or the reference length, if longer), so no policy can read them from max_tokens."""
    work = [
        Workload("uniform", lambda n: _lengths(n, "uniform:50:400", "uniform:32:256", 1), 32),
        Workload("uniform-ample-kv", lambda n: _lengths(n, "uniform:50:400", "uniform:32:256", 2), 160),
        # 11.3 mean requests (~4,650 tokens at scale 200): the real tournament's 0.1 GiB pool, as for output-shift
        Workload("long-outputs-tight-kv", lambda n: _lengths(n // 2, "uniform:20:100", "uniform:200:500", 3), 11.3),
        Workload("lognormal-model-lengths", lambda n: _lengths(n, "lognormal:150:0.8", "lognormal:100:0.8", 4,
                                                              max_tokens=1024), 24),
        Workload("sharegpt-like-model-lengths", lambda n: _lengths(n, "lognormal:170:1.0", "lognormal:150:1.0", 5,
                                                                  max_tokens=2048), 16),
        Workload("phase-shift", lambda n: shift("phase-shift", n), 16),
        # 22 mean requests (~4,600 tokens): the real tournament's 0.1 GiB pool for the default model
        Workload("output-shift", lambda n: shift("output-shift", n), 22),
        # The pool holds ~7 documents' worth (1,700 tokens each): 7 and, for the shift, 36 of its mean request.
        Workload("long-prompts-tight-kv", lambda n: long_prompts(n // 4, 7), 7),
        Workload("document-shift", lambda n: shift("document-shift", n), 36),
    ]
    for path in datasets:
        work += _dataset_workloads(path, encode)
    return work


def _dataset_workloads(path: str, encode: Callable[[str], list[int]] | None) -> list[Workload]:
    def request(r, t0: float = 0.0) -> SimRequest:
        return SimRequest(r.arrival_s - t0, r.prompt_len, r.output_len, max(1024, r.output_len))

    if trace_kind(path) == "sharegpt":  # no times: tokenize only the conversations a run uses
        return [Workload(f"{Path(path).stem}-sharegpt",
                         lambda n: [request(r) for r in read_trace(path, encode=encode, limit=n).requests], 16)]
    trace = read_trace(path)

    def from_trace(n: int, start: float = 0.0) -> list[SimRequest]:
        rows = [r for r in trace.requests if r.arrival_s >= start][: n * 2]
        return [request(r, rows[0].arrival_s) for r in rows]

    name, middle = trace.path.stem, trace.requests[-1].arrival_s / 2
    return [Workload(f"{name}-trace", from_trace, 24, timed=True),
            Workload(f"{name}-trace-late", lambda n: from_trace(n, start=middle), 24, timed=True)]


def hindsight_regret(results: dict[str, dict[str, Any]], key: str) -> dict[str, float | None]:
    """Each configuration's 1 - value / (best static value), on one workload's results. A row flagged
    `{key}_unbounded` (no load tried broke the SLA) beats every bounded one: if a static limit is
    unbounded, so is the best static, and only the unbounded rows have a regret (0)."""
    unbounded = {name for name, r in results.items() if r.get(f"{key}_unbounded")}
    if any(name.startswith("static-") for name in unbounded):
        return {name: 0.0 if name in unbounded else None for name in results}
    statics = [r[key] for name, r in results.items() if name.startswith("static-") and r.get(key) is not None]
    best = max(statics, default=None)
    return {name: None if not best or r.get(key) is None else 1 - r[key] / best for name, r in results.items()}


class Runner:
    """One cost model and SLA; runs a workload under a configuration."""

    def __init__(self, cost, block_size: int, max_model_len: int, sla: SLA | None, batched_tokens: int,
                 capacity_tolerance: float = 0.01, arrival_seeds: int = 4):
        self.cost, self.block_size, self.max_model_len, self.sla = cost, block_size, max_model_len, sla
        # The capacity search stops when its bracket is this narrow (relative): it must be finer than
        # the regrets it is to tell apart (docs/design_notes.md).
        self.capacity_tolerance = capacity_tolerance
        # A Poisson workload's attainment at a rate is pooled over this many arrival patterns: one
        # pattern's bursts move a capacity by several percent, more than the regrets judged
        # (docs/design_notes.md). A trace has one pattern, its own.
        self.arrival_seeds = arrival_seeds
        self.sched = SchedulerConfig(max_num_batched_tokens=batched_tokens)

    def capacity_tokens(self, reqs: list[SimRequest], kv_requests: float) -> int:
        mean = float(np.mean([r.prompt_len + r.output_len for r in reqs]))
        return max(self.block_size * 4, int(kv_requests * mean))

    def run(self, reqs: list[SimRequest], capacity: int, config: ControllerConfig) -> dict[str, Any]:
        res = simulate(reqs, self.cost.step_time, capacity, config, self.sched, self.max_model_len, self.block_size)
        out = summarize(res.records, res.duration_s, self.sla)
        return out | {"num_preemptions": res.num_preemptions}

    def capacity(self, reqs: list[SimRequest], capacity: int, config: ControllerConfig, timed: bool,
                 offline_rate: float, target: float, draws: Sequence[list[SimRequest]] = ()) -> float | None:
        """Highest load meeting the SLA for `target` of requests: a Poisson rate, or a trace's speed-up
        (reported as the resulting mean arrival rate). None when no load tried broke the SLA (it does
        not bind on this workload; a number would be only where the search stopped). A timed workload
        drawn at random (not a recorded trace) may give more `draws` of itself, pooled as the seeds are."""
        def attainment(rate: float, seed: int, draw: list[SimRequest]) -> float:
            times = arrival_offsets([r.arrival_s if timed else None for r in draw], rate, seed=seed)
            load = [replace(r, arrival_s=t) for r, t in zip(draw, times)]
            return self.run(load, capacity, config)["sla_attainment"]

        patterns = ([(0, draw) for draw in (reqs, *draws)] if timed
                    else [(seed, reqs) for seed in range(self.arrival_seeds)])

        def probe(rate: float) -> float:
            return sum(attainment(rate, seed, draw) for seed, draw in patterns) / len(patterns)

        found = search_capacity(probe, target, max(0.05, offline_rate / 4), tolerance=self.capacity_tolerance,
                                max_probes=20)
        return found.capacity if found.bounded else None


def sla_targets(controller: str, sla_tpot_ms: float | None,
                sla_ttft_ms: float | None) -> tuple[float | None, float | None]:
    """The (TPOT, TTFT) targets a tournament tells a contender: ours take the SLA a user states (TTFT only
    beside a TPOT, which starts the SLA loop); static limits and SGLang's rule have no such loop. The one
    rule for the simulated tournament and the real engine's (benchmarks/lockstep_tournament.py)."""
    if controller in ("static", "sglang") or sla_tpot_ms is None:
        return None, None
    return sla_tpot_ms, sla_ttft_ms


def configurations(statics: tuple[int, ...], base: ControllerConfig, sla_tpot_ms: float | None = None,
                   sla_ttft_ms: float | None = None) -> dict[str, ControllerConfig]:
    """The static sweep and the contenders, told the SLA as sla_targets says."""
    configs = {f"static-{n}": replace(base, name="static", max_num_seqs=n) for n in statics}
    for name, policy in POLICIES.items():
        tpot, ttft = sla_targets(policy.name, sla_tpot_ms, sla_ttft_ms)
        configs[name] = replace(base, name=policy.name, memory_mode=policy.memory_mode, max_num_seqs=max(statics),
                                sla_tpot_ms=tpot, sla_ttft_ms=ttft)
    return configs


def run_tournament(runner: Runner, workloads: list[Workload], configs: dict[str, ControllerConfig], scale: int,
                   target: float, progress: Callable[[str], None] = print,
                   sla_configs: dict[str, ControllerConfig] | None = None) -> dict[str, dict[str, Any]]:
    """{workload: {config: metrics + regret}}. Offline runs use `configs` (memory-aware only: an
    operator after throughput sets no latency target); capacity searches use `sla_configs` (the
    same policies told the SLA's TPOT target)."""
    sla_configs = sla_configs or configs
    table: dict[str, dict[str, Any]] = {}
    for w in workloads:
        reqs = w.make(scale)
        capacity = runner.capacity_tokens(reqs, w.kv_requests)
        offline = [replace(r, arrival_s=0.0) for r in reqs]
        rows: dict[str, dict[str, Any]] = {}
        for name, config in configs.items():
            start = time.perf_counter()
            r = runner.run(offline, capacity, config)
            row = {k: r[k] for k in ("output_throughput", "request_throughput", "p90_tpot_ms", "num_preemptions")}
            if runner.sla is not None:
                row["sla_attainment"] = r["sla_attainment"]
                row["capacity"] = runner.capacity(reqs, capacity, sla_configs[name], w.timed, r["request_throughput"],
                                                  target)
                row["capacity_unbounded"] = row["capacity"] is None
            rows[name] = row
            progress(f"  {w.name:<30} {name:<16} {row['output_throughput']:9.1f} tok/s  "
                     f"p90 TPOT {row['p90_tpot_ms']:7.1f} ms  preempt {row['num_preemptions']:5d}"
                     + (f"  capacity {_num(row['capacity'])}" if "capacity" in row else "")
                     + f"  ({time.perf_counter() - start:.1f} s)")
        table[w.name] = {"kv_capacity_tokens": capacity, "requests": len(reqs), "results": rows}
        ttft = runner.sla.ttft_ms / 1000 if runner.sla is not None and runner.sla.ttft_ms else None
        score(rows, len(reqs), ttft)
    return table


def score(rows: dict[str, dict[str, Any]], num_requests: int, ttft_s: float | None) -> None:
    """Regrets of one workload's rows, in place. A capacity at or above num_requests / TTFT target is
    unbounded: at such a rate the whole workload arrives within one TTFT, which the search cannot
    tell from all at once; the SLA met there is met at every rate, and the number is where the
    search stopped (it reported 16,650 req/s on H100 with ample KV), not a capacity."""
    if ttft_s:
        for row in rows.values():
            if row.get("capacity") is not None and row["capacity"] >= num_requests / ttft_s:
                row["capacity"], row["capacity_unbounded"] = None, True
    for key, label in (("output_throughput", "regret"), ("capacity", "capacity_regret")):
        for name, value in hindsight_regret(rows, key).items():
            rows[name][label] = value


def _num(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.2f}"


def regret_table(table: dict[str, dict[str, Any]], key: str = "regret") -> str:
    """Markdown: one row per workload, one column per contender, regret in %, best static named."""
    contenders = [VLLM_DEFAULT, *POLICIES]
    lines = ["| workload | best static | " + " | ".join(contenders) + " |", "|---" * (len(contenders) + 2) + "|"]
    value_key = "output_throughput" if key == "regret" else "capacity"
    for wname, w in table.items():
        rows = w["results"]
        unbounded = {n for n, r in rows.items() if r.get(f"{value_key}_unbounded")}
        statics = {n: float("inf") if n in unbounded else r[value_key] for n, r in rows.items()
                   if n.startswith("static-") and (n in unbounded or r.get(value_key))}
        if not statics:
            continue
        best = max(statics, key=statics.get)
        cells = ["unbounded" if c in unbounded else f"{100 * rows[c][key]:+.1f}%"
                 if rows.get(c, {}).get(key) is not None else "" for c in contenders]
        lines.append(f"| {wname} | {best} ({_num(rows[best].get(value_key))}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_tournament_parser(modes, add_simulation_args) -> None:
    p = modes.add_parser("tournament", help="policies x workloads, regret against the hindsight-best static limit")
    add_simulation_args(p)
    p.add_argument("--scale", type=int, default=200,
                   help="requests per workload (some use a fraction of it: builtin_workloads)")
    p.add_argument("--static", default=",".join(map(str, STATIC_SWEEP)), help="the static sweep")
    p.add_argument("--workloads", default=None, help="comma list of workload names (default: all)")
    p.add_argument("--target", type=float, default=0.9, help="share of requests within the SLA for capacity")
    p.add_argument("--capacity-tolerance", type=float, default=0.01,
                   help="relative width at which the capacity search stops")
    p.add_argument("--arrival-seeds", type=int, default=4,
                   help="Poisson arrival patterns whose attainment each capacity probe pools")
    p.set_defaults(func=cmd_tournament)


def cmd_tournament(args: argparse.Namespace) -> int:
    from batchpilot.sim.commands import Setup

    if not 0 < args.capacity_tolerance < 1:
        raise ValueError(f"--capacity-tolerance must be in (0, 1), got {args.capacity_tolerance}")
    if args.arrival_seeds < 1:
        raise ValueError(f"--arrival-seeds must be at least 1, got {args.arrival_seeds}")
    setup = Setup(args)
    runner = Runner(setup.cost, args.block_size, setup.max_model_len, setup.sla, args.max_num_batched_tokens,
                    args.capacity_tolerance, args.arrival_seeds)
    # each trace in --dataset (comma list) adds two workloads, each ShareGPT file one
    datasets = [d.strip() for d in (args.dataset or "").split(",") if d.strip()]
    workloads = builtin_workloads(datasets, setup.encode)
    if args.workloads:
        wanted = [w.strip() for w in args.workloads.split(",")]
        unknown = set(wanted) - {w.name for w in workloads}
        if unknown:
            raise ValueError(f"--workloads: unknown {sorted(unknown)} (known: {[w.name for w in workloads]})")
        workloads = [w for w in workloads if w.name in wanted]
    statics = tuple(int(n) for n in args.static.split(",") if n.strip())
    sla_tpot = setup.sla.tpot_ms if setup.sla is not None else None
    sla_ttft = setup.sla.ttft_ms if setup.sla is not None else None
    configs = configurations(statics, ControllerConfig())
    table = run_tournament(runner, workloads, configs, args.scale, args.target,
                           sla_configs=configurations(statics, ControllerConfig(), sla_tpot, sla_ttft))
    print("\nThroughput regret against the hindsight-best static limit (negative: better than all):")
    print(regret_table(table))
    if setup.sla is not None:
        print(f"\nCapacity regret at SLA {args.sla} for {args.target:.0%} of requests:")
        print(regret_table(table, "capacity_regret"))
    if args.output_json:
        write_json(args.output_json, table)
    return 0
