"""How well does the simulator, calibrated by `batchpilot profile`, predict the real engine?

For each workload and controller: the real engine (`batchpilot bench throughput`, a fresh
process) and the simulator (`--profile`) run the same seeded requests; the table shows
output throughput and mean / P90 TPOT of both and the relative error. The workloads are
not the profile's grid points: the profile times synthetic steps, never a workload.

    python benchmarks/sim_fidelity.py --profile docs/results/profile_cpu_xeon.json --threads 2 --recalibrate

The profile must be of this machine's CPU (`batchpilot profile`; docs/results holds one of an
Intel Xeon and one of an AMD EPYC host, see docs/reproduction.md).

With --recalibrate the profile's calibration workload is timed again (`batchpilot profile
--recalibrate`, ~40 s) right before and right after each real run, and the simulator uses
the mean of the two corrections (its real / grid time by step size, see
batchpilot.sim.profile): this shared host's speed drifts by 10-30% within minutes (the same
real run: mean TPOT 39.2 ms one day, 30.4 ms the next), which would otherwise swamp the
simulator's own error. Each real and calibration run starts after --cooldown idle seconds:
measured here, the same Poisson run gave a mean TPOT of 30.1 and 30.7 ms when it followed
another light run, 35.3 ms right after a calibration, and 37.7-42.9 ms in a series that
alternated them without pause: this host runs slower after sustained load.
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

from batchpilot.bench.datasets import LengthDist
from batchpilot.bench.metrics import summarize
from batchpilot.config import ControllerConfig, SchedulerConfig
from batchpilot.sim.driver import make_workload, simulate
from batchpilot.sim.profile import ProfileModel

WORKLOADS = {
    "offline-uniform": dict(num_prompts=200, input_dist="uniform:50:400", output_dist="uniform:32:256",
                            rate=float("inf"), kv_cache_gib=0.25),
    # ~60% of the engine's throughput: near saturation, queueing multiplies any error of the step time
    "poisson-lognormal": dict(num_prompts=200, input_dist="lognormal:150:0.8", output_dist="lognormal:100:0.8",
                              rate=1.5, kv_cache_gib=0.25),
    "offline-long-outputs-tight-kv": dict(num_prompts=100, input_dist="uniform:20:100",
                                          output_dist="uniform:200:500", rate=float("inf"), kv_cache_gib=0.1),
}
CONTROLLERS = {"static-32": ControllerConfig(name="static", max_num_seqs=32), "combined": ControllerConfig()}
METRICS = ("output_throughput", "mean_tpot_ms", "p90_tpot_ms")
BUDGET = 512  # the engine's default max_num_batched_tokens


def bench_args(w: dict, cfg: ControllerConfig, threads: int, seed: int) -> list[str]:
    """The `batchpilot` arguments of a workload's real run (`bench throughput`)."""
    return ["bench", "throughput", "--num-prompts", str(w["num_prompts"]), "--input-dist", w["input_dist"],
            "--output-dist", w["output_dist"], "--ignore-eos", "--request-rate", str(w["rate"]),
            "--kv-cache-gib", str(w["kv_cache_gib"]), "--threads", str(threads), "--batch-controller", cfg.name,
            "--max-num-seqs", str(cfg.max_num_seqs), "--seed", str(seed), "--max-num-batched-tokens", str(BUDGET),
            "--no-progress"]


