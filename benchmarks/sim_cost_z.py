"""The cost memory mode's overflow step, swept in the simulator: which z locates it best.

    python benchmarks/sim_cost_z.py cpu 0,1,2.24      # also: a100 (Llama-2-7B), a13 (13B), h100 (Llama-3-8B)

The cost mode finds the first future step at which the predicted KV use exceeds the pool by z
standard deviations of the prediction (`COST_OVERFLOW_EPSILON` in controllers/memory.py holds
z = 1). This script runs the simulator's built-in workloads offline with several z (patched into
the peak bound for the run only) beside `blocks` and the static sweep, and prints each one's
throughput regret and preemptions (docs/reproduction.md, "The cost mode in the simulator").
"""

from __future__ import annotations

import sys

import batchpilot.controllers.memory as memory
import batchpilot.controllers.peak as peak
from batchpilot.config import ControllerConfig
from batchpilot.sim import tournament as T
from batchpilot.sim.profile import ProfileModel
from batchpilot.sim.roofline import Hardware, ModelShape, RooflineModel

PRESETS = {"a100": ("A100-80GB", "Llama-2-7B"), "a13": ("A100-80GB", "Llama-2-13B"),
           "h100": ("H100-80GB", "Llama-3-8B")}


def main() -> int:
    which, zs = sys.argv[1], [float(z) for z in sys.argv[2].split(",")]
    if which == "cpu":
        cost = ProfileModel.load("docs/results/profile_cpu_xeon.json")
        max_len, scale, budget = cost.max_model_len, 200, 512
    else:
        hw, model = PRESETS[which]
        shape = ModelShape.preset(model)
        cost, max_len, scale, budget = RooflineModel(shape, Hardware.preset(hw)), shape.max_context, 500, 8192
    runner = T.Runner(cost, 16, max_len, None, budget)
    workloads = T.builtin_workloads()
    configs = {f"static-{n}": ControllerConfig(name="static", max_num_seqs=n) for n in (8, 16, 32, 64, 128, 256, 512)}
    configs["blocks"] = ControllerConfig(memory_mode="blocks", max_num_seqs=512)
    rows = T.run_tournament(runner, workloads, configs, scale, 0.9, progress=lambda s: None)
    real_z = peak._z
    for z in zs:  # the cost mode asks for the z of COST_OVERFLOW_EPSILON once per controller: answer z
        peak._z = lambda eps, z=z: z if eps == memory.COST_OVERFLOW_EPSILON else real_z(eps)
        cost_mode = {f"cost-z{z:g}": ControllerConfig(memory_mode="cost", max_num_seqs=512)}
        for w, t in T.run_tournament(runner, workloads, cost_mode, scale, 0.9, progress=lambda s: None).items():
            rows[w]["results"].update(t["results"])
    peak._z = real_z
    for w, t in rows.items():
        r = t["results"]
        best = max(v["output_throughput"] for k, v in r.items() if k.startswith("static"))
        print(f"{w:30s}", " ".join(f"{k}: {(1 - v['output_throughput'] / best) * 100:+.1f}% ({v['num_preemptions']})"
                                   for k, v in r.items() if not k.startswith("static") or k == "static-256"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
