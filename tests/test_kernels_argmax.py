"""The native argmax gives torch.argmax's answer: the first maximal index, the first NaN."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchpilot.model import kernels


def test_gcc_builds_the_kernels():
    assert kernels.native_available(), "gcc is part of the supported setup"


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 300), seed=st.integers(0, 2**31), ties=st.booleans(),
       specials=st.sampled_from(["none", "inf", "-inf", "nan"]), bf16=st.booleans())
def test_argmax_rows_matches_torch(rows, cols, seed, ties, specials, bf16):
    """float32, and bf16 (whose argmax must be that of its exact float32 values; bf16 rounding makes ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    if ties:  # few distinct values: maxima repeat within a row
        x = x.mul(2).round()
    if specials != "none":
        mask = torch.rand(rows, cols, generator=g) < 0.05
        x[mask] = float(specials)
    if bf16:
        x = x.to(torch.bfloat16)
    torch.testing.assert_close(kernels.argmax_rows(x), x.float().argmax(dim=-1), rtol=0, atol=0)


def test_argmax_rows_all_negative_infinity_and_long_rows():
    x = torch.full((2, 50_000), float("-inf"))
    x[1, 49_999] = 0.0
    assert kernels.argmax_rows(x).tolist() == x.argmax(dim=-1).tolist() == [0, 49_999]
