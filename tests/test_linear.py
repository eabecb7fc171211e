"""bf16 linear layers, prepacked (or upcast to float32 where bf16 matmul is not native): the same
products as F.linear, on the rows they serve."""

import pytest
import torch
import torch.nn.functional as F

from batchpilot.model import kernels
from batchpilot.model.linear import PACKED_MAX_ROWS_AMX, Linear, bf16_matmul_native
from tests.helpers import assert_greedy_close


@pytest.mark.parametrize("rows", [1, 3, 5, 7, 32, PACKED_MAX_ROWS_AMX, PACKED_MAX_ROWS_AMX + 1, 512])
def test_packed_linear_matches_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(960, 576, generator=g).to(torch.bfloat16)
    b = torch.randn(960, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
    packed, plain = Linear(w, b), F.linear(x, w, b)
    packed.pack()
    assert (packed.packed is not None) == bf16_matmul_native() != (packed.upcast is not None)
    out = packed(x)
    assert out.shape == plain.shape and out.dtype == torch.bfloat16
    if packed.packed is not None:  # the packed weight up to 128 rows with AMX, always without
        assert packed.packed_rows == (PACKED_MAX_ROWS_AMX if torch.cpu._is_amx_tile_supported() else 2**62)
    if rows > packed.packed_rows and bf16_matmul_native():
        assert torch.equal(out, plain)  # large steps take the plain weight
    else:  # both accumulate in fp32; they may differ by a rounding of the bf16 result
        assert torch.allclose(out.float(), plain.float(), rtol=1e-2, atol=5e-2)


def test_bf16_without_bf16_instructions_takes_the_float32_copy(monkeypatch):
    """oneDNN reports bf16 support on plain AVX-512 too, where it converts in software (4x slower
    than float32 from 32 rows on an Ice Lake-class Xeon): only AVX512-BF16 or AMX count as native."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not bf16_matmul_native()
    layer = Linear(torch.randn(960, 576).to(torch.bfloat16))
    layer.pack()
    assert layer.packed is None and layer.upcast is not None and layer.upcast.dtype == torch.float32


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_matches_a_float32_reference_on_strided_rows(rows, with_bias):
    assert kernels.gemv_available(), "built for AVX512-BF16 or AVX2, which every supported x86 host has"
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(192, 96, generator=g).to(torch.bfloat16)
    b = torch.randn(192, generator=g).to(torch.bfloat16) if with_bias else None
    x = torch.randn(rows, 3 * 96, generator=g).to(torch.bfloat16)[:, 96:192]  # a strided view of whole rows
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    out = kernels.gemv(x, kernels.pack_gemv_weight(w), b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 192)
    torch.testing.assert_close(out.float(), ref, rtol=8e-3, atol=1e-2)  # one bf16 rounding of the sum


@pytest.mark.parametrize("parts", [2, 3, 8])
@pytest.mark.parametrize("rows", [1, 7])
def test_gemv_tiles_split_into_parts_multiply_as_one(parts, rows):
    """Tiles placed per thread (a part per stream) give the same result bit for bit, whatever the team's
    size against the parts' count: 7 tiles in 2, 3 or 8 parts (one empty) on this process's threads."""
    from batchpilot.model.hugepages import HugePageArena

    g = torch.Generator().manual_seed(parts)
    w = torch.randn(7 * kernels.GEMV_TILE, 96, generator=g).to(torch.bfloat16)
    b = torch.randn(7 * kernels.GEMV_TILE, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    whole = kernels.pack_gemv_weight(w)
    split = whole.place([HugePageArena() for _ in range(parts)])
    assert len(split.parts) == parts and sum(p.shape[0] for p in split.parts) == 7
    assert torch.equal(kernels.gemv(x, split, b), kernels.gemv(x, whole, b))
    assert torch.equal(split.place([HugePageArena()]).parts[0], whole.parts[0])  # and back into one


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_float_out_gives_the_sums_before_their_rounding(rows, with_bias):
    """The lm_head's float32 logits: the same float32 sums the bf16 output rounds, so rounding them gives
    the bf16 output exactly, and they sit closer to a float64 reference than one bf16 rounding allows."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(256, 576, generator=g).to(torch.bfloat16)
    b = torch.randn(256, generator=g).to(torch.bfloat16) if with_bias else None
    x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
    packed = kernels.pack_gemv_weight(w)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    out = kernels.gemv(x, packed, b, float_out=True)
    assert out.dtype == torch.float32 and out.shape == (rows, 256)
    assert torch.equal(out.to(torch.bfloat16), kernels.gemv(x, packed, b))
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-4)  # float32 sums of exact products


