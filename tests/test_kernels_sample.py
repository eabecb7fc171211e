"""Random sampling's CDF inversion, native (csrc/sample.c) and torch (two-level), against an exact one."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpilot.model import kernels
from batchpilot.model.sampler import SamplingRow, _invert_cdf, sample
from batchpilot.sampling_params import SamplingParams


def exact_intervals(logits: torch.Tensor, temps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, float64 CDF of softmax(logits / T) normalised to 1, and each token's own probability."""
    x = logits.double() / temps.double().unsqueeze(1)
    p = torch.softmax(x, dim=-1)
    return p.cumsum(dim=-1), p


def assert_inside(tokens: torch.Tensor, logits: torch.Tensor, temps: torch.Tensor, uniforms: torch.Tensor,
                  tol: float = 1e-4) -> None:
    """Each token's CDF interval holds its row's uniform (to rounding) and the token can occur."""
    cdf, p = exact_intervals(logits, temps)
    for r, t in enumerate(tokens.tolist()):
        lo = float(cdf[r, t - 1]) if t > 0 else 0.0
        hi = float(cdf[r, t])
        u = float(uniforms[r])
        assert lo - tol <= u <= hi + tol, (r, t, lo, u, hi)
        assert float(logits[r, t]) != float("-inf") and float(p[r, t]) > 0


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 1100), seed=st.integers(0, 2**31), bf16=st.booleans(),
       temp=st.sampled_from([0.3, 1.0, 2.5]), masked=st.booleans())
def test_native_and_torch_draws_fall_in_their_exact_cdf_interval(rows, cols, seed, bf16, temp, masked):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, cols, generator=g) * 4
    if masked:  # a grammar's or logit_bias's -inf: never drawn
        logits[torch.rand(rows, cols, generator=g) < 0.5] = float("-inf")
        logits[:, cols // 2] = 0.0  # one token that can occur in every row
    if bf16:
        logits = logits.to(torch.bfloat16)
    temps = torch.full((rows,), temp)
    uniforms = torch.rand(rows, generator=g)
    uniforms[0] = 0.0  # torch.rand can return 0: the first token that can occur, never a masked one
    values = logits.float()
    assert_inside(kernels.sample_rows(logits, temps, uniforms), values, temps, uniforms)
    probs = torch.softmax(values / temp, dim=-1)
    assert_inside(_invert_cdf(probs, uniforms.unsqueeze(1)), values, temps, uniforms)


def test_a_uniform_just_under_one_never_draws_a_masked_tail():
    """The largest uniform torch.rand can return: the last token that can occur, never the -inf
    entries after it (a whole block of them and more)."""
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(3))
    logits[:, 600:] = float("-inf")
    uniforms = torch.full((4,), 1.0 - 2**-24)
    for tokens in (kernels.sample_rows(logits, torch.ones(4), uniforms),
                   _invert_cdf(torch.softmax(logits, dim=-1), uniforms.unsqueeze(1))):
        assert all(t < 600 for t in tokens.tolist())
        assert tokens.tolist() == [int(torch.nonzero(torch.isfinite(row))[-1]) for row in logits]


def test_native_sampling_of_a_row_does_not_depend_on_its_batch():
    logits = torch.randn(16, 49152, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3

    def rows(n):
        return [SamplingRow(SamplingParams(temperature=0.8, seed=100 + i), [], torch.Generator().manual_seed(100 + i))
                for i in range(n)]

    together = sample(logits.clone(), rows(16))[0]
    alone = [sample(logits[i:i + 1].clone(), rows(16)[i:i + 1])[0][0] for i in range(16)]
    assert together == alone
    assert len(set(together)) > 8  # draws, not an argmax


def test_a_row_with_a_nan_or_inf_gives_its_argmax():
    logits = torch.zeros(2, 300)
    logits[0, 7] = float("nan")
    logits[1, 250] = float("inf")
    tokens = kernels.sample_rows(logits, torch.ones(2), torch.tensor([0.5, 0.5]))
    assert tokens.tolist() == [7, 250]


def test_native_draws_follow_the_distribution_across_blocks():
    """600 tokens (three blocks of the kernel's CDF), probabilities from 1e-4 to 0.3."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 600, generator=g) * 2
    logits[0, 255:258] = 6.0  # mass on a block boundary
    uniforms = torch.rand(20_000, generator=g)
    tokens = kernels.sample_rows(logits.expand(20_000, -1), torch.ones(20_000), uniforms)
    freq = torch.bincount(tokens, minlength=600).double() / 20_000
    p = torch.softmax(logits[0].double(), dim=-1)
    assert float((freq - p).abs().max()) < 0.01
    assert float(freq[255:258].sum()) == pytest.approx(float(p[255:258].sum()), abs=0.015)
