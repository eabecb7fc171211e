"""Prefix caching on against off, in one run with the two alternated: TTFT, output tok/s and hit
rate on two workloads where real traffic repeats itself.

    python benchmarks/prefix_cache.py --threads 2 --output-json docs/results/prefix_cache.json

- multi-turn: conversations of 3-6 turns over the bundled real text (`builtin` dataset: an
  instruction on an excerpt of Python's documentation, then short follow-up questions). A fixed
  number of conversations are in flight (closed loop: a turn is sent when the previous answer is
  complete) and every turn resends the whole history, as chat clients do.
- multi-turn-open: the same conversations started at Poisson times, each next turn sent a think
  time after the previous answer: the same offered load with caching on and off (the issue's
  "at equal load"), where the closed loop offers more when it is served faster.
- system-prompt: short questions behind one ~500-token system prompt, arriving at a fixed rate.

Both use greedy decoding with ignore_eos and a fixed max_tokens, so each configuration does the
same work; the engine runs in process (as `bench throughput`), the default model, bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import deque

import numpy as np

from batchpilot.bench.datasets import builtin_conversations
from batchpilot.bench.results import write_json
from batchpilot.config import CacheConfig, ControllerConfig, EngineConfig
from batchpilot.llm import build_engine
from batchpilot.sampling_params import SamplingParams

FOLLOW_UPS = (
    "Can you say that more briefly?",
    "Give one more example.",
    "What is the most important point here?",
    "Explain the second point in more detail.",
    "Summarise everything so far in one sentence.",
    "What would a beginner find hardest about this?",
)
SYSTEM = ("You are the support assistant of a Python training company. Answer questions about the "
          "Python language and its standard library. Be accurate and brief: one short paragraph, or "
          "a short list when the question asks for steps. Prefer examples that run on Python 3.11 "
          "and later, name the module a function comes from, and say when a feature is new. If a "
          "question is ambiguous, answer the most likely reading and say which reading you chose. "
          "Never invent functions, arguments or behaviour; when you do not know, say so and point "
          "to the relevant section of the official documentation. ")


def engine_for(args: argparse.Namespace, caching: bool):
    return build_engine(EngineConfig(
        threads=args.threads, cache=CacheConfig(kv_cache_gib=args.kv_cache_gib, enable_prefix_caching=caching),
        controller=ControllerConfig(name=args.batch_controller)))


def multi_turn(engine, args: argparse.Namespace) -> dict:
    """Closed loop: `concurrency` conversations in flight, a turn sent as soon as the previous answer
    is complete; each turn's TTFT from its send."""
    return _conversations(engine, args, open_loop=False)


def multi_turn_open(engine, args: argparse.Namespace) -> dict:
    """Open loop: conversations start at Poisson times (`conversation_rate` per second), and each
    next turn is sent `think_s` after the previous answer completes. The offered load is the same
    with caching on and off (as long as both keep up), which the closed loop's is not."""
    return _conversations(engine, args, open_loop=True)


def _conversations(engine, args: argparse.Namespace, open_loop: bool) -> dict:
    rng = np.random.default_rng(args.seed)
    tok = engine.tokenizer
    histories = builtin_conversations(args.conversations, args.seed)
    turns_left = [int(rng.integers(3, 7)) for _ in histories]
    follow_ups = [[FOLLOW_UPS[int(rng.integers(len(FOLLOW_UPS)))] for _ in range(6)] for _ in histories]
    if open_loop:
        starts = np.cumsum(rng.exponential(1 / args.conversation_rate, size=len(histories))).tolist()
        due, queued = sorted(zip(starts, range(len(histories)))), deque()
    else:
        due = [(0.0, c) for c in range(min(args.concurrency, len(histories)))]
        queued = deque(range(len(due), len(histories)))  # each starts when a conversation ends
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    sent_at, owner, answers, ttfts, out_tokens = {}, {}, {}, [], 0
    start = time.perf_counter()
    while due or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while due and due[0][0] <= now:
            at, c = due.pop(0)
            rid = engine.add_request(tok.apply_chat_template(histories[c]), params)
            sent_at[rid], owner[rid], answers[rid] = start + at, c, []
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, due[0][0] - now))
            continue
        for o in engine.step():
            ids = o.outputs[0].token_ids
            if ids and not answers[o.request_id]:
                ttfts.append(time.perf_counter() - sent_at[o.request_id])
            answers[o.request_id] += ids
            out_tokens += len(ids)
            if o.finished:
                c = owner.pop(o.request_id)
                turns_left[c] -= 1
                histories[c] = histories[c] + [{"role": "assistant", "content": tok.decode(answers.pop(o.request_id))}]
                done_at = time.perf_counter() - start
                if turns_left[c] > 0:
                    histories[c].append({"role": "user", "content": follow_ups[c][turns_left[c]]})
                    due.append((done_at + (args.think_s if open_loop else 0.0), c))
                elif queued:
                    due.append((done_at, queued.popleft()))
                due.sort()
    return _summary(engine, ttfts, out_tokens, time.perf_counter() - start)


