"""Resident memory of a 7B Q4_0 GGUF served with --quantization int4 (no 7B file can be fetched here).

Writes a GGUF with Llama-2-7B's shapes (hidden 4096, 32 layers of 32 heads, FFN 11008) whose 4-bit
blocks are random (scale 0.01, random nibbles), norms of ones, and the default model's tokenizer
(49,152 tokens: a larger embedding than Llama-2's 32,000, so the count errs high). Then, in a fresh
process, loads it as `LLM(path, quantization="int4")`, generates a few tokens, and prints the peak
and final resident set (VmHWM, VmRSS) and the load time. The output text is noise: only memory
and that a step runs are measured.

    python benchmarks/gguf_7b_memory.py --dir /tmp/gguf7b
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, FFN = 4096, 32, 32, 11008
Q4_0_BLOCK = 18  # bytes per 32 weights: an f16 scale, 16 bytes of nibbles


def q4_0_blocks(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    blocks = rng.integers(0, 256, size=(rows, cols // 32, Q4_0_BLOCK), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def write_model(path: Path) -> None:
    import gguf

    from batchpilot.model import gguf_file, loader

    template = gguf_file.open_gguf(loader.default_gguf_path())
    tokens, merges, types = (template.fields[f"tokenizer.ggml.{key}"].contents()
                             for key in ("tokens", "merges", "token_type"))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(template.fields["tokenizer.ggml.pre"].contents())
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(template.fields["tokenizer.ggml.bos_token_id"].contents())
    w.add_eos_token_id(template.fields["tokenizer.ggml.eos_token_id"].contents())
    rng = np.random.default_rng(0)
    q4 = gguf.GGMLQuantizationType.Q4_0

    def matrix(name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, q4_0_blocks(rows, cols, rng), raw_dtype=q4)

    matrix("token_embd.weight", len(tokens), HIDDEN)
    for i in range(LAYERS):
        for part, rows, cols in (("attn_q", HIDDEN, HIDDEN), ("attn_k", HIDDEN, HIDDEN), ("attn_v", HIDDEN, HIDDEN),
                                 ("attn_output", HIDDEN, HIDDEN), ("ffn_gate", FFN, HIDDEN), ("ffn_up", FFN, HIDDEN),
                                 ("ffn_down", HIDDEN, FFN)):
            matrix(f"blk.{i}.{part}.weight", rows, cols)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    matrix("output.weight", len(tokens), HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def status() -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS")}  # MiB


def measure(path: str, kv_cache_gib: float, threads: int) -> None:
    from batchpilot import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(path, kv_cache_gib=kv_cache_gib, threads=threads, quantization="int4")
    loaded = time.perf_counter() - start
    after_load = status()
    start = time.perf_counter()
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    step = (time.perf_counter() - start) / 4
    print(json.dumps({"load_s": round(loaded, 1), "after_load_mib": after_load, "after_generate_mib": status(),
                      "seconds_per_token": round(step, 3), "tokens": len(out[0].outputs[0].token_ids)}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="where the 7B file is written (about 3.9 GB)")
    p.add_argument("--kv-cache-gib", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: load this file
    args = p.parse_args()
    if args.measure:
        measure(args.measure, args.kv_cache_gib, args.threads)
        return 0
    path = Path(args.dir) / "llama-7b-shape-q4_0.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_model(path)
        print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s")
    return subprocess.call([sys.executable, __file__, "--dir", args.dir, "--measure", str(path),
                            "--kv-cache-gib", str(args.kv_cache_gib), "--threads", str(args.threads)])


if __name__ == "__main__":
    raise SystemExit(main())
