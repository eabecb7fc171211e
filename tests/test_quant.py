"""Weight-only int8 / int4: torch's kernels, our dequantization and the layer dispatch against a float
reference built from the same integers; and the default model's greedy text under each."""

import pytest
import torch
import torch.nn.functional as F

from batchpilot.model import kernels, quant
from batchpilot.model.linear import Linear
from tests.helpers import write_gguf


def q4_blocks(n, k, seed, group=quant.INT4_GROUP, dtype=torch.bfloat16):
    """Random Q4_1-style blocks with scales and offsets already representable in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale = (torch.rand(n, k // group, generator=g) * 0.05 + 0.001).to(dtype).float()
    low = (-torch.rand(n, k // group, generator=g) * 0.4).to(dtype).float()
    return q, scale, low


# Our tiled kernel where the CPU has AVX512-BF16 (csrc/qgemv.c), and torch's layout everywhere.
LAYOUTS = ["torch"] + (["tiled"] if kernels.qgemv_available() else [])


@pytest.fixture(params=LAYOUTS)
def layout(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(kernels, "qgemv_available", lambda: False)
    return request.param


def test_int4_layout_round_trips_through_torchs_packing():
    q, _, _ = q4_blocks(192, 96, seed=0)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(quant.unpack_int4(packed, 192, 96).to(torch.int32), q)


@pytest.mark.parametrize("mode", quant.QUANTIZATIONS)
def test_dequantize_is_the_weight_the_kernel_multiplies_by(mode, layout):
    """dequantize() is reference() rounded once to bf16; the kernel, fed identity rows, reads back
    reference() rounded to bf16 (one product per output)."""
    g = torch.Generator().manual_seed(1)
    w = quant.quantize(torch.randn(128, 64, generator=g).to(torch.bfloat16), mode, torch.bfloat16)
    assert w.tiled == (layout == "tiled")
    ref = w.reference(rows=64)
    deq = w.dequantize()
    assert deq.shape == (128, 64)
    assert torch.equal(deq.to(torch.bfloat16), ref.to(torch.bfloat16))
    read_back = w.matmul(torch.eye(64, dtype=torch.bfloat16)).t()  # [N, K]
    assert torch.equal(read_back, ref.to(torch.bfloat16))


def test_int4_dequantize_without_a_compiler_matches_the_native_one(monkeypatch):
    monkeypatch.setattr(kernels, "qgemv_available", lambda: False)
    q, scale, low = q4_blocks(128, 64, seed=3)
    w = quant.int4_from_blocks(quant.pack_pairs(q), scale, low, torch.bfloat16)
    native = w.dequantize()
    monkeypatch.setattr(kernels, "native_available", lambda: False)
    assert torch.equal(w.dequantize(), native)


def test_int4_quantize_recovers_q4_1_blocks(layout):
    """A weight on a Q4_1 grid (what the default model's folder holds) quantizes back to its integers."""
    q, scale, low = q4_blocks(64, 128, seed=2)
    q[:, ::32], q[:, 1::32] = 0, 15  # every group spans the full range, as the Q4_1 quantizer makes it
    weight = (q.float() * scale.repeat_interleave(32, 1) + low.repeat_interleave(32, 1)).to(torch.bfloat16)
    w = quant.quantize_int4(weight, torch.bfloat16)
    assert torch.equal(w.integers().to(torch.int32), q)


@pytest.mark.parametrize("mode", quant.QUANTIZATIONS)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 17, 128, 129, 200])
def test_quantized_linear_matches_its_weight(mode, rows, layout):
    """Up to the kernel's rows the kernel multiplies by reference(); beyond, the dequantized weight
    goes through the float matmul. Either equals x times that weight summed in float32, up to a bf16
    rounding of the result; and the quantized weight is within half a step (and bf16 roundings) of
    the float one."""
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(192, 128, generator=g).to(torch.bfloat16)
    bias = torch.randn(192, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 3 * 128, generator=g).to(torch.bfloat16)[:, 128:256]  # strided rows, as in a step
    layer = Linear(weight, bias)
    layer.quantize(mode)
    assert layer.weight is None and layer.quantized is not None
    w = weight.float()
    ref = layer.quantized.reference(rows)
    step = w.abs().amax(1, keepdim=True) / 127 if mode == "int8" else 2 * w.abs().amax() / 15
    assert ((ref - w).abs() <= step / 2 * 1.1 + w.abs() * 2**-7).all()
    used = ref if rows <= layer.quantized.kernel_max_rows else layer.quantized.dequantize().float()
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 192)
    x_used = layer.quantized.activations(x) if rows <= layer.quantized.kernel_max_rows else x.float()
    torch.testing.assert_close(out.float(), F.linear(x_used, used, bias.float()), rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("rows", [1, 4, 5, 64])
def test_int4_blocks_multiply_by_their_exact_values(rows, symmetric, layout):
    """GGUF blocks (Q4_1: q * scale + low; Q4_0: low = -8 * scale, stored without its lows) in our tiles
    multiply by exactly q * scale + low up to the fused rows, by those values rounded to bf16 beyond:
    the tiles hold scale and low in float16 (the file's own numbers), none for Q4_0's implied low."""
    q, scale, low = q4_blocks(128, 256, seed=rows, dtype=torch.float16)
    if symmetric:
        low = -8 * scale
    w = quant.int4_from_blocks(quant.pack_pairs(q), scale, low, torch.bfloat16)
    exact = (q.float().view(128, 8, 32) * scale.unsqueeze(-1) + low.unsqueeze(-1)).view(128, 256)
    if w.tiled:
        assert w.scales_zeros.dtype == torch.float16 and len(w.scales_zeros) == (1 if symmetric else 2)
        used = exact if rows <= kernels.qgemv_fused_max_rows() else exact.to(torch.bfloat16).float()
        assert torch.equal(w.reference(rows), used)
    else:  # torch's kernel takes scales and zeros in bf16: the values move by those roundings
        used = w.reference(rows) if rows <= w.kernel_max_rows else w.dequantize().float()
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    out = w.matmul(x) if rows <= w.kernel_max_rows else F.linear(x, w.dequantize().to(torch.bfloat16))
    torch.testing.assert_close(out.float(), F.linear(w.activations(x), used), rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 4, 5, 64])