def test_bf16_lm_head_logits_come_out_in_float32_where_the_gemv_computes_them(default_model_dir):
    """Rounded to bf16, logits of 16-32 are 0.125 apart: the default model's two best first tokens for
    "What is the capital of France?" tie there ("L" wins the tie by its lower id), while float32
    sums keep the float32 model's order ("The capital of France is Paris.")."""
    from batchpilot import LLM, SamplingParams

    llm = LLM(str(default_model_dir), kv_cache_gib=0.05)
    head = llm.engine.executor.model.lm_head
    assert head.float_out and head.gemv is not None
    x = torch.randn(3, head.weight.shape[1]).to(torch.bfloat16)
    assert head(x).dtype == torch.float32
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    first = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=1, logprobs=2))[0].outputs[0].logprobs[0]
    (best, best_lp), (_, second_lp) = first.top[:2]
    assert best_lp > second_lp  # no tie
    reference = LLM(str(default_model_dir), kv_cache_gib=0.05, dtype="float32")
    assert best == reference.chat(msgs, SamplingParams(temperature=0, max_tokens=1))[0].outputs[0].token_ids[0]


def test_gemv_refuses_weights_it_cannot_tile():
    assert not kernels.gemv_supports(torch.zeros(100, 96, dtype=torch.bfloat16))  # N not a multiple of 64
    assert not kernels.gemv_supports(torch.zeros(128, 96, dtype=torch.float32))


def test_default_model_greedy_is_the_same_with_and_without_packing(monkeypatch):
    from batchpilot import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "List three primary colours:", "Hi"]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=5)
    packed = LLM(kv_cache_gib=0.05, threads=1)
    head = packed.engine.executor.model.lm_head
    assert head.gemv is not None and (head.packed if bf16_matmul_native() else head.upcast) is not None
    monkeypatch.setattr("batchpilot.model.linear.PACK_LIMIT_BYTES", 0)
    plain = LLM(kv_cache_gib=0.05, threads=1)
    assert plain.engine.executor.model.lm_head.packed is plain.engine.executor.model.lm_head.upcast is None
    with_packing, without = packed.generate(prompts, params), plain.generate(prompts, params)
    # steps of up to GEMV_MAX_ROWS rows take our kernel: float32 sums of the same exact products in its own
    # order (and where bf16 is not native, against torch's bf16 loop): equal up to a near tie
    assert_greedy_close(with_packing, without, top=2)