def system_prompt(engine, args: argparse.Namespace) -> dict:
    """Questions behind one system prompt, Poisson arrivals at `rate` per second."""
    rng = np.random.default_rng(args.seed)
    tok = engine.tokenizer
    questions = [f"{FOLLOW_UPS[i % len(FOLLOW_UPS)]} (question {i} about module number {int(rng.integers(1000))})"
                 for i in range(args.questions)]
    prompts = [tok.apply_chat_template([{"role": "system", "content": SYSTEM * 4},
                                        {"role": "user", "content": q}]) for q in questions]
    arrivals = np.cumsum(rng.exponential(1 / args.rate, size=len(prompts)))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    sent_at, ttfts, out_tokens, i = {}, [], 0, 0
    start = time.perf_counter()
    while i < len(prompts) or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while i < len(prompts) and arrivals[i] <= now:
            sent_at[engine.add_request(prompts[i], params)] = start + arrivals[i]
            i += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, arrivals[i] - now))
            continue
        for o in engine.step():
            ids = o.outputs[0].token_ids
            if ids and o.request_id in sent_at:
                ttfts.append(time.perf_counter() - sent_at.pop(o.request_id))
            out_tokens += len(ids)
    return _summary(engine, ttfts, out_tokens, time.perf_counter() - start) | {
        "system_prompt_tokens": len(tok.encode(SYSTEM * 4))}


def _summary(engine, ttfts: list[float], out_tokens: int, duration: float) -> dict:
    kv = engine.scheduler.kv
    return {"mean_ttft_ms": 1000 * statistics.fmean(ttfts), "median_ttft_ms": 1000 * statistics.median(ttfts),
            "p90_ttft_ms": 1000 * float(np.percentile(ttfts, 90)), "output_throughput": out_tokens / duration,
            "duration": duration, "requests": len(ttfts),
            "prefix_cache_hit_rate": kv.num_prefix_hits / kv.num_prefix_queries if kv.num_prefix_queries else 0.0,
            "num_preemptions": engine.scheduler.num_preemptions_total}


WORKLOADS = {"multi-turn": multi_turn, "multi-turn-open": multi_turn_open, "system-prompt": system_prompt}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--batch-controller", default="combined")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--conversations", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=8, help="multi-turn: conversations in flight")
    p.add_argument("--conversation-rate", type=float, default=0.2,
                   help="multi-turn-open: conversations started per second (Poisson)")
    p.add_argument("--think-s", type=float, default=2.0,
                   help="multi-turn-open: seconds from an answer to the next turn")
    p.add_argument("--questions", type=int, default=48)
    p.add_argument("--rate", type=float, default=1.0, help="system-prompt: questions per second")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="rounds of (on, off), the order reversed on odd rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    results: dict[str, dict[str, list[dict]]] = {}
    for name in args.workloads.split(","):
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        for rnd in range(args.repeats):
            for mode in ("on", "off") if rnd % 2 == 0 else ("off", "on"):
                engine = engine_for(args, caching=mode == "on")
                r = WORKLOADS[name](engine, args)
                runs[mode].append(r)
                print(f"{name:<14} caching {mode:<3} TTFT mean {r['mean_ttft_ms']:8.1f} ms"
                      f"  p90 {r['p90_ttft_ms']:8.1f} ms  {r['output_throughput']:7.1f} out tok/s"
                      f"  hit rate {r['prefix_cache_hit_rate']:.2f}"
                      f"  (round {rnd})", flush=True)
                del engine
        results[name] = runs
        on, off = runs["on"], runs["off"]
        for k in range(len(on)):
            print(f"{name:<14} round {k}: TTFT off/on {off[k]['mean_ttft_ms'] / on[k]['mean_ttft_ms']:.2f}x, "
                  f"throughput on/off {on[k]['output_throughput'] / off[k]['output_throughput']:.2f}x")
    if args.output_json:
        write_json(args.output_json, {"args": vars(args), "results": results})
    print(json.dumps({n: {m: [round(r["mean_ttft_ms"], 1) for r in rs] for m, rs in v.items()}
                      for n, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
