"""Decode step at batch 1: batchpilot (bf16, int4) against llama.cpp on the default model's own Q4_1
GGUF, in one run, each in a fresh process, the order rotated every round.

llama.cpp runs through llama-cpp-python (not a dependency of ours: give its interpreter with
--llamacpp-python, e.g. a venv where `pip install llama-cpp-python` built it for this CPU), 2 threads.
Its step: a 128-token prompt evaluated, then 64 single-token evals of greedy tokens, timed; the
median of 3 passes. Ours: vllm_speed.py's decode:1 case ((t65 - t1) / 64 through the engine).
Each round also times the bandwidth floor of a bf16 step in the same sitting: one read of as many
bytes as the model's bf16 weights (a float32 sum over them, 2 threads, the fastest of 20), so the
ratio to the floor is taken against what the host reads that minute, not another day's figure.

    python benchmarks/llamacpp_decode.py --llamacpp-python /tmp/lcpp/bin/python --rounds 3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import vllm_speed

MARKER = "LLAMACPP_RESULT "


def llamacpp_worker(gguf: str, threads: int, prompt_batch: int) -> dict:
    import time

    import numpy as np
    from llama_cpp import Llama, llama_get_logits

    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=prompt_batch,
                verbose=False)
    prompt = np.random.default_rng(0).integers(100, 49152, size=128).tolist()
    steps = []
    for _ in range(3):
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(64):
            # the last evaluated token's logits, from the context (llm.scores holds them only with logits_all)
            token = int(np.argmax(np.ctypeslib.as_array(llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))))
            llm.eval([token])
        steps.append((time.perf_counter() - start) / 64 * 1000)
    return {"step_ms": sorted(steps)[1], "passes_ms": steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llamacpp-python", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-json", default=None)
    p.add_argument("--llamacpp-prompt-batch", type=int, default=512,
                   help="tokens of the prompt llama.cpp evaluates at once (its n_batch; 1 where its batched "
                        "path fails, as its AMX build did on an AMX Xeon: the timed steps are one token each "
                        "either way)")
    p.add_argument("--worker-gguf", help=argparse.SUPPRESS)
    p.add_argument("--worker-floor", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_floor:
        print(MARKER + json.dumps(vllm_speed.bf16_floor(args.worker_floor, vllm_speed.THREADS)), flush=True)
        return 0
    if args.worker_gguf:
        print(MARKER + json.dumps(llamacpp_worker(args.worker_gguf, vllm_speed.THREADS, args.llamacpp_prompt_batch)),
              flush=True)
        return 0
    code = ("from batchpilot.model.loader import default_gguf_path, default_model_dir; "
            "print(default_gguf_path()); print(default_model_dir())")
    out = subprocess.run([str(vllm_speed.PYTHONS["batchpilot"]), "-c", code], capture_output=True, text=True,
                         check=True)
    gguf, folder = out.stdout.split()
    contenders = ("bf16", "int4", "llama.cpp Q4_1", "bf16 floor")
    rows = []
    for rnd in range(args.rounds):
        order = contenders[rnd % 4:] + contenders[: rnd % 4]
        res = {}
        for c in order:
            if c in ("llama.cpp Q4_1", "bf16 floor"):
                python = args.llamacpp_python if c == "llama.cpp Q4_1" else str(vllm_speed.PYTHONS["batchpilot"])
                flag = ["--worker-gguf", gguf] if c == "llama.cpp Q4_1" else ["--worker-floor", folder]
                r = subprocess.run([python, __file__, "--llamacpp-python", args.llamacpp_python,
                                    "--llamacpp-prompt-batch", str(args.llamacpp_prompt_batch), *flag],
                                   capture_output=True, text=True, timeout=900,
                                   env={"OMP_NUM_THREADS": str(vllm_speed.THREADS), "PATH": "/usr/bin:/bin"})
                if r.returncode != 0:
                    raise RuntimeError(r.stderr[-2000:])
                line = next(x for x in reversed(r.stdout.splitlines()) if x.startswith(MARKER))
                res[c] = json.loads(line[len(MARKER):])
            else:
                res[c] = vllm_speed.worker("batchpilot", folder, "decode:1", "bfloat16", None if c == "bf16" else c)
        rows.append({"round": rnd, "order": order, "results": res})
        print(f"round {rnd} ({order[0]} first): " + "  ".join(f"{c} {res[c]['step_ms']:.2f} ms" for c in contenders)
              + f"  bf16 / floor {res['bf16']['step_ms'] / res['bf16 floor']['step_ms']:.2f}"
              f" ({res['bf16 floor']['read_gb_s']:.1f} GB/s)", flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"gguf": gguf, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