@pytest.fixture
def amx_rows_restored():
    yield
    kernels.gemv_use_amx(kernels.GEMV_AMX_MIN_ROWS)


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 128])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gemv_on_the_amx_tiles_gives_float32_sums_of_exact_products(rows, with_bias, amx_rows_restored):
    """Where the CPU has AMX the tiles take every step (a last block of fewer than 16 rows from a padded
    copy, the tiles split over the team as the vector loop splits them): the same exact products, summed in
    float32 in another order, and one rounding of those sums to bf16. Elsewhere the tiles are refused."""
    from batchpilot.model.hugepages import HugePageArena

    on_amx = kernels.gemv_use_amx(1)
    assert on_amx == (kernels.gemv_amx_min_rows() == 1)
    if not torch.cpu._is_amx_tile_supported():
        assert not on_amx and kernels.gemv_amx_min_rows() == 0
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(3 * kernels.GEMV_TILE, 1536, generator=g).to(torch.bfloat16)
    b = torch.randn(3 * kernels.GEMV_TILE, generator=g).to(torch.bfloat16) if with_bias else None
    x = torch.randn(rows, 2 * 1536, generator=g).to(torch.bfloat16)[:, 1536:]  # strided rows
    tiles = kernels.pack_gemv_weight(w).place([HugePageArena(), HugePageArena()])
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    sums, rounded = kernels.gemv(x, tiles, b, float_out=True), kernels.gemv(x, tiles, b)
    torch.testing.assert_close(sums.double(), exact, rtol=1e-5, atol=2e-4)
    assert torch.equal(sums.to(torch.bfloat16), rounded)
    kernels.gemv_use_amx(0)
    assert kernels.gemv_amx_min_rows() == 0
    vector = kernels.gemv(x, tiles, b, float_out=True)
    torch.testing.assert_close(vector.double(), exact, rtol=1e-5, atol=2e-4)
    assert torch.equal(vector.to(torch.bfloat16), kernels.gemv(x, tiles, b))


@pytest.mark.parametrize("rows", [1, 3, 16, 128, 129])
@pytest.mark.parametrize("amx", [True, False])
def test_gemv_on_two_threads_splits_the_middle_tile_of_an_odd_count_by_its_inputs(rows, amx, amx_rows_restored):
    """Nine tiles (the default model's O and down projections) on two threads: thread 0 takes the first
    half of the middle tile's inputs, thread 1 the second, and their float32 sums are added; past
    GEMV_SPLIT_MAX_ROWS (128) the tile is taken whole. Either way the sums are of exact products, rounding
    them gives the bf16 output, and the tiles' placement in parts does not change a bit."""
    from batchpilot.model.hugepages import HugePageArena

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kernels.gemv_use_amx(1 if amx else 0)
        g = torch.Generator().manual_seed(rows)
        w = torch.randn(9 * kernels.GEMV_TILE, 1536, generator=g).to(torch.bfloat16)
        b = torch.randn(9 * kernels.GEMV_TILE, generator=g).to(torch.bfloat16)
        x = torch.randn(rows, 1536, generator=g).to(torch.bfloat16)
        whole = kernels.pack_gemv_weight(w)
        placed = whole.place([HugePageArena(), HugePageArena()])
        exact = F.linear(x.double(), w.double(), b.double())
        for _ in range(20):  # thread 1's sums are posted while thread 0 works: no run may read them early
            sums = kernels.gemv(x, placed, b, float_out=True)
            torch.testing.assert_close(sums.double(), exact, rtol=1e-5, atol=2e-4)
        assert torch.equal(sums.to(torch.bfloat16), kernels.gemv(x, placed, b))
        assert torch.equal(kernels.gemv(x, whole, b, float_out=True), sums)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rows", [1, 8])
def test_gemv_tiles_shared_out_at_run_time_are_each_computed_once(rows):
    """An even number of tiles on two threads is shared out as they go: each takes its part's tiles from the
    front, then the other's from the back. Whichever thread computes a tile, it is the same sums: 2 threads
    give the 1-thread output bit for bit, call after call on fresh inputs (a tile skipped would keep another
    call's values, one taken twice a torn row), placed in two streams as the model's are."""
    from batchpilot.model.hugepages import HugePageArena

    threads = torch.get_num_threads()
    try:
        g = torch.Generator().manual_seed(rows)
        w = torch.randn(64 * kernels.GEMV_TILE, 576, generator=g).to(torch.bfloat16)
        placed = kernels.pack_gemv_weight(w).place([HugePageArena(), HugePageArena()])
        for _ in range(30):
            x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
            torch.set_num_threads(2)
            shared = kernels.gemv(x, placed, None, float_out=True)
            torch.set_num_threads(1)
            alone = kernels.gemv(x, placed, None, float_out=True)
            assert torch.equal(shared, alone)
        torch.testing.assert_close(alone.double(), F.linear(x.double(), w.double()), rtol=1e-5, atol=2e-4)
    finally:
        torch.set_num_threads(threads)
