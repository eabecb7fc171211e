"""Weight-only quantized weights for the CPU, multiplied by torch's own kernels.

- int8: one scale per output channel, symmetric (w ~ q * s, q in [-127, 127]); torch's
  `_weight_int8pack_mm`.
- int4: groups of 32 inputs, asymmetric (w ~ q * s + m, q in [0, 15], s = (max - min) / 15,
  m = min): the scheme of GGUF's Q4_1, so the default model's own Q4_1 blocks, dequantized when its
  folder was written, quantize back to the same integers. torch's `_weight_int4pack_mm_for_cpu`
  computes (q - 8) * scale + zero, so zero = m + 8 s.

Activations stay in the model's dtype and the kernels sum in float32. Scales are kept in the
activations' dtype, as the kernels require: bf16 scales round a group's scale and offset by up to
2^-9 of their value, which the quality check (docs/reproduction.md) includes. Measured on a Zen 4
EPYC, these kernels read a weight faster than the bf16 matmul at one to a few rows, where decode is
bound by memory, and are 2-3x slower from 16 rows, where it is bound by compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batchpilot.config import QUANTIZATIONS
from batchpilot.model import kernels

INT4_GROUP = 32


@dataclass
class Int8Weight:
    q: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N], the activations' dtype

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scales)

    def dequantize(self) -> torch.Tensor:
        """The weight in the scales' dtype (q is exact in bf16; one rounding per product)."""
        return self.q.to(self.scales.dtype) * self.scales.unsqueeze(1)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes


@dataclass
class Int4Weight:
    packed: torch.Tensor  # torch's CPU int4 layout of [N, K]
    scales_zeros: torch.Tensor  # [K / group, N, 2]: (scale, zero), the activations' dtype
    group_size: int
    shape: tuple[int, int]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_zeros)

    def dequantize(self) -> torch.Tensor:
        """The weight in the scales' dtype: (q - 8) * scale + zero, rounded once."""
        if kernels.native_available():
            return kernels.dequant_int4(self.packed, self.scales_zeros, self.shape, self.group_size)
        n, k = self.shape
        q = unpack_int4(self.packed, n, k).float().view(n, k // self.group_size, self.group_size)
        scale, zero = self.scales_zeros.float().transpose(0, 1).unbind(-1)  # [N, K / group] each
        return ((q - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).view(n, k).to(self.scales_zeros.dtype)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
    q = (w / scales.float().unsqueeze(1)).round().clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scales)


def quantize_int4(weight: torch.Tensor, dtype: torch.dtype, group_size: int = INT4_GROUP) -> Int4Weight:
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 needs input features divisible by {group_size}, got {k}")
    groups = weight.float().view(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).to(dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0, value = low
    low = low.to(dtype).float()
    q = ((groups - low.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).to(torch.int32).view(n, k)
    return int4_from_blocks(q, scale, low, dtype, group_size)


def int4_from_blocks(q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype,
                     group_size: int = INT4_GROUP) -> Int4Weight:
    """Q4_1-style blocks (value = q * scale + low; q int [N, K] in [0, 15], scale and low [N, K / group])
    in torch's int4 layout."""
    n, k = q.shape
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    zeros = low.float() + 8 * scale.float()
    scales_zeros = torch.stack([scale.float(), zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return Int4Weight(packed, scales_zeros, group_size, (n, k))


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The integers [N, K] (uint8, 0-15) of torch's CPU int4 layout: [N / 64][K][32] bytes, byte
    (b, k, j) holding weight (64 b + j, k) low and (64 b + 32 + j, k) high (csrc/dequant.c)."""
    blocks = packed.view(n // 64, k, 32)
    return torch.cat([blocks & 0xF, blocks >> 4], dim=2).permute(0, 2, 1).reshape(n, k)


def quantize(weight: torch.Tensor, mode: str, dtype: torch.dtype) -> Int8Weight | Int4Weight:
    if mode == "int8":
        return quantize_int8(weight, dtype)
    if mode == "int4":
        return quantize_int4(weight, dtype)
    raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {mode!r}")
