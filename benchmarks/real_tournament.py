"""The policy tournament on the real engine: `batchpilot bench throughput` per (workload, policy),
the policies alternated within each workload, and each policy's regret against the best static
limit of the sweep, as `batchpilot simulate tournament` prints it for the simulator.

    python benchmarks/real_tournament.py --threads 2 --output-json docs/results/real_tournament.json

Workloads (all requests at t=0, forced lengths unless said): uniform (0.25 GiB KV, and 1 GiB: all 60 fit), long outputs
on a tight pool (0.1 GiB), the phase shift (short, long, short; a JSON Lines trace), and the
bundled real text with lengths the model chooses. Runs take minutes each: nothing else should
run on the machine meanwhile.

Single runs on a 2-core cloud host differ by up to ~15%, more than most regrets: `--repeats N` runs
the whole alternated order N times (the order reversed on odd rounds) and scores each policy by its
median, with the spread (max / min - 1) beside it, and by its paired regret: the median over rounds
of its regret against the best static's run of the same round (drift between rounds cancels).

The host's own speed drifts by 10-45% within minutes on some hosts. With `--probe` a fixed piece of
work (the model's matmul shape and a memory sweep, `host_seconds`) is timed between runs, and each
run's throughput is also reported scaled by how fast the host was then against the median of all
probes (`output_throughput_probed`, with its spread beside the raw one). Regret stays on the raw
throughput: on an AMD EPYC (Zen 4) the scaling cut the spread of runs of one configuration for some
configurations and widened it for others, and an A/A run's CV stayed 4.4% / 4.3% (docs/reproduction.md):
the probe does not see what makes runs differ there. `--static 32 --policies none --repeats 6
--probe` is the A/A check: one configuration six times, its spread raw and scaled.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batchpilot.bench.metrics import SLA
from batchpilot.bench.results import write_json
from batchpilot.sim.tournament import hindsight_regret, regret_table, shift

POLICIES = {
    "combined-clt": ["--batch-controller", "combined", "--memory-mode", "clt"],
    "combined-blocks": ["--batch-controller", "combined", "--memory-mode", "blocks"],
    "combined-peak": ["--batch-controller", "combined", "--memory-mode", "peak"],
    "combined-cost": ["--batch-controller", "combined", "--memory-mode", "cost"],
    "sglang": ["--batch-controller", "sglang"],
}


AZURE_CODE = Path(__file__).resolve().parents[1] / "tests" / "data" / "azure_code_2023_head300.csv"
AZURE_RATE = 0.15  # requests/s: at 0.25 the queue grew (P90 TTFT 25 s with static 32 and with cost)
UNIFORM_RATE = 5.0  # requests/s: ~90% of what static 32 served at 6/s (568 tok/s, 144 tokens a request)
# Workloads whose requests arrive over time: judged by goodput within the SLA (every policy serves
# them all, so throughput is the offered load).
DOCUMENT_RATE = 0.3  # requests/s: ~2/3 of what the tight pool served of them at t=0 (~92 out tok/s, ~200 a request)
TIMED = {"azure-code-timed": SLA(ttft_ms=15000, tpot_ms=1000), "uniform-poisson": SLA(ttft_ms=3000, tpot_ms=100),
         "long-prompts-poisson": SLA(ttft_ms=10000, tpot_ms=100)}


def forced_lengths_trace(path: Path, reqs) -> Path:
    """Requests as a JSON Lines trace `bench --dataset-name trace` replays: their lengths forced, all at
    t=0, in queue order."""
    path.write_text("".join(json.dumps({"timestamp": 0, "prompt_len": r.prompt_len, "output_len": r.output_len})
                            + "\n" for r in reqs))
    return path


def workloads(tmp: Path, scale: int) -> dict[str, list[str]]:
    def jsonl(name: str, reqs) -> Path:
        return forced_lengths_trace(tmp / name, reqs)

    outputs = jsonl("output_shift.jsonl", shift("output-shift", scale))
    phases = jsonl("phase_shift.jsonl", shift("phase-shift", scale))
    documents = jsonl("document_shift.jsonl", shift("document-shift", 2 * scale))
    azure = ["--dataset-name", "trace", "--dataset", str(AZURE_CODE), "--num-prompts", str(scale // 3),
             "--kv-cache-gib", "0.25"]
    return {
        "uniform": ["--num-prompts", str(scale), "--input-dist", "uniform:50:400", "--output-dist",
                    "uniform:32:256", "--ignore-eos", "--kv-cache-gib", "0.25"],
        "uniform-ample-kv": ["--num-prompts", str(scale), "--input-dist", "uniform:50:400", "--output-dist",
                             "uniform:32:256", "--ignore-eos", "--kv-cache-gib", "1"],
        "long-outputs-tight-kv": ["--num-prompts", str(scale // 2), "--input-dist", "uniform:20:100",
                                  "--output-dist", "uniform:200:500", "--ignore-eos", "--kv-cache-gib", "0.1"],
        "phase-shift": ["--dataset-name", "trace", "--dataset", str(phases), "--num-prompts", str(10 * scale),
                        "--request-rate", "inf", "--kv-cache-gib", "0.1"],
        # short outputs, long (600-1,000), short, on a pool of ~36 short or ~5 long: the best limit moves
        "output-shift": ["--dataset-name", "trace", "--dataset", str(outputs),
                         "--num-prompts", str(10 * scale), "--request-rate", "inf", "--kv-cache-gib", "0.1"],
        # Documents on a pool that holds ~7 of them (0.25 GiB: 11,650 tokens of 1,000-2,000 + 100-300)
        "long-prompts-tight-kv": ["--num-prompts", str(scale // 4), "--input-dist", "uniform:1000:2000",
                                  "--output-dist", "uniform:100:300", "--ignore-eos", "--kv-cache-gib", "0.25"],
        # chat (scale requests), documents (scale // 4), chat (scale), on the same pool: the best limit moves
        "document-shift": ["--dataset-name", "trace", "--dataset", str(documents), "--num-prompts", str(10 * scale),
                           "--request-rate", "inf", "--kv-cache-gib", "0.25"],
        "builtin-real-text": ["--dataset-name", "builtin", "--num-prompts", str(scale), "--kv-cache-gib", "0.1"],
        # The first requests of the Azure code trace (prompts of 100-7,000 tokens, median ~1,400, outputs
        # median 13; a third as many: ~2,600 prompt tokens each, ~1,000 prompt tok/s here): all at once, and
        # at the trace's pattern rescaled to AZURE_RATE requests/s.
        "azure-code-offline": [*azure, "--request-rate", "inf"],
        "azure-code-timed": [*azure, "--request-rate", str(AZURE_RATE)],
        # the documents of long-prompts-tight-kv arriving as a Poisson process (the SLA of the simulator's
        # CPU-profile tournament: TTFT 10 s, TPOT 100 ms)
        "long-prompts-poisson": ["--num-prompts", str(scale // 2), "--input-dist", "uniform:1000:2000",
                                 "--output-dist", "uniform:100:300", "--ignore-eos", "--kv-cache-gib", "0.25",
                                 "--request-rate", str(DOCUMENT_RATE)],
        # uniform's requests arriving as a Poisson process near the tight pool's capacity
        "uniform-poisson": ["--num-prompts", str(2 * scale), "--input-dist", "uniform:50:400", "--output-dist",
                            "uniform:32:256", "--ignore-eos", "--kv-cache-gib", "0.25", "--request-rate",
                            str(UNIFORM_RATE)],
    }


def host_seconds(threads: int, reps: int = 7) -> float:
    """Seconds of a fixed piece of work on this host now (median of reps): float32 matmuls of the
    default model's MLP shape at 32 rows (float32: full speed on every host, bf16 or not) and a sweep
    over 256 MB. Only its ratio between calls is used."""
    import torch

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 576, generator=gen)
    w = torch.randn(1536, 576, generator=gen)
    big = torch.ones(64 * 1024 * 1024, dtype=torch.float32)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(40):
            torch.nn.functional.linear(x, w)
        big.sum()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "batchpilot.cli", "--log-level", "WARNING", "bench", "throughput", "--no-progress",
           "--output-json", str(out), *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def scale_by_host(runs: dict[str, list[dict]]) -> None:
    """Adds each run's throughput scaled to the median host speed of the workload's probes."""
    typical = statistics.median(r["host_seconds"] for rs in runs.values() for r in rs)
    for rs in runs.values():
        for r in rs:
            r["output_throughput_probed"] = r["output_throughput"] * r["host_seconds"] / typical


def _median_row(runs: list[dict]) -> dict:
    """One policy's repeats: the median of each measure, and the spread (max / min - 1) of the throughputs."""
    keys = ("output_throughput", "p90_tpot_ms", "num_preemptions", "duration", "output_throughput_probed")
    row = {k: statistics.median(r[k] for r in runs) for k in keys if k in runs[0]}
    spread = {f"{k}_spread": max(r[k] for r in runs) / min(r[k] for r in runs) - 1
              for k in ("output_throughput", "output_throughput_probed") if k in runs[0]}
    return row | spread | {"repeats": len(runs)}