def test_int8_blocks_multiply_by_their_exact_values(rows, layout):
    """GGUF Q8_0 blocks (q * scale, a float16 scale per 32 inputs) in our tiles multiply by exactly
    q * scale up to the fused rows and by those values rounded to bf16 beyond; torch's layout takes a
    scale per output only, so there they are quantized again, within half a step of that scale."""
    g = torch.Generator().manual_seed(rows)
    q = torch.randint(-127, 128, (128, 256), generator=g, dtype=torch.int8)
    scale = (torch.rand(128, 8, generator=g) * 0.01 + 1e-4).to(torch.float16).float()
    w = quant.int8_from_blocks(q, scale, torch.bfloat16)
    exact = (q.float().view(128, 8, 32) * scale.unsqueeze(-1)).view(128, 256)
    if w.tiled:
        assert w.group_size == 32 and w.scales.dtype == torch.float16
        used = exact if rows <= kernels.qgemv_fused_max_rows() else exact.to(torch.bfloat16).float()
        assert torch.equal(w.reference(rows), used)
        assert torch.equal(w.dequantize(), exact.to(torch.bfloat16))
        eye = torch.eye(256, dtype=torch.bfloat16)  # each output read back through both kernel paths
        assert torch.equal(w.matmul(eye).t(), w.dequantize())
        assert torch.equal(w.matmul(eye[:3]).t(), w.dequantize()[:, :3])
    else:
        assert w.group_size == 0
        assert ((w.reference() - exact).abs() <= exact.abs().amax(1, keepdim=True) / 250).all()
        used = w.reference(rows) if rows <= w.kernel_max_rows else w.dequantize().float()
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    out = w.matmul(x) if rows <= w.kernel_max_rows else F.linear(x, w.dequantize().to(torch.bfloat16))
    torch.testing.assert_close(out.float(), F.linear(w.activations(x), used), rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("rows", [1, 2, 4, 6, 8])
def test_int4_few_rows_multiply_inputs_rounded_to_int8_per_group(rows, layout):
    """Up to the fused rows our int4 kernel rounds each group of 32 inputs to int8 (amax / 127, to nearest
    even), as llama.cpp's Q4 x Q8 products do: its outputs are that rounded x times the exact weight,
    rounded to bf16; a group of zeros stays zero, and a group's largest input comes back (to a float32
    rounding). torch's layout multiplies x as it is."""
    q, scale, low = q4_blocks(256, 128, seed=11, dtype=torch.float16)
    w = quant.int4_from_blocks(quant.pack_pairs(q), scale, low, torch.bfloat16)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    x[:, 32:64] = 0
    rounded = w.activations(x)
    if not w.tiled:
        assert torch.equal(rounded, x.float())
        return
    assert torch.equal(rounded[:, 32:64], torch.zeros(rows, 32))
    groups = x.float().view(rows, 4, 32)
    peaks = groups.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(rounded.view(rows, 4, 32).gather(-1, peaks), groups.gather(-1, peaks),
                               rtol=2**-23, atol=0)
    exact = (q.float().view(256, 4, 32) * scale.unsqueeze(-1) + low.unsqueeze(-1)).view(256, 128)
    out = w.matmul(x)
    # the rounded rows' products, rounded to bf16, are the kernel's outputs (measured: all 256 x rows equal;
    # against x itself a quarter); 98% leaves room for a float32 sum rounded the other way at a bf16 tie
    assert (out == F.linear(rounded, exact).to(torch.bfloat16)).float().mean() >= 0.98
    assert (out == F.linear(x.float(), exact).to(torch.bfloat16)).float().mean() < 0.5


@pytest.mark.parametrize("scales", ["per group", "per output"])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 8])
def test_int8_few_rows_multiply_inputs_as_int16_per_group(rows, scales, layout):
    """Up to the fused rows (4 a pass over a tile) our int8 kernel takes each group of 32 inputs (the
    weight's groups: the lm_head, Q8_0; or 32 inputs where its scales are per output) as int16 times a
    power of two (2^(e - 15) for the group's largest f 2^e): inputs within 2^7 of the largest come back
    exactly, a tiny one is rounded to that step, a group of zeros stays zero, and the outputs are those
    rows' products with the exact weights, rounded to bf16. torch's layout multiplies x as it is."""
    g = torch.Generator().manual_seed(rows)
    q = torch.randint(-127, 128, (128, 128), generator=g, dtype=torch.int8)
    if scales == "per group":
        scale = (torch.rand(128, 4, generator=g) * 0.01 + 1e-4).to(torch.float16).float()
        w = quant.int8_from_blocks(q, scale, torch.bfloat16)
    else:  # scales per output: the rows in groups of 32 all the same
        scale = (torch.rand(128, 1, generator=g) * 0.01 + 1e-4).to(torch.bfloat16).float().expand(128, 4)
        w = quant.quantize_int8((q.float() * scale[:, :1]).to(torch.bfloat16), torch.bfloat16)
        assert w.group_size == 0
    x = torch.randn(rows, 128, generator=g).to(torch.bfloat16)
    x[:, 32:64] = 0
    x[:, 64] = 100.0  # this group's step: 2^(7 - 15) = 2^-8
    x[:, 65] = 2**-12 * 3  # below it: rounded to 0
    x[:, 66] = 2**-8 * 3  # on it: exact
    rounded = w.activations(x)
    if not w.tiled:
        assert torch.equal(rounded, x.float())
        return
    assert torch.equal(rounded[:, 32:64], torch.zeros(rows, 32))
    assert torch.equal(rounded[:, 65], torch.zeros(rows)) and torch.equal(rounded[:, 66], x[:, 66].float())
    big = x.float().abs() >= x.float().view(rows, 4, 32).abs().amax(-1).repeat_interleave(32, 1) / 2**7
    assert torch.equal(rounded[big], x.float()[big])
    exact = w.reference(rows)
    if scales == "per group":
        assert torch.equal(exact, (q.float().view(128, 4, 32) * scale.unsqueeze(-1)).view(128, 128))
    out = w.matmul(x)
    # 98%: room for a float32 sum rounded the other way at a bf16 tie
    assert (out == F.linear(rounded, exact).to(torch.bfloat16)).float().mean() >= 0.98


