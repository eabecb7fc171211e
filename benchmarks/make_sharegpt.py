"""A ShareGPT-format file of real text, made offline: the bundled real-text prompts (instructions on
excerpts of Python's documentation) with the default model's own replies.

    python benchmarks/make_sharegpt.py --num 300 --output docs/results/builtin_sharegpt.json

No ShareGPT file can be downloaded here (no hub), and the tournament wants one: every reader of
the format (`--dataset-name sharegpt`, `simulate --dataset FILE`) takes this file as it would the real
one. The replies are sampled (temperature 0.7, at most `--max-tokens`), so reply lengths are the
model's choice, as in the real data.
"""

from __future__ import annotations

import argparse
import json
import sys

from batchpilot.bench.datasets import builtin_conversations
from batchpilot.llm import LLM
from batchpilot.sampling_params import SamplingParams


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    if args.num < 1 or args.max_tokens < 1:
        p.error("--num and --max-tokens must be at least 1")
    conversations = builtin_conversations(args.num, args.seed)
    llm = LLM(threads=args.threads, seed=args.seed)
    params = SamplingParams(temperature=0.7, max_tokens=args.max_tokens, seed=args.seed)
    outputs = llm.chat(conversations, params)
    data = [{"id": f"builtin-{i}", "conversations": [{"from": "human", "value": conv[0]["content"]},
                                                    {"from": "gpt", "value": out.outputs[0].text}]}
            for i, (conv, out) in enumerate(zip(conversations, outputs))]
    with open(args.output, "w") as f:
        json.dump(data, f, indent=0)
    lengths = sorted(len(out.outputs[0].token_ids) for out in outputs)
    print(f"{len(data)} conversations -> {args.output}; reply tokens median {lengths[len(lengths) // 2]}, "
          f"max {lengths[-1]}, {sum(n == args.max_tokens for n in lengths)} cut at --max-tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
