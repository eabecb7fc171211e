"""`batchpilot bench throughput`: requests through the offline engine, all at t=0 or at arrival times.

With `--request-rate` requests are added when their (seeded, gamma) arrival time has come,
the same arrivals `bench serve` and `simulate` draw: latency under load without HTTP in the way.
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from batchpilot.bench.metrics import RequestRecord, summarize
from batchpilot.bench.results import print_result, write_json
from batchpilot.bench.serve import arrival_offsets
from batchpilot.bench.workload import add_workload_args, workload_requests
from batchpilot.config import EngineConfig
from batchpilot.sampling_params import SamplingParams


def add_throughput_parser(sub, add_engine_args, engine_config) -> None:
    p = sub.add_parser("throughput", help="offline throughput: all requests at t=0 (or at --request-rate)")
    add_engine_args(p)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=None,
                   help="arrivals per second, or inf (default: a trace's own times, else all at 0)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times (1: Poisson)")
    p.add_argument("--output-json", default=None)
    p.add_argument("--no-progress", action="store_true")
    add_workload_args(p, tokenizer_flag=False)
    p.set_defaults(func=lambda args: run_throughput(args, engine_config(args)))


def run_throughput(args: argparse.Namespace, config: EngineConfig) -> int:
    from batchpilot.llm import LLM

    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    rate = float("inf") if args.request_rate is None else args.request_rate
    llm = LLM.from_config(config)
    engine = llm.engine
    requests, ignore_eos = workload_requests(args, llm.tokenizer, args.num_prompts, args.seed)
    timed = any(r.arrival_s is not None for r in requests)
    arrivals = arrival_offsets([r.arrival_s for r in requests], args.request_rate, args.burstiness, args.seed)
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
                                    ignore_eos=ignore_eos, seed=args.seed + i)
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
        "request_rate": "trace" if timed and args.request_rate is None else rate,
    }
    print_result(result, f"bench throughput ({args.dataset_name}, {len(requests)} requests, {args.batch_controller})")
    if args.output_json:
        write_json(args.output_json, result)
    return 0