@pytest.mark.parametrize("rows", [1, 4, 5, 8])
def test_int8_per_output_without_whole_groups_multiplies_the_rows_as_they_are(rows, layout):
    """Scales per output and K not a multiple of 32: the kernel has no groups to take the rows in and
    expands the weights to bf16 instead (in registers up to 4 rows, once per tile beyond); the rows are
    multiplied as they are."""
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(128, 80, generator=g).to(torch.bfloat16)
    w = quant.quantize_int8(weight, torch.bfloat16)
    x = torch.randn(rows, 80, generator=g).to(torch.bfloat16)
    assert torch.equal(w.activations(x), x.float())
    torch.testing.assert_close(w.matmul(x).float(), F.linear(x.float(), w.reference(rows)), rtol=8e-3, atol=1e-2)


def test_int8_blocks_of_a_70b_down_projection_run_at_few_rows(layout):
    """Q8_0 blocks with K = 28,672 inputs (a 70B model's MLP width) at 4 rows: the rows as int16 fit the
    kernel's workspace, and the outputs are those rows' products with the exact weights."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (64, 28672), generator=g, dtype=torch.int8)
    scale = (torch.rand(64, 28672 // 32, generator=g) * 0.01 + 1e-4).to(torch.float16).float()
    w = quant.int8_from_blocks(q, scale, torch.bfloat16)
    x = torch.randn(4, 28672, generator=g).to(torch.bfloat16)
    out = w.matmul(x).float()
    ref = F.linear(w.activations(x), w.reference(4))
    # sums of 28,672 products (|y| ~ 60): bf16 outputs, and torch's kernel sums the bf16-rounded weights
    assert ((out - ref).norm() / ref.norm()).item() < (4e-3 if w.tiled else 2e-2)


def test_int8_groups_keep_each_weight_within_half_a_step_of_its_group(layout):
    """Group-wise int8 (Q8_0's scheme, float16 scale amax / 127 per 32 inputs) where our kernel runs:
    every weight within half its group's step, a zero group exactly zero; per output elsewhere."""
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 1, 256)
    w[5, 32:64] = 0
    q = quant.quantize_int8(w.to(torch.bfloat16), torch.bfloat16, group_size=quant.Q8_GROUP)
    assert q.group_size == (quant.Q8_GROUP if layout == "tiled" else 0)
    if layout == "tiled":
        exact = w.to(torch.bfloat16).float()
        step = exact.view(128, 8, 32).abs().amax(-1, keepdim=True) / 127
        assert ((q.reference() - exact).view(128, 8, 32).abs() <= 0.51 * step).all()
        assert torch.equal(q.reference()[5, 32:64], torch.zeros(32))
        huge = quant.quantize_int8(torch.full((64, 64), 1e7, dtype=torch.bfloat16), torch.bfloat16, quant.Q8_GROUP)
        assert huge.group_size == 0  # its group scale is beyond float16: a scale per output instead


