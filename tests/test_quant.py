"""Weight-only int8 / int4: torch's kernels, our dequantization and the layer dispatch against a float
reference built from the same integers; and the default model's greedy text under each."""

import pytest
import torch
import torch.nn.functional as F

from batchpilot.model import kernels, quant
from batchpilot.model.linear import QUANT_KERNEL_MAX_ROWS, Linear


def q4_blocks(n, k, seed, group=quant.INT4_GROUP, dtype=torch.bfloat16):
    """Random Q4_1-style blocks with scales and offsets already representable in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale = (torch.rand(n, k // group, generator=g) * 0.05 + 0.001).to(dtype).float()
    low = (-torch.rand(n, k // group, generator=g) * 0.4).to(dtype).float()
    return q, scale, low


def q4_reference(q, scale, low, group=quant.INT4_GROUP):
    """The float32 weight the blocks stand for, as torch's kernel forms it: (q - 8) * s + (low + 8 s)."""
    n, k = q.shape
    s = scale.repeat_interleave(group, dim=1)
    zero = (low + 8 * scale).to(torch.bfloat16).float().repeat_interleave(group, dim=1)
    return (q.float() - 8) * s + zero


def test_int4_layout_round_trips_through_torchs_packing():
    q, _, _ = q4_blocks(192, 96, seed=0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(quant.unpack_int4(packed, 192, 96).to(torch.int32), q)


@pytest.mark.parametrize("native", [True, False])
def test_int4_dequantize_matches_torchs_kernel(native, monkeypatch):
    """Our dequantization (C, or torch ops without a compiler) gives the weight torch's int4 kernel
    multiplies by: x = identity rows read it back, one product per output."""
    if not native:
        monkeypatch.setattr(kernels, "native_available", lambda: False)
    q, scale, low = q4_blocks(128, 64, seed=1)
    w = quant.int4_from_blocks(q, scale, low, torch.bfloat16)
    deq = w.dequantize()
    assert deq.dtype == torch.bfloat16 and deq.shape == (128, 64)
    torch.testing.assert_close(deq.float(), q4_reference(q, scale, low).to(torch.bfloat16).float(), rtol=0, atol=0)
    read_back = w.matmul(torch.eye(64, dtype=torch.bfloat16)).t()  # [N, K]: w[n, k], rounded to bf16
    torch.testing.assert_close(deq.float(), read_back.float(), rtol=0, atol=0)


def test_int4_quantize_recovers_q4_1_blocks():
    """A weight on a Q4_1 grid (what the default model's folder holds) quantizes back to its integers."""
    q, scale, low = q4_blocks(64, 128, seed=2)
    q[:, ::32], q[:, 1::32] = 0, 15  # every group spans the full range, as the Q4_1 quantizer makes it
    weight = (q.float() * scale.repeat_interleave(32, 1) + low.repeat_interleave(32, 1)).to(torch.bfloat16)
    w = quant.quantize_int4(weight, torch.bfloat16)
    assert torch.equal(quant.unpack_int4(w.packed, 64, 128).to(torch.int32), q)


def exact_weight(w):
    """The float32 weight a quantized one stands for, before any rounding to bf16."""
    if isinstance(w, quant.Int8Weight):
        return w.q.float() * w.scales.float().unsqueeze(1)
    n, k = w.shape
    q = quant.unpack_int4(w.packed, n, k).float().view(n, k // w.group_size, w.group_size)
    scale, zero = w.scales_zeros.float().transpose(0, 1).unbind(-1)
    return ((q - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).view(n, k)


@pytest.mark.parametrize("mode", quant.QUANTIZATIONS)
@pytest.mark.parametrize("rows", [1, 3, QUANT_KERNEL_MAX_ROWS, QUANT_KERNEL_MAX_ROWS + 1, 200])
def test_quantized_linear_matches_its_weight(mode, rows):
    """Up to QUANT_KERNEL_MAX_ROWS rows torch's kernel multiplies by the exact float weight; beyond,
    the weight dequantized to bf16 goes through the matmul. Either equals x times that weight summed
    in float32, up to a bf16 rounding of the result; and the quantized weight is within half a step
    (and bf16 roundings) of the float one."""
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(192, 128, generator=g).to(torch.bfloat16)
    bias = torch.randn(192, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 128, generator=g).to(torch.bfloat16)
    layer = Linear(weight, bias)
    layer.quantize(mode)
    assert layer.weight is None and layer.quantized is not None
    exact, w = exact_weight(layer.quantized), weight.float()
    step = w.abs().amax(1, keepdim=True) / 127 if mode == "int8" else 2 * w.abs().amax() / 15
    assert ((exact - w).abs() <= step / 2 * 1.1 + w.abs() * 2**-8).all()
    deq = layer.quantized.dequantize()
    assert torch.equal(deq, exact.to(torch.bfloat16))
    used = exact if rows <= QUANT_KERNEL_MAX_ROWS else deq.float()
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 192)
    torch.testing.assert_close(out.float(), F.linear(x.float(), used, bias.float()), rtol=8e-3, atol=1e-2)


def test_quantized_layer_takes_the_kernel_for_few_rows_and_the_dequantized_weight_beyond(monkeypatch):
    calls = []
    layer = Linear(torch.randn(64, 64).to(torch.bfloat16))
    layer.quantize("int8")
    monkeypatch.setattr(quant.Int8Weight, "matmul", lambda self, x: calls.append("kernel") or x @ self.dequantize().t())
    monkeypatch.setattr(quant.Int8Weight, "dequantize",
                        lambda self, orig=quant.Int8Weight.dequantize: calls.append("dequantize") or orig(self))
    layer(torch.randn(QUANT_KERNEL_MAX_ROWS, 64).to(torch.bfloat16))
    assert calls[0] == "kernel"
    calls.clear()
    layer(torch.randn(QUANT_KERNEL_MAX_ROWS + 1, 64).to(torch.bfloat16))
    assert calls == ["dequantize"]


def test_unknown_quantization_is_refused_naming_the_flag():
    from batchpilot.config import EngineConfig

    with pytest.raises(ValueError, match="--quantization"):
        EngineConfig(quantization="fp8")


@pytest.mark.parametrize("mode,min_agreement", [("int8", 0.6), ("int4", 0.55)])
def test_default_model_quantized_greedy_agrees_with_bf16(mode, min_agreement):
    """Greedy text of the quantized default model against its bf16 weights: the share of tokens
    generated before the first difference, over varied prompts (measured: docs/reproduction.md)."""
    from batchpilot import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "List three primary colours:",
               "Once upon a time, in a small village,", "The three laws of thermodynamics are",
               "import numpy as np\n", "Water boils at", "My favourite book is"]
    params = SamplingParams(temperature=0, max_tokens=24)
    reference = LLM(kv_cache_gib=0.05, threads=2).generate(prompts, params)
    llm = LLM(kv_cache_gib=0.05, threads=2, quantization=mode)
    layer = llm.engine.executor.model.layers[0]
    assert layer.qkv.weight is None and layer.qkv.quantized is not None  # the float weights are gone
    outputs = llm.generate(prompts, params)
    same = 0
    for a, b in zip(reference, outputs, strict=True):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        same += next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    total = sum(len(a.outputs[0].token_ids) for a in reference)
    assert same / total >= min_agreement, f"{mode}: {same} of {total} tokens before the first difference"
