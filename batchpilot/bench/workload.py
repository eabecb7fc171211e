"""Turn a dataset choice into HTTP payloads for the load generator (shared by serve/capacity/compare)."""

from __future__ import annotations

import argparse
from pathlib import Path

from batchpilot.bench.datasets import (
    builtin_conversations,
    length_dist,
    sharegpt_requests,
    synthetic_requests,
    traced_requests,
)
from batchpilot.bench.serve import Payload
from batchpilot.bench.traces import add_trace_args, trace_requests
from batchpilot.model.tokenizer import TextTokenizer


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-name", default="random", choices=["random", "sharegpt", "builtin", "trace"])
    p.add_argument("--dataset-path", "--dataset", default=None, dest="dataset_path",
                   help="ShareGPT-format JSON (sharegpt), or a trace file (trace: lengths and arrival times)")
    p.add_argument("--input-len", "--random-input-len", type=int, default=None, dest="input_len",
                   help="random: fixed prompt tokens (default 256)")
    p.add_argument("--output-len", "--random-output-len", type=int, default=None, dest="output_len",
                   help="random: fixed output tokens (default 128), always generated in full as vLLM's random "
                        "dataset does; builtin: cap")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random: lengths uniform in [N*(1-R), N*(1+R)] around --input-len/--output-len (vLLM's)")
    p.add_argument("--input-dist", default=None, help="random: uniform:LOW:HIGH or lognormal:MEDIAN:SIGMA")
    p.add_argument("--output-dist", default=None, help="random: uniform:LOW:HIGH or lognormal:MEDIAN:SIGMA")
    p.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens (sharegpt; random does)")
    p.add_argument("--tokenizer", default=None, help="model folder or .gguf whose tokenizer builds prompts "
                   "(default: the default model)")
    add_trace_args(p)


def build_payloads(args: argparse.Namespace, tokenizer: TextTokenizer, model: str, n: int, seed: int) -> list[Payload]:
    """n requests of the chosen dataset, deterministic for a seed; greedy, as vLLM's benchmark."""
    common = {"model": model, "temperature": 0.0}
    if args.dataset_name == "builtin":
        cap = args.output_len or 512
        return [Payload("/v1/chat/completions", {**common, "messages": m, "max_tokens": cap})
                for m in builtin_conversations(n, seed)]
    if args.dataset_name == "trace":
        traced = trace_requests(args.dataset_path, args, n, tokenizer.encode)
        reqs = traced_requests([t.prompt_len for t in traced], [t.output_len for t in traced],
                               tokenizer.vocab_size, seed, tokenizer.num_added_tokens)
        return [Payload("/v1/completions", {**common, "prompt": r.prompt, "max_tokens": r.max_tokens,
                                            "ignore_eos": True}, r.prompt_len,
                        None if args.ignore_trace_times else t.arrival_s)
                for r, t in zip(reqs, traced)]
    if args.dataset_name == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path")
        reqs = sharegpt_requests(Path(args.dataset_path), n, tokenizer.encode, seed)
    else:
        specials = tokenizer.num_added_tokens
        ratio = args.random_range_ratio
        if not 0 <= ratio < 1:
            raise ValueError(f"--random-range-ratio must be in [0, 1), got {ratio}")
        in_dist = length_dist(args.input_len, args.input_dist, "input", 256).widened(ratio)
        out_dist = length_dist(args.output_len, args.output_dist, "output", 128).widened(ratio)
        reqs = synthetic_requests(n, in_dist, out_dist, tokenizer.vocab_size, seed, specials)
    ignore_eos = args.ignore_eos or args.dataset_name == "random"
    return [Payload("/v1/completions", {**common, "prompt": r.prompt, "max_tokens": r.max_tokens,
                                        "ignore_eos": ignore_eos}, r.prompt_len) for r in reqs]
