"""Prepacked bf16 linear layers: the same products as F.linear, on the rows they serve."""

import pytest
import torch
import torch.nn.functional as F

from batchpilot.model import kernels
from batchpilot.model.linear import GEMV_MAX_ROWS, PACKED_MAX_ROWS, Linear, packing_supported

pytestmark = pytest.mark.skipif(not packing_supported(torch.bfloat16), reason="no oneDNN bf16 on this CPU")


@pytest.mark.parametrize("rows", [1, GEMV_MAX_ROWS + 1, 7, 32, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, 512])
def test_packed_linear_matches_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(960, 576, generator=g).to(torch.bfloat16)
    b = torch.randn(960, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
    packed, plain = Linear(w, b), F.linear(x, w, b)
    packed.pack()
    out = packed(x)
    assert out.shape == plain.shape and out.dtype == torch.bfloat16
    if rows > PACKED_MAX_ROWS:
        assert torch.equal(out, plain)  # large steps take the plain weight
    else:  # both accumulate in fp32; they may differ by a rounding of the bf16 result
        assert torch.allclose(out.float(), plain.float(), rtol=1e-2, atol=5e-2)


@pytest.mark.skipif(not kernels.gemv_available(), reason="our gemv needs AVX512-BF16")
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_matches_a_float32_reference_on_strided_rows(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(192, 96, generator=g).to(torch.bfloat16)
    b = torch.randn(192, generator=g).to(torch.bfloat16) if with_bias else None
    x = torch.randn(rows, 3 * 96, generator=g).to(torch.bfloat16)[:, 96:192]  # a strided view of whole rows
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    out = kernels.gemv(x, kernels.pack_gemv_weight(w), b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 192)
    torch.testing.assert_close(out.float(), ref, rtol=8e-3, atol=1e-2)  # one bf16 rounding of the sum


def test_gemv_refuses_weights_it_cannot_tile():
    assert not kernels.gemv_supports(torch.zeros(100, 96, dtype=torch.bfloat16))  # N not a multiple of 64
    assert not kernels.gemv_supports(torch.zeros(128, 96, dtype=torch.float32))


def test_default_model_greedy_is_the_same_with_and_without_packing(monkeypatch):
    from batchpilot import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "List three primary colours:", "Hi"]
    params = SamplingParams(temperature=0, max_tokens=24)
    packed = LLM(kv_cache_gib=0.05, threads=1)
    assert packed.engine.executor.model.lm_head.packed is not None
    monkeypatch.setattr("batchpilot.model.linear.PACK_LIMIT_BYTES", 0)
    plain = LLM(kv_cache_gib=0.05, threads=1)
    assert plain.engine.executor.model.lm_head.packed is None
    assert [o.outputs[0].token_ids for o in packed.generate(prompts, params)] == [
        o.outputs[0].token_ids for o in plain.generate(prompts, params)]