def run_real(w: dict, name: str, cfg: ControllerConfig, threads: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "batchpilot.cli", *bench_args(w, cfg, threads, seed), "--output-json", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def recalibrated(profile: str, threads: int, cooldown: float) -> ProfileModel:
    time.sleep(cooldown)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        subprocess.run([sys.executable, "-m", "batchpilot.cli", "profile", "--recalibrate", profile, "--threads",
                        str(threads), "--no-progress", "--output", str(out)], check=True, stdout=subprocess.DEVNULL)
        return ProfileModel.load(out)


def run_sim(w: dict, cfg: ControllerConfig, model: ProfileModel, seed: int) -> dict:
    work = make_workload(w["num_prompts"], w["rate"], LengthDist.parse(w["input_dist"], "input"),
                         LengthDist.parse(w["output_dist"], "output"), seed)
    res = simulate(work, model.step_time, model.kv_capacity_tokens(w["kv_cache_gib"]), cfg,
                   SchedulerConfig(max_num_batched_tokens=BUDGET), model.max_model_len)
    return summarize(res.records, res.duration_s) | {"num_preemptions": res.num_preemptions}


def measure(w: dict, cname: str, cfg: ControllerConfig, model: ProfileModel, args: argparse.Namespace
            ) -> tuple[list[dict], dict, list[list[float]]]:
    """The real runs of one case, and the grid's correction around them (mean, and each measurement).

    Calibration, real, calibration, real, ..., calibration: the runs are bracketed by the
    corrections, each after the same rest (see the module's docstring).
    """
    models = [recalibrated(args.profile, args.threads, args.cooldown)] if args.recalibrate else [model]
    reals = []
    for _ in range(args.repeats):
        time.sleep(args.cooldown)
        reals.append(run_real(w, cname, cfg, args.threads, args.seed))
        if args.recalibrate:
            models.append(recalibrated(args.profile, args.threads, args.cooldown))
    correction = {"step_s": models[0].correction_step_s,
                  "scale": [statistics.mean(k) for k in zip(*(m.correction_scale for m in models))]}
    return reals, correction, [m.correction_scale for m in models]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--controllers", default=",".join(CONTROLLERS))
    ap.add_argument("--repeats", type=int, default=1, help="real runs per case (their mean is compared; "
                    "the table shows their spread, the host's own noise)")
    ap.add_argument("--recalibrate", action="store_true", help="measure the correction again around each real run")
    ap.add_argument("--cooldown", type=float, default=60, help="idle seconds before each real or calibration run")
    ap.add_argument("--real-runs", default=None, metavar="JSON",
                    help="take the real runs and corrections from an earlier --output-json of the same profile and "
                         "simulate again (for a change of the simulator alone)")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    model = ProfileModel.load(args.profile)
    earlier = {}
    if args.real_runs:
        earlier = {(r["workload"], r["controller"], r["metric"]): r
                   for r in json.loads(Path(args.real_runs).read_text())["rows"]}
    rows = []
    print("| workload | controller | metric | real (mean) | real spread | simulated | error |")
    print("|---|---|---|---|---|---|---|")
    for wname in args.workloads.split(","):
        w = WORKLOADS[wname]
        for cname in args.controllers.split(","):
            cfg = CONTROLLERS[cname]
            if earlier:
                old = {m: earlier[wname, cname, m] for m in METRICS + ("num_preemptions",)}
                reals = [dict(zip(old, values)) for values in zip(*(r["real_runs"] for r in old.values()))]
                correction, measured = old[METRICS[0]]["correction"], old[METRICS[0]]["corrections"]
            else:
                reals, correction, measured = measure(w, cname, cfg, model, args)
            used = ProfileModel({**model.profile, "correction": correction})
            sim = run_sim(w, cfg, used, args.seed)
            for m in METRICS + ("num_preemptions",):
                values = [r[m] for r in reals]
                real = statistics.mean(values)
                spread = (max(values) - min(values)) / real if real else 0.0
                err = sim[m] / real - 1 if real else (0.0 if sim[m] == 0 else float("inf"))
                rows.append({"workload": wname, "controller": cname, "metric": m, "real": real, "real_runs": values,
                             "sim": sim[m], "error": err, "correction": correction,
                             "corrections": measured})
                print(f"| {wname} | {cname} | {m} | {real:.1f} | {spread:.1%} | {sim[m]:.1f} | {err:+.1%} |",
                      flush=True)
    worst = max(abs(r["error"]) for r in rows if r["metric"] in METRICS)
    print(f"worst error over {', '.join(METRICS)}: {worst:.1%}")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"profile": args.profile, "workloads": WORKLOADS, "rows": rows},
                                                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
