"""The fused element-wise kernels reproduce llama.py's torch code (and the model its outputs)."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from batchpilot.model import kernels, quant
from batchpilot.model.llama import _rms_norm, _rope

# bf16: one rounding of the result apart at most (float sums in another order); float32: close.
TOL = {torch.bfloat16: dict(atol=2e-2, rtol=1e-2), torch.float32: dict(atol=1e-5, rtol=1e-5)}
DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def _native():
    assert kernels.layer_ops_supports(torch.bfloat16), "gcc is part of the supported setup"


def _rand(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_torch(dtype, rows, with_delta):
    x, delta, w = _rand(rows, 96, dtype=dtype), _rand(rows, 96, dtype=dtype, seed=1), _rand(96, dtype=dtype, seed=2)
    expect_x = x + delta if with_delta else x.clone()
    expect = _rms_norm(expect_x, w, 1e-5)
    out = torch.empty_like(x)
    kernels.add_rms_norm(x, delta if with_delta else None, w, out, 1e-5)
    torch.testing.assert_close(x, expect_x, atol=0, rtol=0)  # the residual add rounds as torch's does
    torch.testing.assert_close(out, expect, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 40])
def test_rope_in_place_matches_torch_on_queries_and_keys_only(dtype, rows):
    h, kvh, d = 4, 2, 16
    qkv = _rand(rows, (h + 2 * kvh) * d, dtype=dtype)
    angles = torch.rand(rows, d // 2, generator=torch.Generator().manual_seed(3)) * 50
    cos, sin = angles.cos(), angles.sin()
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    c, s = cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)
    expect_q, expect_k, expect_v = _rope(q.reshape(rows, h, d), c, s), _rope(k.reshape(rows, kvh, d), c, s), v.clone()
    kernels.rope_in_place(qkv, cos, sin, h + kvh, d)
    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    torch.testing.assert_close(q.reshape(rows, h, d), expect_q, **TOL[dtype])
    torch.testing.assert_close(k.reshape(rows, kvh, d), expect_k, **TOL[dtype])
    torch.testing.assert_close(v, expect_v, atol=0, rtol=0)  # values are not rotated


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 40])
def test_silu_mul_matches_torch_including_large_inputs(dtype, rows):
    gate_up = (_rand(rows, 64, dtype=torch.float32) * 30).to(dtype)  # |x| up to ~100: exp's clamped range
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up), F.silu(gate) * up, **TOL[dtype])


# 8 dimensions: rows of partial lines (copied plainly), few rows (one thread); 64: whole lines (streaming
# stores where built for AVX-512), rows enough for every thread.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(5, 8), (40, 64)])
def test_write_kv_puts_each_row_in_its_slot(dtype, rows, d):
    kvh, slots_total = 2, 50
    qkv = _rand(rows, 3 * kvh * d, dtype=dtype)
    k, v = qkv[:, : kvh * d].view(rows, kvh, d), qkv[:, kvh * d : 2 * kvh * d].view(rows, kvh, d)  # strided rows
    slots = torch.randperm(slots_total, generator=torch.Generator().manual_seed(rows))[:rows]
    kc, vc = torch.zeros(kvh, slots_total, d, dtype=dtype), torch.zeros(kvh, slots_total, d, dtype=dtype)
    expect_k, expect_v = kc.clone(), vc.clone()
    expect_k.index_copy_(1, slots, k.transpose(0, 1))
    expect_v.index_copy_(1, slots, v.transpose(0, 1))
    kernels.write_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)
    with pytest.raises(ValueError, match="contiguous heads"):
        kernels.write_kv(k.transpose(1, 2), v, kc, vc, slots)


def test_fused_forward_gives_the_unfused_outputs(default_model_dir):
    """The whole model in bf16 on a batch of prompts: the same greedy tokens, first-token log-probs
    a bf16 rounding apart (the logits are bf16: a step is 0.125 for logits in [16, 32))."""
    from batchpilot import LLM, SamplingParams

    llm = LLM(str(default_model_dir), kv_cache_gib=0.1)
    model = llm.engine.executor.model
    assert model.fused
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village there",
               "Question: What is 12 times 12? Answer:"]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    fused = llm.generate(prompts, params)
    model.fused = False
    unfused = llm.generate(prompts, params)
    for a, b in zip(fused, unfused):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        first_a, first_b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        assert [t for t, _ in first_a.top[:2]] == [t for t, _ in first_b.top[:2]]
        assert first_a.logprob == pytest.approx(first_b.logprob, abs=0.25)


def _assert_one_native_call_per_decode_step_changes_nothing(llm, prompts, max_tokens, monkeypatch, head: bool):
    """Generate with kernels.decode_layers (which must run every decode step after the prefill, all
    rows at once, and the lm_head too where `head`: a bf16 lm_head) and with the per-layer loop: the same
    tokens and log-probs, exactly."""
    from batchpilot import SamplingParams

    model = llm.engine.executor.model
    assert model.decode_weights is not None and model.decode_max_rows >= len(prompts)
    calls, heads = [], []
    native = kernels.decode_layers
    def counted(*args):
        bound = inspect.signature(native).bind(*args).arguments
        calls.append(bound["x"].shape[0])
        heads.append(bound.get("logits") is not None)  # the logits the lm_head writes inside the call
        return native(*args)

    monkeypatch.setattr(kernels, "decode_layers", counted)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=3)
    whole = llm.generate(prompts, params)
    assert len(calls) >= max_tokens - 1 and len(prompts) in calls
    assert set(heads) == {head}
    weights, model.decode_weights = model.decode_weights, None
    per_kernel = llm.generate(prompts, params)
    model.decode_weights = weights
    for a, b in zip(whole, per_kernel):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        steps_a, steps_b = a.outputs[0].logprobs, b.outputs[0].logprobs
        assert [(p.logprob, p.top) for p in steps_a] == [(p.logprob, p.top) for p in steps_b]


@pytest.mark.parametrize("rows", [2, 6])  # each thread normalizes every row itself up to 4 rows, the team beyond
def test_decode_steps_in_one_native_call_give_the_per_kernel_outputs_bit_for_bit(default_model_dir, monkeypatch, rows):
    """kernels.decode_layers runs the same kernels in the same order as the per-layer Python loop; prompts
    of different lengths, so the rows have different contexts."""
    from batchpilot import LLM

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village there was",
               "Question: What is 12 times 12? Answer:", "import numpy as np\n", "Water boils at"][:rows]
    _assert_one_native_call_per_decode_step_changes_nothing(LLM(str(default_model_dir), kv_cache_gib=0.1), prompts,
                                                            24, monkeypatch, head=True)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_decode_steps_in_one_native_call_give_the_per_kernel_outputs_bit_for_bit(default_model_dir,
                                                                                           quantization, monkeypatch):
    """The same through qgemv's int8 / int4 tiles (where the CPU has AVX512-BF16; elsewhere quantized
    layers run torch's kernels, which the native loop must leave to the per-layer path)."""
    from batchpilot import LLM

    llm = LLM(str(default_model_dir), kv_cache_gib=0.1, quantization=quantization)
    if not kernels.qgemv_available():
        assert llm.engine.executor.model.decode_weights is None
        return
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    _assert_one_native_call_per_decode_step_changes_nothing(llm, prompts, 12, monkeypatch, head=False)


