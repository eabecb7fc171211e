"""What constrained decoding costs: output tok/s with 0%, 50% and 100% of requests under a JSON
grammar, alternated in one run, and the grammar's own time per step.

    python benchmarks/structured_speed.py --threads 2 --rounds 3

Each configuration runs the same `--num-prompts` chat prompts offline (all at once), `--max-tokens`
each with ignore_eos, so every configuration generates the same number of tokens. The constrained
requests follow a grammar that never ends (a JSON array of objects, each checked against a schema)
and EOS is biased away, so they run their full length like the free ones: the difference in tok/s
is the cost of the masks (computing them, and the float32 copy of those rows' logits), not a
difference in lengths. The grammar's time (mask + accept) is measured by wrapping the matcher's calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from batchpilot import LLM, SamplingParams
from batchpilot.model import grammar as grammar_module
from batchpilot.sampling_params import StructuredOutputsParams

ITEM = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                                         "city": {"type": "string", "maxLength": 40}},
        "required": ["name", "age", "city"], "additionalProperties": False}
ENDLESS_JSON = 'start: "[" item ("," item)*\nitem: %json ' + json.dumps(ITEM)
TOPICS = ["pirates", "cooks", "nurses", "dragons", "poets", "children", "judges", "clowns", "sailors", "painters",
          "pilots", "farmers", "bakers", "doctors", "robots", "singers"]


class GrammarTimer:
    """Wraps Grammar.fill_bitmask and accept to add up their time."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = 0
        cls = grammar_module.Grammar
        self.originals = (cls.fill_bitmask, cls.accept)
        timer = self

        def fill(self, pointer, num_bytes):
            t = time.perf_counter()
            timer.originals[0](self, pointer, num_bytes)
            timer.seconds += time.perf_counter() - t
            timer.calls += 1

        def accept(self, token):
            t = time.perf_counter()
            timer.originals[1](self, token)
            timer.seconds += time.perf_counter() - t

        cls.fill_bitmask, cls.accept = fill, accept


def run(llm: LLM, prompts: list[str], share: float, max_tokens: int, timer: GrammarTimer) -> dict:
    free = SamplingParams(temperature=0.7, seed=1, max_tokens=max_tokens, ignore_eos=True)
    # The grammar allows EOS after any item; the bias keeps these rows going to max_tokens too.
    constrained = SamplingParams(temperature=0.7, seed=1, max_tokens=max_tokens, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(grammar=ENDLESS_JSON),
                                 logit_bias={llm.tokenizer.eos_token_id: -100})
    every = round(1 / share) if share else 0
    params = [constrained if every and i % every == 0 else free for i in range(len(prompts))]
    timer.seconds, timer.calls = 0.0, 0
    steps = llm.engine.counters.num_steps
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    num_steps = llm.engine.counters.num_steps - steps
    return {"share": share, "output_tokens": tokens, "seconds": elapsed, "output_throughput": tokens / elapsed,
            "grammar_ms_per_step": 1e3 * timer.seconds / num_steps, "mask_calls": timer.calls,
            "steps": num_steps}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(max_num_seqs=args.max_num_seqs, kv_cache_gib=1.0)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": f"List some {t} as JSON."}])
               for t in (TOPICS * (args.num_prompts // len(TOPICS) + 1))[: args.num_prompts]]
    timer = GrammarTimer()
    run(llm, prompts[:8], 0.5, 16, timer)  # warm-up: the grammar compiled and cached, the model's kernels
    shares = [0.0, 0.5, 1.0]
    results: dict[str, list[dict]] = {str(s): [] for s in shares}
    for rnd in range(args.rounds):
        for share in shares if rnd % 2 == 0 else shares[::-1]:
            r = run(llm, prompts, share, args.max_tokens, timer)
            results[str(share)].append(r)
            print(f"round {rnd} constrained {share:4.0%}: {r['output_throughput']:7.1f} tok/s over {r['steps']} steps, "
                  f"grammar {r['grammar_ms_per_step']:.3f} ms/step ({r['mask_calls']} masks)", flush=True)
    base = statistics.median(r["output_throughput"] for r in results["0.0"])
    for share in shares[1:]:
        rows = results[str(share)]
        med = statistics.median(r["output_throughput"] for r in rows)
        paired = [r["output_throughput"] / f["output_throughput"] for r, f in zip(rows, results["0.0"])]
        print(f"constrained {share:4.0%}: median {med:.1f} tok/s = {med / base:.3f} of unconstrained "
              f"(per round {', '.join(f'{x:.3f}' for x in paired)}); grammar "
              f"{statistics.median(r['grammar_ms_per_step'] for r in rows):.3f} ms/step")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