def paired_regret(runs: dict[str, list[dict]], best: str) -> dict[str, dict]:
    """Each policy's regret against the best static (`best`, chosen by median) round by round: the
    two runs of a round sit close together in the alternated order, so host drift between rounds
    cancels in their ratio. The median of the rounds' regrets, their range, and in how many rounds
    the policy beat static 256 (vLLM's default) when it was run."""
    out = {}
    for name, rs in runs.items():
        per_round = [1 - r["output_throughput"] / b["output_throughput"] for r, b in zip(rs, runs[best])]
        row = {"paired_regret": statistics.median(per_round),
               "paired_regret_range": [min(per_round), max(per_round)]}
        if "static-256" in runs:
            row["rounds_ahead_of_static_256"] = sum(
                r["output_throughput"] > s["output_throughput"] for r, s in zip(rs, runs["static-256"]))
        out[name] = row
    return out


def _cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.mean(values) if len(values) > 1 else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scale", type=int, default=120, help="requests per workload (long outputs: half)")
    p.add_argument("--static", default="8,16,32,64,256")
    p.add_argument("--policies", default=None, help=f"comma list of {', '.join(POLICIES)} (default: all)")
    p.add_argument("--workloads", default=None, help="comma list (default: all)")
    p.add_argument("--repeats", type=int, default=1, help="rounds of the whole order; the median counts")
    p.add_argument("--probe", action="store_true",
                   help="time a fixed piece of work between runs; report throughput scaled to the host's speed too")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    table: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        all_work = workloads(Path(tmp), args.scale)
        # timed workloads are judged by goodput within their SLA: lockstep_tournament.py measures that
        chosen = args.workloads.split(",") if args.workloads else [w for w in all_work if w not in TIMED]
        configs = {f"static-{n}": ["--batch-controller", "static", "--max-num-seqs", n]
                   for n in args.static.split(",")}
        policies = [] if args.policies == "none" else args.policies.split(",") if args.policies else list(POLICIES)
        unknown = [name for name in policies if name not in POLICIES]
        if unknown:
            p.error(f"--policies: unknown {', '.join(unknown)} (choose from {', '.join(POLICIES)}, or none)")
        configs |= {name: POLICIES[name] for name in policies}
        for wname in chosen:
            names = list(configs)
            # Alternate: statics and controllers interleaved, so host drift spreads over both.
            order = [n for pair in zip(names[: len(names) // 2], names[len(names) // 2:]) for n in pair]
            order += [n for n in names if n not in order]
            runs: dict[str, list[dict]] = {name: [] for name in names}
            probe = host_seconds(args.threads) if args.probe else None
            for rnd in range(args.repeats):
                for name in order if rnd % 2 == 0 else order[::-1]:
                    r = run([*all_work[wname], *configs[name], "--threads", str(args.threads)], Path(tmp) / "r.json")
                    if args.probe:
                        after = host_seconds(args.threads)
                        r["host_seconds"], probe = (probe + after) / 2, after
                    runs[name].append(r)
                    print(f"{wname:<24} {name:<16} {r['output_throughput']:8.1f} tok/s  p90 TPOT "
                          f"{r['p90_tpot_ms']:7.1f} ms  preempt {r['num_preemptions']:4d}  (round {rnd})"
                          + (f"  host {1e3 * r['host_seconds']:.1f} ms" if args.probe else ""), flush=True)
            if args.probe:
                scale_by_host(runs)
            rows = {name: _median_row(rs) for name, rs in runs.items()}
            for name, value in hindsight_regret(rows, "output_throughput").items():
                rows[name]["regret"] = value
            best = max((n for n in rows if n.startswith("static-")), key=lambda n: rows[n]["output_throughput"])
            for name, paired in paired_regret(runs, best).items():
                rows[name] |= paired
                lo, hi = paired["paired_regret_range"]
                print(f"{wname:<24} {name:<16} paired regret vs {best}: median {paired['paired_regret']:+.1%} "
                      f"(rounds {lo:+.1%} .. {hi:+.1%})"
                      + (f"; ahead of static-256 in {paired['rounds_ahead_of_static_256']} of {args.repeats} rounds"
                         if "rounds_ahead_of_static_256" in paired else ""), flush=True)
            table[wname] = {"results": rows}
            if args.probe:
                for name, rs in runs.items():
                    row = rows[name]
                    print(f"{wname:<24} {name:<16} spread (max/min - 1) raw {row['output_throughput_spread']:.1%}, "
                          f"scaled by the host {row['output_throughput_probed_spread']:.1%}; "
                          f"CV raw {_cv([r['output_throughput'] for r in rs]):.1%}, "
                          f"scaled {_cv([r['output_throughput_probed'] for r in rs]):.1%}", flush=True)
    print(regret_table(table))
    if args.output_json:
        write_json(args.output_json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