def test_decode_steps_in_one_native_call_expand_a_4_bit_embedding_in_python(default_model_dir, monkeypatch):
    """An embedding kept in 4-bit blocks (quant.Int4Rows, as a Q4 GGUF's under int4), which the native call
    cannot look up: the step expands its rows into the residual stream first, and gives the per-kernel
    outputs (a call that took the rows from anywhere else would not)."""
    from batchpilot import LLM

    llm = LLM(str(default_model_dir), kv_cache_gib=0.1)
    model = llm.engine.executor.model
    table = model.embed.float()
    groups = table.view(table.shape[0], -1, quant.INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-8)
    q = ((groups - low) / scale).round().clamp(0, 15).flatten(-2)
    monkeypatch.setattr(model, "embed", quant.Int4Rows(quant.pack_pairs(q), scale.squeeze(-1).half(),
                                                       low.squeeze(-1).half(), model.dtype))
    prompts = ["The capital of France is", "def fibonacci(n):"]
    _assert_one_native_call_per_decode_step_changes_nothing(llm, prompts, 10, monkeypatch, head=True)


@pytest.mark.parametrize("nans", ["none", "late", "early and late"])
def test_greedy_argmax_inside_the_step_call_is_the_samplers(default_model_dir, monkeypatch, nans):
    """A greedy decode step takes its tokens from the argmax decode_layers computes with the logits, each
    thread over its own columns: the sampler's argmax of the same logits (the first maximum, or the first
    NaN), where ties and NaNs lie in different threads' columns. The lm_head is replaced by one whose logits
    are 0 but for four rows: +s, -s in the first thread's columns and again in the last's (s = the step's
    y times a vector), so that every step's maximum is a tie across threads; NaN rows where asked."""
    from batchpilot import LLM, SamplingParams

    llm = LLM(str(default_model_dir), kv_cache_gib=0.1, threads=2)  # two threads' columns, whatever the host
    model = llm.engine.executor.model
    lm = model.lm_head
    vocab, hidden = lm.gemv.n, lm.gemv.k
    late = kernels.split_start(vocab // kernels.GEMV_TILE, 2, 1) * kernels.GEMV_TILE + 7  # thread 1's columns
    assert late > 11
    weight = torch.zeros(vocab, hidden, dtype=torch.bfloat16)
    v = _rand(hidden, dtype=torch.bfloat16, seed=3)
    weight[[5, 9, late + 1, late + 2]] = torch.stack([v, -v, v, -v])
    if "late" in nans:
        weight[late, 0] = float("nan")
    if "early" in nans:
        weight[11, 0] = float("nan")
    monkeypatch.setattr(lm, "gemv", kernels.pack_gemv_weight(weight))
    calls = []
    native = kernels.decode_layers
    def counted(*args):
        calls.append(inspect.signature(native).bind(*args).arguments.get("argmax") is not None)
        return native(*args)

    monkeypatch.setattr(kernels, "decode_layers", counted)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    inside = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert calls and all(calls)  # every decode step took the argmax inside its call
    monkeypatch.setattr(model, "forward_greedy", lambda *a: (model.forward(*a, None), None))
    sampler = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert inside == sampler
    expected = {"none": {5, 9}, "late": {late}, "early and late": {11}}[nans]
    assert all(set(tokens[1:]) <= expected for tokens in inside)  # the first token is the prefill's


def test_decode_buffers_are_made_once_and_grow_for_more_rows():
    """A decode step's tensors are views of buffers made for the most rows seen: the same memory step after
    step (no allocation), new memory only for more rows than ever, each view its row count's shape."""
    from batchpilot.model.llama import DecodeBuffers

    buffers = DecodeBuffers(hidden=8, scratch_per_row=5, vocab=128, dtype=torch.bfloat16, logits_dtype=torch.float32)
    x, y, scratch, logits, argmax = buffers.rows(2)
    assert (x.shape, y.shape, scratch.shape, logits.shape, argmax.shape) == ((2, 8), (2, 8), (10,), (2, 128), (2,))
    assert logits.dtype == torch.float32 and x.dtype == torch.bfloat16 and argmax.dtype == torch.long
    again = buffers.rows(2)
    assert [t.data_ptr() for t in again] == [t.data_ptr() for t in (x, y, scratch, logits, argmax)]
    assert buffers.rows(1)[3].data_ptr() == logits.data_ptr()  # fewer rows: the same memory
    bigger = buffers.rows(3)
    assert buffers.capacity >= 4 and bigger[3].shape == (3, 128) and bigger[3].is_contiguous()
    assert buffers.rows(4)[3].data_ptr() == bigger[3].data_ptr()  # grown geometrically: 4 rows fit already
