"""`batchpilot bench throughput`: requests through the offline engine, all at t=0 or at arrival times.

With `--request-rate` requests are added when their (seeded, gamma) arrival time has come,
the same arrivals `bench serve` and `simulate` draw: latency under load without HTTP in the way.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from batchpilot.bench.datasets import (
    BenchRequest,
    builtin_conversations,
    length_dist,
    sharegpt_requests,
    synthetic_requests,
    traced_requests,
)
from batchpilot.bench.metrics import RequestRecord, summarize
from batchpilot.bench.results import write_json
from batchpilot.bench.serve import arrival_times
from batchpilot.bench.traces import add_trace_args, at_rate, trace_requests
from batchpilot.config import EngineConfig
from batchpilot.sampling_params import SamplingParams


def add_throughput_parser(sub, add_engine_args, engine_config) -> None:
    p = sub.add_parser("throughput", help="offline throughput: all requests at t=0 (or at --request-rate)")
    add_engine_args(p)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--input-dist", default=None, help="uniform:LOW:HIGH or lognormal:MEDIAN:SIGMA")
    p.add_argument("--output-dist", default=None, help="uniform:LOW:HIGH or lognormal:MEDIAN:SIGMA")
    p.add_argument("--dataset-name", default="random", choices=["random", "sharegpt", "builtin", "trace"],
                   help="random token ids, a ShareGPT file (--dataset), the bundled real-text prompts, or a "
                        "timed trace (--dataset: lengths and arrival times)")
    p.add_argument("--dataset", default=None, help="ShareGPT JSON (implies sharegpt unless --dataset-name trace), "
                                                   "or a trace file")
    p.add_argument("--request-rate", type=float, default=None,
                   help="arrivals per second, or inf (default: a trace's own times, else all at 0)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times (1: Poisson)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate the full output length")
    p.add_argument("--output-json", default=None)
    p.add_argument("--no-progress", action="store_true")
    add_trace_args(p)
    p.set_defaults(func=lambda args: run_throughput(args, engine_config(args)))


def run_throughput(args: argparse.Namespace, config: EngineConfig) -> int:
    from batchpilot.llm import LLM

    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    in_dist = length_dist(args.input_len, args.input_dist, "input", 256)
    out_dist = length_dist(args.output_len, args.output_dist, "output", 128)
    rate = float("inf") if args.request_rate is None else args.request_rate
    arrivals = arrival_times(args.num_prompts, rate, args.burstiness, args.seed).tolist()
    llm = LLM.from_config(config)
    engine = llm.engine
    traced = (trace_requests(args.dataset, args, args.num_prompts, llm.tokenizer.encode)
              if args.dataset_name == "trace" else None)
    if traced is not None:
        # Lengths from the trace: random token prompts, outputs forced to the traced length; its own
        # arrival times, or rescaled to a given rate (as bench serve and simulate do).
        requests = traced_requests([r.prompt_len for r in traced], [r.output_len for r in traced],
                                   llm.tokenizer.vocab_size, args.seed, llm.tokenizer.num_added_tokens)
        args.ignore_eos = True
        arrivals = (arrival_times(len(traced), rate, args.burstiness, args.seed).tolist() if args.ignore_trace_times
                    else at_rate([r.arrival_s for r in traced], args.request_rate))
    elif args.dataset or args.dataset_name == "sharegpt":
        if not args.dataset:
            raise ValueError("--dataset-name sharegpt needs --dataset PATH")
        requests = sharegpt_requests(Path(args.dataset), args.num_prompts, llm.tokenizer.encode, args.seed)
    elif args.dataset_name == "builtin":
        # Real prompts with model-chosen output lengths; --output-len caps them (default 512).
        capped = args.output_len is not None or args.output_dist is not None
        n = args.num_prompts
        cap = out_dist.sample(np.random.default_rng(args.seed), n) if capped else [512] * n
        prompts = [llm.tokenizer.apply_chat_template(c) for c in builtin_conversations(args.num_prompts, args.seed)]
        requests = [BenchRequest(p, len(llm.tokenizer.encode(p)), int(m)) for p, m in zip(prompts, cap)]
    else:
        requests = synthetic_requests(args.num_prompts, in_dist, out_dist, llm.tokenizer.vocab_size,
                                      args.seed, llm.tokenizer.num_added_tokens)
    start = time.perf_counter()
    first: dict[str, float] = {}
    records: dict[str, RequestRecord] = {}
    meta: dict[str, tuple[int, float]] = {}
    bar = tqdm(total=len(requests), disable=args.no_progress, desc="requests")
    n_out: dict[str, int] = {}
    i = 0
    while i < len(requests) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while i < len(requests) and arrivals[i] <= now:
            r = requests[i]
            params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=r.max_tokens,
                                    ignore_eos=args.ignore_eos, seed=args.seed + i)
            meta[engine.add_request(r.prompt, params)] = (r.prompt_len, arrivals[i])
            i += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[i] - now))
            continue
        outputs = engine.step()
        now = time.perf_counter() - start
        for o in outputs:
            n_out[o.request_id] = n_out.get(o.request_id, 0) + len(o.outputs[0].token_ids)
            first.setdefault(o.request_id, now)
            if o.finished:
                prompt_len, arrival = meta[o.request_id]
                records[o.request_id] = RequestRecord(prompt_len, n_out[o.request_id],
                                                      first[o.request_id] - arrival, now - arrival)
                bar.update(1)
    bar.close()
    duration = time.perf_counter() - start
    c, state = engine.counters, engine.snapshot()
    result = summarize(list(records.values()), duration)
    result |= {
        "num_preemptions": state.num_preemptions,
        "prefix_cache_hit_rate": state.prefix_cache_hits / state.prefix_cache_queries if state.prefix_cache_queries
        else 0.0,
        "num_steps": c.num_steps,
        "scheduler_overhead_frac": c.schedule_time_s / c.busy_time_s if c.busy_time_s else 0.0,
        "batch_controller": args.batch_controller,
        "max_num_seqs": args.max_num_seqs,
        "dtype": args.dtype,
        "threads": args.threads,
        "request_rate": "trace" if traced is not None and args.request_rate is None else rate,
    }
    print_table(result)
    if args.output_json:
        write_json(args.output_json, result)
    return 0


def print_table(result: dict) -> None:
    width = max(len(k) for k in result)
    print("=" * (width + 16))
    for k, v in result.items():
        text = (f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}") if isinstance(v, float) else str(v)
        print(f"{k:<{width}}  {text:>12}")
    print("=" * (width + 16))
