"""batchpilot's engine with bf16, int8 and int4 weights on this CPU, in one run, the contenders rotated.

The cases and their timing are vllm_speed.py's (each in a fresh process: decode step at batch B,
prefill tok/s, W1 out tok/s), with the resident memory of each process after its run. Ratios are
against bf16 in the same round (> 1: the quantized model is faster).

    python benchmarks/quant_speed.py --rounds 2
    python benchmarks/quant_speed.py --cases decode:1 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import vllm_speed

MODES = ("bf16", "int8", "int4")
CASES = ("decode:1", "decode:8", "decode:32", "prefill:512", "w1:32")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    out = subprocess.run([str(vllm_speed.PYTHONS["batchpilot"]), "-c", "from batchpilot.model.loader import "
                          "default_model_dir; print(default_model_dir())"], capture_output=True, text=True, check=True)
    model = out.stdout.strip()
    rows = []
    for case in args.cases.split(","):
        kind = case.split(":")[0]
        for rnd in range(args.rounds):
            order = MODES[rnd % 3:] + MODES[: rnd % 3]
            res = {m: vllm_speed.worker("batchpilot", model, case, "bfloat16", None if m == "bf16" else m)
                   for m in order}
            head = {m: vllm_speed.headline(kind, r) for m, r in res.items()}
            ratio = {m: (head["bf16"] / head[m] if kind == "decode" else head[m] / head["bf16"]) for m in MODES}
            rows.append({"case": case, "round": rnd, "order": order, "results": res, "ratio_vs_bf16": ratio})
            print(f"{case:<12} round {rnd} ({order[0]} first): "
                  + "  ".join(f"{m} {head[m]:9.2f} (x{ratio[m]:.2f}, {res[m]['rss_mib']:.0f} MiB)" for m in MODES),
                  flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"model": model, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