def test_the_lm_head_takes_scales_per_group_under_either_mode():
    from batchpilot.model import loader
    from batchpilot.model.llama import LlamaModel

    ckpt = loader.load_checkpoint(None)
    for mode in quant.QUANTIZATIONS:
        head = LlamaModel(ckpt.args, ckpt.weights, torch.bfloat16, mode).lm_head.quantized
        assert isinstance(head, quant.Int8Weight)
        assert head.group_size == (quant.Q8_GROUP if kernels.qgemv_available() else 0)


def test_quantized_layer_takes_the_kernel_for_few_rows_and_the_dequantized_weight_beyond(monkeypatch, layout):
    calls = []
    layer = Linear(torch.randn(64, 64).to(torch.bfloat16))
    layer.quantize("int8")
    limit = layer.quantized.kernel_max_rows
    assert limit == (quant.QGEMV_MAX_ROWS if layout == "tiled" else quant.TORCH_KERNEL_MAX_ROWS)
    monkeypatch.setattr(quant.Int8Weight, "matmul",
                        lambda self, x: calls.append("kernel") or x @ self.dequantize().to(x.dtype).t())
    monkeypatch.setattr(quant.Int8Weight, "dequantize",
                        lambda self, orig=quant.Int8Weight.dequantize: calls.append("dequantize") or orig(self))
    layer(torch.randn(limit, 64).to(torch.bfloat16))
    assert calls[0] == "kernel"
    calls.clear()
    layer(torch.randn(limit + 1, 64).to(torch.bfloat16))
    assert calls == ["dequantize"]


