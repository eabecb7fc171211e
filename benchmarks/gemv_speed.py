"""Our bf16 GEMV (csrc/gemv.c) against oneDNN's prepacked matmul, the two copies linear.py keeps, on the
default model's projection shapes, at the row counts of decode and prefill steps.

Weights are small enough to stay in L2/L3 between repetitions, so at many rows this measures the
kernels' arithmetic (GFLOP/s against the host's bf16 peak), at few rows mostly call overhead and
cache reads; the memory-bound batch-1 case is vllm_speed.py's decode:1. The two kernels run one after the
other for each shape and row count; each figure is the median of the repetitions.

    python benchmarks/gemv_speed.py [--rows 1,4,16,32,64,128,256,512] [--reps 40]
"""

from __future__ import annotations

import argparse

import torch
from model_speed import timed  # the median of timed repetitions after a warm-up

from batchpilot.model import kernels
from batchpilot.model.linear import Linear, bf16_matmul_native

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,4,16,32,64,128,256,512")
    p.add_argument("--reps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not (kernels.gemv_available() and bf16_matmul_native()):
        raise SystemExit("needs our native GEMV and oneDNN's bf16 matmul in hardware (AVX512-BF16 or AMX)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{'shape':8s} {'rows':>5s} {'ours GF/s':>10s} {'oneDNN GF/s':>12s} {'ours / oneDNN':>14s}")
    for name, (n, k) in SHAPES.items():
        layer = Linear((torch.randn(n, k) * 0.05).to(torch.bfloat16))
        layer.pack()  # the two copies the engine keeps: oneDNN's prepacked weight and our GEMV's tiles
        packed, tiles = layer.packed, layer.gemv
        for m in rows:
            x = torch.randn(m, k).to(torch.bfloat16)
            reps = max(3, args.reps // 4) if name == "lm_head" else args.reps
            ours = timed(lambda x=x, w=tiles: kernels.gemv(x, w, None), reps)
            theirs = timed(lambda x=x, w=packed: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), reps)
            flops = 2 * m * n * k
            print(f"{name:8s} {m:5d} {flops / ours / 1e9:10.0f} {flops / theirs / 1e9:12.0f} {theirs / ours:14.2f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
