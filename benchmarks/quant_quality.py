"""Quality of the default model's int8 and int4 weights against bf16: perplexity on held-out text
and greedy agreement on real chat prompts.

- Perplexity: the first --texts `pydoc_data` topics in name order with over 2,000 characters
  (Python's documentation, English technical prose; the quantization is calibrated on nothing, so
  any text is held out), each cut to --tokens tokens and scored teacher-forced in one prefill per
  text (LlamaModel.forward, every row's logits).
- Agreement: --prompts chat prompts of `bench.datasets.builtin_conversations` (seed 1), greedy,
  --max-tokens each; the share of bf16's tokens generated before the first difference, and the share
  of prompts whose whole output is the same. `--max-num-seqs 4` decodes at most 4 rows a step: the path
  a lone user's requests take (int4 then rounds the inputs to int8, csrc/qgemv.c).

    python benchmarks/quant_quality.py
    python benchmarks/quant_quality.py --model <the default model's GGUF>   # its own Q4_1 / Q8_0 blocks
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

MODES = (None, "int8", "int4")


def perplexity(model, token_lists: list[list[int]]) -> float:
    from batchpilot.model import kernels
    from batchpilot.model.attention import AttentionMetadata, PrefillChunk

    a = model.args
    nll, count = 0.0, 0
    for tokens in token_lists:
        n = len(tokens)
        caches = [(torch.zeros(a.num_kv_heads, n, a.head_dim, dtype=model.dtype),
                   torch.zeros(a.num_kv_heads, n, a.head_dim, dtype=model.dtype)) for _ in range(a.num_layers)]
        meta = AttentionMetadata(torch.arange(n), 16, 0, None, None, kernels.native_available(),
                                 [PrefillChunk(0, n, 0, None, None)])
        with torch.inference_mode():
            logits = model.forward(torch.tensor(tokens), torch.arange(n), caches, meta, torch.arange(n - 1)).float()
        nll += F.cross_entropy(logits, torch.tensor(tokens[1:]), reduction="sum").item()
        count += n - 1
    return math.exp(nll / count)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=40)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-num-seqs", type=int, default=256, help="rows a decode step may have (static limit)")
    p.add_argument("--model", default=None, help="a folder or GGUF file (default: the default model's folder)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    from pydoc_data.topics import topics

    from batchpilot import LLM, SamplingParams
    from batchpilot.bench.datasets import builtin_conversations
    from batchpilot.model.llama import LlamaModel
    from batchpilot.model.loader import load_checkpoint

    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.model)
    names = sorted(k for k, v in topics.items() if len(v) > 2000)[: args.texts]
    texts = [ckpt.tokenizer.encode(topics[k])[: args.tokens] for k in names]
    conversations = builtin_conversations(args.prompts, seed=1)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    results, reference = {}, None
    for mode in MODES:
        name = mode or "bf16"
        model = LlamaModel(ckpt.args, ckpt.weights, torch.bfloat16, mode)
        start = time.perf_counter()
        ppl = perplexity(model, texts)
        del model
        llm = LLM(args.model, quantization=mode, threads=args.threads, kv_cache_gib=0.5,
                  batch_controller="static", max_num_seqs=args.max_num_seqs)
        outputs = [o.outputs[0].token_ids for o in llm.chat(conversations, params)]
        del llm
        reference = reference or outputs
        before = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                     for a, b in zip(reference, outputs))
        same = sum(a == b for a, b in zip(reference, outputs))
        results[name] = {"perplexity": ppl, "tokens_before_first_difference": before / sum(map(len, reference)),
                         "identical_outputs": same / len(reference)}
        print(f"{name}: perplexity {ppl:.3f} over {sum(map(len, texts))} tokens of {len(texts)} texts; "
              f"greedy: {before / sum(map(len, reference)):.1%} of bf16's tokens before the first difference, "
              f"{same}/{len(reference)} outputs identical ({time.perf_counter() - start:.0f} s)", flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
