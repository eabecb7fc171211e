"""Decode step time and prefill throughput of batchpilot's forward pass vs transformers.

Usage: python benchmarks/model_speed.py [--threads 2] [--dtype bfloat16] [--batches 1,8,32,128]

Decode: `batch` sequences at context `--context`, one token each, timed over `--iters` steps
after a warm-up. Prefill: one 512-token prompt. transformers is measured the same way
(one forward with its KV cache of the same context) in the same process and run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from batchpilot.engine.outputs import ScheduledRequest, SchedulerOutput
from batchpilot.engine.request import Request
from batchpilot.executors.torch_runner import TorchRunner
from batchpilot.model.llama import LlamaModel
from batchpilot.model.loader import load_checkpoint
from batchpilot.sampling_params import SamplingParams


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ours_decode(runner: TorchRunner, batch: int, context: int, iters: int) -> float:
    bs = runner.block_size
    blocks_per = -(-(context + 1) // bs)
    params = SamplingParams(temperature=0)
    sched = []
    for i in range(batch):
        req = Request(f"d{i}", list(range(100, 100 + context)), params, 0.0)
        req.output_token_ids.append(5)
        req.num_computed_tokens = context
        table = list(range(i * blocks_per, (i + 1) * blocks_per))
        sched.append(ScheduledRequest(req, context, 1, table, True))
    out = SchedulerOutput(sched, 0, batch)
    return timed(lambda: runner.execute(out), iters)


def ours_prefill(runner: TorchRunner, n: int, iters: int) -> float:
    req = Request("p", list(range(100, 100 + n)), SamplingParams(temperature=0), 0.0)
    table = list(range(-(-n // runner.block_size)))
    out = SchedulerOutput([ScheduledRequest(req, 0, n, table, True)], n, 0)
    return timed(lambda: runner.execute(out), iters)


def hf_decode(model, batch: int, context: int, iters: int) -> float:
    ids = torch.randint(100, 10000, (batch, context))
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        nxt = torch.randint(100, 10000, (batch, 1))

        def step():  # one decode token on a context of `context`, then drop it again
            model(nxt, cache=cache, use_cache=True)
            cache.crop(-1)

        return timed(step, iters)


def hf_prefill(model, n: int, iters: int) -> float:
    ids = torch.randint(100, 10000, (1, n))
    with torch.inference_mode():
        return timed(lambda: model(ids, use_cache=False, logits_to_keep=1), iters)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    ckpt = load_checkpoint(args.model)
    model = LlamaModel(ckpt.args, ckpt.weights, dtype)
    blocks = max(batches) * (-(-(args.context + 1) // 16)) + 64
    runner = TorchRunner(model, blocks, 16)
    rows = []
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=dtype).eval()
    for b in batches:
        row = {"batch": b, "ours_ms": 1000 * ours_decode(runner, b, args.context, args.iters)}
        if hf is not None:
            row["transformers_ms"] = 1000 * hf_decode(hf, b, args.context, args.iters)
        rows.append(row)
        print(json.dumps(row), flush=True)
    prefill = {"prefill_tokens": args.prefill,
               "ours_tok_s": args.prefill / ours_prefill(runner, args.prefill, args.iters)}
    if hf is not None:
        prefill["transformers_tok_s"] = args.prefill / hf_prefill(hf, args.prefill, args.iters)
    print(json.dumps(prefill))
    result = {"threads": args.threads, "dtype": args.dtype, "context": args.context, "decode": rows,
              "prefill": prefill}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
