"""The chosen dataset as requests, for every load generator (bench serve / capacity / compare over
HTTP, bench throughput through the offline engine): the flags, and one function from them to
requests, so a workload named the same way is the same requests in each."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from batchpilot.bench.datasets import (
    BenchRequest,
    builtin_conversations,
    length_dist,
    sharegpt_requests,
    synthetic_requests,
    traced_requests,
)
from batchpilot.bench.serve import Payload
from batchpilot.bench.traces import add_trace_args, trace_requests
from batchpilot.model.tokenizer import TextTokenizer

BUILTIN_OUTPUT_CAP = 512  # max_tokens of the bundled real-text prompts unless --output-len/--output-dist say


def add_workload_args(p: argparse.ArgumentParser, tokenizer_flag: bool = True) -> None:
    """The dataset flags; `tokenizer_flag` for the HTTP clients (the offline engine has its model's)."""
    p.add_argument("--dataset-name", default="random", choices=["random", "sharegpt", "builtin", "trace"],
                   help="random token ids, a ShareGPT file (--dataset-path), the bundled real-text prompts, "
                        "or a timed trace (--dataset-path: lengths and arrival times)")
    p.add_argument("--dataset-path", "--dataset", default=None, dest="dataset_path",
                   help="ShareGPT-format JSON (implies sharegpt unless --dataset-name trace), or a trace file")
    p.add_argument("--input-len", "--random-input-len", type=int, default=None, dest="input_len",
                   help="random: fixed prompt tokens (default 256)")
    p.add_argument("--output-len", "--random-output-len", type=int, default=None, dest="output_len",
                   help="random: fixed output tokens (default 128), always generated in full as vLLM's random "
                        f"dataset does; builtin: cap (default {BUILTIN_OUTPUT_CAP})")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random: lengths uniform in [N*(1-R), N*(1+R)] around --input-len/--output-len (vLLM's)")
    p.add_argument("--input-dist", default=None, help="random: uniform:LOW:HIGH or lognormal:MEDIAN:SIGMA")
    p.add_argument("--output-dist", default=None, help="random: uniform:LOW:HIGH or lognormal:MEDIAN:SIGMA; "
                                                       "builtin: caps drawn from it")
    p.add_argument("--ignore-eos", action="store_true",
                   help="always generate max_tokens (sharegpt, builtin; random and trace always do)")
    if tokenizer_flag:
        p.add_argument("--tokenizer", default=None, help="model folder or .gguf whose tokenizer builds prompts "
                       "(default: the default model)")
    add_trace_args(p)


def workload_requests(args: argparse.Namespace, tokenizer: TextTokenizer, n: int, seed: int
                      ) -> tuple[list[BenchRequest], bool]:
    """n requests of the chosen dataset, deterministic for a seed, and whether they ignore EOS
    (random and trace lengths are generated in full, as vLLM's random dataset; the others end
    where the model stops unless --ignore-eos)."""
    name = args.dataset_name
    if name == "random" and args.dataset_path:
        name = "sharegpt"
    if name == "builtin":
        capped = args.output_len is not None or args.output_dist is not None
        caps = (length_dist(args.output_len, args.output_dist, "output", 128).sample(np.random.default_rng(seed), n)
                if capped else [BUILTIN_OUTPUT_CAP] * n)
        reqs = []
        for messages, cap in zip(builtin_conversations(n, seed), caps):
            prompt = tokenizer.apply_chat_template(messages)
            reqs.append(BenchRequest(prompt, len(tokenizer.encode(prompt)), int(cap), messages=messages))
        return reqs, args.ignore_eos
    if name == "trace":
        traced = trace_requests(args.dataset_path, args, n, tokenizer.encode)
        reqs = traced_requests([t.prompt_len for t in traced], [t.output_len for t in traced],
                               tokenizer.vocab_size, seed, tokenizer.num_added_tokens)
        if not args.ignore_trace_times:
            for r, t in zip(reqs, traced):
                r.arrival_s = t.arrival_s
        return reqs, True
    if name == "sharegpt":
        if not args.dataset_path:
            raise ValueError("--dataset-name sharegpt needs --dataset-path")
        return sharegpt_requests(Path(args.dataset_path), n, tokenizer.encode, seed), args.ignore_eos
    ratio = args.random_range_ratio
    if not 0 <= ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    in_dist = length_dist(args.input_len, args.input_dist, "input", 256).widened(ratio)
    out_dist = length_dist(args.output_len, args.output_dist, "output", 128).widened(ratio)
    return synthetic_requests(n, in_dist, out_dist, tokenizer.vocab_size, seed, tokenizer.num_added_tokens), True


def build_payloads(args: argparse.Namespace, tokenizer: TextTokenizer, model: str, n: int, seed: int) -> list[Payload]:
    """The workload's requests as HTTP bodies; greedy, as vLLM's benchmark. Chats go as messages (the
    server renders its own template)."""
    reqs, ignore_eos = workload_requests(args, tokenizer, n, seed)
    common = {"model": model, "temperature": 0.0}
    payloads = []
    for r in reqs:
        if r.messages is not None:
            body = {**common, "messages": r.messages, "max_tokens": r.max_tokens}
            payloads.append(Payload("/v1/chat/completions", body | ({"ignore_eos": True} if ignore_eos else {})))
        else:
            body = {**common, "prompt": r.prompt, "max_tokens": r.max_tokens, "ignore_eos": ignore_eos}
            payloads.append(Payload("/v1/completions", body, r.prompt_len, r.arrival_s))
    return payloads


def parse_sla_mix(text: str) -> dict[str, float]:
    """'interactive:0.3,batch:0.7' -> {name: share}; shares are normalised to sum to 1."""
    mix: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        name, _, share = item.partition(":")
        try:
            value = float(share)
        except ValueError:
            raise ValueError(f"--sla-mix: expected NAME:SHARE,..., got {item!r}") from None
        if not name or name in mix or not 0 < value < float("inf"):
            raise ValueError(f"--sla-mix: expected NAME:SHARE with a positive share and each name once, got {item!r}")
        mix[name] = value
    if not mix:
        raise ValueError(f"--sla-mix: expected NAME:SHARE,..., got {text!r}")
    total = sum(mix.values())
    return {name: share / total for name, share in mix.items()}


def assign_sla_classes(payloads: list[Payload], mix: dict[str, float], seed: int) -> None:
    """Put each payload in a class drawn from the mix (seeded: the same requests get the same classes)."""
    rng = np.random.default_rng(seed + 7)
    names = list(mix)
    for payload, k in zip(payloads, rng.choice(len(names), size=len(payloads), p=list(mix.values()))):
        payload.body["sla_class"] = names[k]
