"""Shared builders for CPU-only tests: schedulers without a model, tiny random models."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import torch

from batchpilot.config import SchedulerConfig
from batchpilot.controllers.static import StaticController
from batchpilot.engine.block_pool import BlockPool, KVCacheManager
from batchpilot.engine.outputs import RunnerOutput, SchedulerOutput
from batchpilot.engine.request import Request
from batchpilot.engine.scheduler import Scheduler
from batchpilot.sampling_params import SamplingParams


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, max_model_len: int = 1024,
                   prefix_caching: bool = True) -> Scheduler:
    kv = KVCacheManager(BlockPool(num_blocks, block_size), enable_prefix_caching=prefix_caching)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens), kv,
                     StaticController(max_num_seqs), max_model_len)


def make_requests(n: int, prompt_len: int, max_tokens: int, prefix: str = "r") -> list[Request]:
    """n requests with prompts that share no token (so no prefix-cache hit between them)."""
    return [
        Request(f"{prefix}{i}", [i * 100_000 + t for t in range(1, prompt_len + 1)],
                SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), arrival_time=0.0)
        for i in range(n)
    ]


def fake_output(sched_out: SchedulerOutput, token: int = 7) -> RunnerOutput:
    """What an executor would return: one token for every request that samples."""
    return RunnerOutput({s.request.request_id: token for s in sched_out.scheduled if s.sample})


def assert_blocks_consistent(sched: Scheduler) -> None:
    """Every block's reference count is the number of tables holding it; a block is free exactly
    when nobody holds it; no table holds a block twice; the sharing counters agree."""
    pool = sched.kv.pool
    holders = Counter(b for t in sched.kv.block_tables.values() for b in t)
    assert all(len(t) == len(set(t)) for t in sched.kv.block_tables.values()), "a table holds a block twice"
    assert [holders.get(b, 0) for b in range(pool.num_blocks)] == pool.ref_counts
    assert pool.num_free_blocks + len(holders) == pool.num_blocks
    assert pool.num_shared_blocks == sum(1 for n in holders.values() if n > 1)
    assert pool.num_saved_blocks == sum(n - 1 for n in holders.values())


TINY_CONFIGS = {
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
}


def make_tiny_model(kind: str, out_dir: Path, tokenizer_dir: Path):
    """Save a randomly initialised tiny model of `kind` with the default model's tokenizer.

    Returns the transformers model (float32, eval mode) for reference outputs.
    """
    import transformers

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
    spec = dict(TINY_CONFIGS[kind])
    spec.pop("architectures")
    model_type = spec.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **common, **spec)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; scale it up so logits have clear winners
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            else:  # norms and (Qwen2) QKV biases: non-trivial, so their loading is checked
                p.uniform_(0.5, 1.5)
    model.eval()
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out_dir / name)
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["model_type"] == model_type
    return model


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy continuation with transformers' own forward, recomputed each step (no cache)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]


def assert_greedy_close(outputs_a, outputs_b, top: int) -> None:
    """Two greedy runs whose matmuls sum in different orders agree token for token until, at most, a
    near tie: where they first part, each one's token is among the other's `top` most likely ones
    (they then continue from different texts and are not compared further). Outputs carry logprobs."""
    for a, b in zip(outputs_a, outputs_b, strict=True):
        ca, cb = a.outputs[0], b.outputs[0]
        for i, (ta, tb) in enumerate(zip(ca.token_ids, cb.token_ids)):
            if ta != tb:
                top_a = [t for t, _ in ca.logprobs[i].top[:top]]
                top_b = [t for t, _ in cb.logprobs[i].top[:top]]
                assert ta in top_b and tb in top_a, f"prompt {a.prompt!r}: parted at token {i}, {ta} vs {tb}"
                break


def write_gguf(path: Path, arch: str, tensors: dict, quantize: str | None = None) -> Path:
    """A GGUF of float32 tensors {gguf name: array} and no metadata beyond the architecture; each
    tensor in `quantize` (a gguf type name, e.g. "Q4_0") if given."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for name, data in tensors.items():
        if quantize is None:
            writer.add_tensor(name, data)
        else:
            qtype = gguf.GGMLQuantizationType[quantize]
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