def test_unknown_quantization_is_refused_naming_the_flag():
    from batchpilot.config import EngineConfig

    with pytest.raises(ValueError, match="--quantization"):
        EngineConfig(quantization="fp8")


@pytest.mark.parametrize("mode,min_agreement", [("int8", 0.5), ("int4", 0.5)])
def test_default_model_quantized_greedy_agrees_with_bf16(mode, min_agreement):
    """Greedy text of the quantized default model against its bf16 weights: the share of tokens
    generated before the first difference, over varied prompts (measured: docs/reproduction.md). The
    eight rows a step here take the host's few-row int4 path: on a CPU without AMX that rounds the
    inputs to int8 for the integer dot products (as llama.cpp does), and int4 agreed 58% here on a Zen 4
    EPYC (104 of 179 tokens) against 70% and more where AMX tiles take eight rows; a broken kernel
    agrees on almost nothing."""
    from batchpilot import LLM, SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "List three primary colours:",
               "Once upon a time, in a small village,", "The three laws of thermodynamics are",
               "import numpy as np\n", "Water boils at", "My favourite book is"]
    params = SamplingParams(temperature=0, max_tokens=24)
    reference = LLM(kv_cache_gib=0.05, threads=2).generate(prompts, params)
    llm = LLM(kv_cache_gib=0.05, threads=2, quantization=mode)
    layer = llm.engine.executor.model.layers[0]
    assert layer.qkv.weight is None and layer.qkv.quantized is not None  # the float weights are gone
    assert isinstance(llm.engine.executor.model.lm_head.quantized, quant.Int8Weight)  # lm_head at 8 bits
    outputs = llm.generate(prompts, params)
    same = 0
    for a, b in zip(reference, outputs, strict=True):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        same += next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    total = sum(len(a.outputs[0].token_ids) for a in reference)
    assert same / total >= min_agreement, f"{mode}: {same} of {total} tokens before the first difference"


def test_default_model_int4_keeps_its_gguf_q4_1_integers():
    """The default model is a Q4_1 GGUF; with --quantization int4 a layer holds the file's own 4-bit
    integers (scales to float32 / bf16 rounding), not a re-quantization of rounded values."""
    import numpy as np

    from batchpilot.model import gguf_file, loader
    from batchpilot.model.llama import LlamaModel

    reader = gguf_file.open_gguf(loader.default_gguf_path())
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type.name == "Q4_1"
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(-1, 20)  # per block: d, m (f16), 16 bytes of nibbles
    nibbles = blocks[:, 4:]
    q_file = torch.from_numpy(np.concatenate([nibbles & 0xF, nibbles >> 4], axis=1).astype(np.int32))
    ckpt = loader.load_checkpoint(None)
    model = LlamaModel(ckpt.args, ckpt.weights, torch.bfloat16, "int4")
    down = model.layers[0].down.quantized
    assert torch.equal(down.integers().to(torch.int32).reshape(-1, 32), q_file)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # llama: Q/K rows unpermuted as the file's floats
def test_gguf_q4_blocks_are_the_files_own_values(tmp_path, kind, model_type, monkeypatch):
    """A Q4_0 or Q4_1 tensor read as blocks gives exactly the values the file dequantizes to, its
    nibbles re-paired a band of rows at a time (bands of 48 here: the last one short)."""
    import gguf
    import numpy as np

    from batchpilot.model import gguf_file

    monkeypatch.setattr(gguf_file, "_PAIR_ROWS", 48)

    qtype = gguf.GGMLQuantizationType[kind]
    data = np.random.default_rng(0).standard_normal((128, 96)).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), model_type)
    writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.add_tensor("blk.0.ffn_down.weight", data)  # float32: not 4-bit blocks
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf_file.open_gguf(tmp_path / "t.gguf")
    weights = gguf_file.GGUFWeights(reader, {"model_type": model_type, "num_attention_heads": 4,
                                             "num_key_value_heads": 2})
    pairs, scale, low = weights.int4_blocks("model.layers.0.self_attn.q_proj.weight")
    q = quant.unpack_pairs(pairs)
    values = q.float().view(128, 3, 32) * scale.unsqueeze(-1) + low.unsqueeze(-1)
    assert torch.equal(values.view(128, 96), weights["model.layers.0.self_attn.q_proj.weight"])
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    assert weights.int4_blocks("model.layers.0.mlp.down_proj.weight") is None


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # llama: Q/K rows unpermuted as the file's floats
def test_gguf_q8_0_blocks_are_the_files_own_values(tmp_path, model_type):
    """A Q8_0 tensor read as blocks gives exactly the values the file dequantizes to; others give None."""
    import numpy as np

    from batchpilot.model import gguf_file

    data = np.random.default_rng(2).standard_normal((128, 96)).astype(np.float32)
    path = write_gguf(tmp_path / "q8.gguf", model_type, {"blk.0.attn_q.weight": data}, quantize="Q8_0")
    weights = gguf_file.GGUFWeights(gguf_file.open_gguf(path), {"model_type": model_type, "num_attention_heads": 4,
                                                                "num_key_value_heads": 2})
    name = "model.layers.0.self_attn.q_proj.weight"
    q, scale = weights.int8_blocks(name)
    assert q.dtype == torch.int8 and scale.shape == (128, 3)
    values = (q.float().view(128, 3, 32) * scale.unsqueeze(-1)).view(128, 96)
    assert torch.equal(values, weights[name])
    assert weights.int4_blocks(name) is None


