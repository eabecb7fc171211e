"""Time `sample` on a batch of random rows (temperature only, top_p 1: what `bench throughput` and
vLLM's `LLM.generate` sample at), native kernel against the torch path, on [B, vocab] bf16 logits,
the two alternated for a few rounds (medians and ranges). Run from an older checkout (PYTHONPATH) it
times that version's sampler twice.

    python benchmarks/sampler_speed.py --batches 8,32,128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from batchpilot.model import kernels
from batchpilot.model import sampler as sampler_module
from batchpilot.model.sampler import SamplingRow, sample
from batchpilot.sampling_params import SamplingParams


def time_sample(batch: int, vocab: int, native: bool, reps: int) -> float:
    """Milliseconds per call of `sample` on fresh bf16 logits of the model's scale."""
    logits = (torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    rows = [SamplingRow(SamplingParams(temperature=1.0, top_p=1.0, max_tokens=16), [],
                        torch.Generator().manual_seed(i)) for i in range(batch)]
    saved = kernels.native_available
    if not native:  # the torch path, as on a host without a C compiler
        sampler_module.kernels.native_available = lambda: False
    try:
        for _ in range(3):
            sample(logits.clone(), rows)
        copies = [logits.clone() for _ in range(reps)]
        start = time.perf_counter()
        for x in copies:
            sample(x, rows)
        return 1000 * (time.perf_counter() - start) / reps
    finally:
        sampler_module.kernels.native_available = saved


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="8,32,128")
    p.add_argument("--vocab", type=int, default=49152, help="the default model's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for b in (int(x) for x in args.batches.split(",")):
        ours, torch_path = [], []
        for _ in range(args.rounds):  # alternated: the host's speed moves within seconds
            ours.append(time_sample(b, args.vocab, True, args.reps))
            torch_path.append(time_sample(b, args.vocab, False, args.reps))
        a, t = statistics.median(ours), statistics.median(torch_path)
        print(f"batch {b:4d}: native {a:7.2f} ms (range {min(ours):.2f}-{max(ours):.2f})   torch path {t:7.2f} ms "
              f"(range {min(torch_path):.2f}-{max(torch_path):.2f})   median ratio {t / a:.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
