"""Linear layers for the CPU: bf16 weights laid out for the few rows of decode steps.

`F.linear` hands oneDNN a plain [out, in] weight, which it reorders into its blocked layout on
every call; at a few rows that reorder is most of the call. Prepacking once (what vLLM's CPU
backend and inductor's freezing do) made a bf16 matmul 1.3-2x faster at 1-128 rows on an AMX
Xeon, 1.2-1.4x at 192-320 (a mixed step: a prompt beside the decodes), and level or slower from 384 to
512 (a prefill chunk), so there steps of up to `PACKED_MAX_ROWS_AMX` rows take the packed weight and
larger ones the plain weight; with AVX512-BF16 and no AMX (Zen 4) the packed weight was 1.09x the plain
one at 256-2048 rows, and serves every step. Up to `GEMV_MAX_ROWS` rows our own kernel (kernels.gemv,
where the CPU has AVX512-BF16) streams the weight at memory speed without oneDNN's per-call cost; with
AMX it multiplies on the tiles too (kernels.gemv_amx_min_rows: its vector loop alone fell behind oneDNN's
tiles from 8 rows, 2.6x at 128), and where the library has no AMX path its vector loop serves only the
steps of up to `GEMV_MAX_ROWS_AMX` rows. The copies are kept side by side: packing is only done for
models small enough that they cost little (`PACK_LIMIT_BYTES`); measurements in docs/reproduction.md.

Where the CPU has no bf16 instructions, bf16 matmuls are slow: torch's reference loop on AVX2-only
CPUs (the AMD EPYC hosts here, 7x slower than float32), oneDNN's software conversion on AVX-512
without AVX512-BF16 (an Ice Lake-class Xeon here, 4x slower from 32 rows). There the model stays
bf16 (its weights, KV cache and roundings as on any host): steps of up to `GEMV_MAX_ROWS_EMULATED`
rows take our kernel (bf16 weights, float32 sums; ahead of oneDNN's float32 call to 16 rows on the
EPYC, level at 32-64), larger ones an exact float32 copy of the weight, prepacked by oneDNN
(1.3-2.5x torch's MKL call at 1-512 rows on the EPYC), the result rounded to bf16 once: what
oneDNN's bf16 matmul computes, float32 sums of exact products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchpilot.model import kernels, quant
from batchpilot.model.hugepages import HugePageArena

GEMV_MAX_ROWS = 128  # our kernel and the one-call decode loop led oneDNN's prepacked call at 1-128 rows
GEMV_MAX_ROWS_AMX = 4  # with AMX and our kernel without its AMX path: it leads oneDNN only to 4 rows
GEMV_MAX_ROWS_EMULATED = 16  # where bf16 matmul is not native: our kernel leads oneDNN's float32 to 16 rows
PACKED_MAX_ROWS_AMX = 384
PACK_LIMIT_BYTES = 2 * 2**30  # weights of every packed layer together (bf16 bytes)


def bf16_matmul_native() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). oneDNN also reports bf16
    support on plain AVX-512, where it converts in software: 4x slower than float32 from 32 rows
    on an Ice Lake-class Xeon (docs/reproduction.md); on AVX2-only CPUs torch falls back to a
    reference loop, 7x slower. Both take the float32 path."""
    return (torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
            and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


def pack_all(layers: list[Linear], streams: list[HugePageArena] | None = None) -> bool:
    """Give every bf16 layer its few-row and many-row copies when their weights fit PACK_LIMIT_BYTES,
    the few-row ones split over `streams` (one layer at a time: each temporary is freed before the next)."""
    if not layers or layers[0].weight.dtype != torch.bfloat16:
        return False
    if sum(layer.weight.nbytes for layer in layers) > PACK_LIMIT_BYTES:
        return False
    for layer in layers:
        layer.pack()
        if streams is not None:
            layer.move_streamed(streams)
    return True


class Linear:
    """y = x W^T + b, from the copy of the weight laid out for the step's number of rows."""

    __slots__ = ("weight", "bias", "packed", "packed_rows", "gemv", "gemv_rows", "upcast", "upcast_bias",
                 "quantized", "float_out")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self.packed: torch.Tensor | None = None  # oneDNN's blocked bf16 layout
        self.packed_rows = 0  # the most rows of a step the packed weight serves
        self.gemv: kernels.GemvTiles | None = None
        self.gemv_rows = GEMV_MAX_ROWS
        self.upcast: torch.Tensor | None = None  # float32 prepacked, where bf16 matmul is not native
        self.upcast_bias: torch.Tensor | None = None
        self.quantized: quant.Int8Weight | quant.Int4Weight | None = None
        # Rows our GEMV computes come out float32, unrounded (the lm_head: logits of 16-32 rounded to
        # bf16 are 0.125 apart, and two candidates a few hundredths apart tie); other paths give bf16.
        self.float_out = False

    @classmethod
    def from_quantized(cls, weight: quant.Int8Weight | quant.Int4Weight, bias: torch.Tensor | None = None) -> Linear:
        """A layer whose weight exists only quantized (a GGUF's own 4-bit blocks)."""
        layer = cls(None, bias)  # type: ignore[arg-type]
        layer.quantized = weight
        return layer

    def quantize(self, mode: str, dtype: torch.dtype | None = None, int8_group: int = 0) -> None:
        """Keep only the quantized weight (quant.QUANTIZATIONS) for activations of `dtype` (default: the
        weight's), in place of every float copy; `int8_group` as quant.quantize."""
        self.quantized = quant.quantize(self.weight, mode, dtype or self.weight.dtype, int8_group)
        self.weight = self.packed = self.gemv = self.upcast = None

    def pack(self) -> None:
        """Keep the copies this CPU multiplies fastest: oneDNN-prepacked where bf16 is native, float32
        where it is not, and our kernel's tiles for few rows where it runs."""
        if bf16_matmul_native():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
            amx = torch.cpu._is_amx_tile_supported()
            self.packed_rows = PACKED_MAX_ROWS_AMX if amx else 2**62
            self.gemv_rows = GEMV_MAX_ROWS_AMX if amx and not kernels.gemv_amx_min_rows() else GEMV_MAX_ROWS
        else:
            self.upcast = torch.ops.mkldnn._reorder_linear_weight(self.weight.float())
            self.upcast_bias = None if self.bias is None else self.bias.float()
            self.gemv_rows = GEMV_MAX_ROWS_EMULATED
        if kernels.gemv_supports(self.weight):
            self.gemv = kernels.pack_gemv_weight(self.weight)

    def move_streamed(self, streams: list[HugePageArena]) -> None:
        """Move the copy the few-row kernels stream onto huge pages: our bf16 tiles split over `streams`,
        thread j's share into streams[j] (kernels.GemvTiles.place), or the quantized tiles and their scales
        into streams[0]."""
        if self.gemv is not None:
            self.gemv = self.gemv.place(streams)
        if self.quantized is not None:
            self.quantized.move_streamed(streams[0])

    def kernel_operands(self) -> tuple[tuple, int] | None:
        """((weight, scales, lows, bits, group, parts), rows): the operands of the native few-row kernel this
        layer runs, as csrc/decode_layers.c takes them (bits 16: the address of kernels.gemv's bf16 tiles'
        part pointers; 8 / 4: qgemv's tensors, one part), and the most rows __call__ gives it; None where
        that kernel is not the one that runs, or not alone (a quantized layer adds its bias after the kernel)."""
        if self.quantized is not None:
            if self.bias is not None:
                return None
            operands = self.quantized.kernel_operands()
            return None if operands is None else ((*operands, 1), self.quantized.kernel_max_rows)
        if self.gemv is None:
            return None
        return (self.gemv.address, None, None, 16, 0, len(self.gemv.parts)), self.gemv_rows

    def gemv_for(self, rows: int) -> kernels.GemvTiles | None:
        """The bf16 tiles __call__ multiplies `rows` rows by (kernels.gemv), or None where another path runs."""
        return self.gemv if self.gemv is not None and rows <= self.gemv_rows else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            x2 = x.reshape(-1, x.shape[-1])
            y = (self.quantized.matmul(x2) if x2.shape[0] <= self.quantized.kernel_max_rows
                 else F.linear(x2, self.quantized.dequantize()))
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], y.shape[-1])
        if x.dim() == 2:
            if (tiles := self.gemv_for(x.shape[0])) is not None:
                return kernels.gemv(x, tiles, self.bias, self.float_out)
            if self.packed is not None and x.shape[0] <= self.packed_rows:
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
            if self.upcast is not None:
                return torch.ops.mkldnn._linear_pointwise(x.float(), self.upcast, self.upcast_bias, "none", [],
                                                          "").to(x.dtype)
        return F.linear(x, self.weight, self.bias)
