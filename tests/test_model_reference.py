"""Greedy outputs equal Hugging Face transformers' own implementation."""

import pytest
import torch

from batchpilot import LLM, SamplingParams
from tests.helpers import TINY_CONFIGS, hf_greedy, make_tiny_model

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three primary colours:",
    "In 1492, Columbus sailed across the Atlantic Ocean and",
    "Translate to French: I would like a cup of coffee, please.",
    "The mitochondria is the powerhouse of the cell. It produces energy by",
    "Once upon a time, in a small village nestled between two mountains, there lived an old "
    "clockmaker who had spent his whole life building clocks that",
    "Question: What is 12 times 12? Answer:",
    "A" * 3,
]


def test_default_model_greedy_matches_transformers(llm_fp32, default_model_dir):
    from transformers import AutoModelForCausalLM

    n = 12
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    outs = llm_fp32.generate(PROMPTS, params)  # one batch: all prompts run together
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    tok = llm_fp32.tokenizer
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, tok.encode(prompt), n), prompt


@pytest.mark.parametrize("kind", sorted(TINY_CONFIGS))
def test_tiny_random_models_match_transformers(kind, tmp_path, default_model_dir):
    hf = make_tiny_model(kind, tmp_path, default_model_dir)
    llm = LLM(str(tmp_path), dtype="float32", num_kv_blocks=256, block_size=4)
    prompts = [[5 + i * 7 + j for j in range(3 + 9 * i)] for i in range(6)]
    n = 10
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, n)


def test_chunked_prefill_logits_match_whole_prefill(default_model_dir):
    """Top-20 log-probabilities of the first token agree within 1e-4 (float32)."""
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=20)
    prompt = PROMPTS[8]
    whole = LLM(str(default_model_dir), dtype="float32", num_kv_blocks=64)
    chunked = LLM(str(default_model_dir), dtype="float32", num_kv_blocks=64, max_num_batched_tokens=7)
    a = whole.generate(prompt, params)[0].outputs[0].logprobs[0]
    b = chunked.generate(prompt, params)[0].outputs[0].logprobs[0]
    assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    for (_, x), (_, y) in zip(a.top, b.top):
        assert x == pytest.approx(y, abs=1e-4)
    assert chunked.engine.counters.num_steps > whole.engine.counters.num_steps


def test_gguf_and_converted_folder_agree(llm_fp32):
    from batchpilot.model.loader import default_gguf_path

    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    gguf_llm = LLM(str(default_gguf_path()), dtype="float32", kv_cache_gib=0.1)
    a = [o.outputs[0].token_ids for o in gguf_llm.generate(PROMPTS[:4], params)]
    b = [o.outputs[0].token_ids for o in llm_fp32.generate(PROMPTS[:4], params)]
    assert a == b


def test_default_model_answers_paris():
    llm = LLM(kv_cache_gib=0.1)  # the defaults a user gets: default model, bfloat16
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=20))
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason == "stop"