def test_the_default_gguf_under_int8_runs_its_q8_0_output_matrix_as_its_blocks():
    """The default model's GGUF keeps its tied embedding / output matrix in Q8_0: under int8 the
    lm_head holds the file's own values (group-wise scales, where our kernel runs) rather than a
    second quantization per channel; the Q4_1 layers are quantized per channel. Its greedy text
    agrees with the folder's under int8 as closely as int8 agrees with bf16 (the test above)."""
    from batchpilot import LLM, SamplingParams
    from batchpilot.model import loader

    from_file = LLM(str(loader.default_gguf_path()), kv_cache_gib=0.05, threads=2, quantization="int8")
    model = from_file.engine.executor.model
    if kernels.qgemv_available():
        assert model.lm_head.quantized.group_size == 32
    assert model.layers[0].down.quantized.group_size == 0
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = ["The capital of France is", "def add(a, b):"]
    a = [o.outputs[0].token_ids for o in from_file.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in LLM(kv_cache_gib=0.05, threads=2, quantization="int8").generate(
        prompts, params)]
    same = sum(next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(tb)) for ta, tb in zip(a, b))
    assert same >= 0.5 * sum(map(len, b)), (a, b)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_a_q4_embedding_kept_in_blocks_looks_up_the_rows_of_its_float_table(tmp_path, kind):
    """Under int4 a GGUF's 4-bit token embedding stays in its blocks; a lookup gives exactly the rows of
    the dequantized table in bf16, for ids in any order and repeated."""
    import numpy as np

    from batchpilot.model import gguf_file

    table = np.random.default_rng(1).standard_normal((300, 96)).astype(np.float32)
    path = write_gguf(tmp_path / "e.gguf", "qwen2", {"token_embd.weight": table}, quantize=kind)
    weights = gguf_file.GGUFWeights(gguf_file.open_gguf(path), {"model_type": "qwen2"})
    rows = quant.Int4Rows.from_blocks(*weights.int4_blocks("model.embed_tokens.weight"), torch.bfloat16)
    reference = weights["model.embed_tokens.weight"].to(torch.bfloat16)
    ids = torch.tensor([0, 299, 17, 17, 150])
    assert torch.equal(rows[ids], reference[ids])
    assert rows.packed.numel() == 300 * 48  # half a byte a weight


def test_a_q4_1_gguf_loaded_with_int4_runs_its_blocks_as_the_folder_does():
    """The default model's GGUF file given as --model with int4: its layers take the file's blocks
    directly and generate exactly what the converted folder's re-quantized layers do."""
    from batchpilot import LLM, SamplingParams
    from batchpilot.model import loader

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = ["The capital of France is", "def add(a, b):"]
    from_file = LLM(str(loader.default_gguf_path()), kv_cache_gib=0.05, threads=2, quantization="int4")
    from_folder = LLM(kv_cache_gib=0.05, threads=2, quantization="int4")
    a = [o.outputs[0].token_ids for o in from_file.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in from_folder.generate(prompts, params)]
    assert a == b
