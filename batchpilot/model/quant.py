"""Weight-only quantized weights for the CPU.

- int8: one scale per output channel, symmetric (w ~ q * s, q in [-127, 127]); a GGUF's Q8_0 blocks
  (a float16 scale per 32 inputs) are kept as they are where our kernel runs (int8_from_blocks).
- int4: groups of 32 inputs, asymmetric (w ~ q * s + m, q in [0, 15], s = (max - min) / 15,
  m = min): the scheme of GGUF's Q4_1, so the default model's own Q4_1 blocks, dequantized when its
  folder was written, quantize back to the same integers. Values are (q - 8) * scale + zero with
  zero = m + 8 s, the form torch's int4 kernel takes.

Where the CPU has AVX512-BF16, weights are laid out in tiles for our kernel (csrc/qgemv.c), which
expands a tile to bf16 once and multiplies every row of the step by it, up to QGEMV_MAX_ROWS rows (int4
at up to kernels.qgemv_fused_max_rows() rows instead multiplies its integers by the rows rounded to int8, and
int8 there by the rows as int16 with a power-of-two scale per group of inputs: `activations`).
Elsewhere torch's weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) serve up
to TORCH_KERNEL_MAX_ROWS rows; their scales must be in the activations' dtype (bf16 rounds a
group's scale and offset by up to 2^-9). Beyond those rows the weight is dequantized once per step
and the float matmul runs. Measurements: docs/reproduction.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from batchpilot.config import QUANTIZATIONS
from batchpilot.model import kernels
from batchpilot.model.hugepages import HugePageArena

INT4_GROUP = 32
Q8_GROUP = 32  # inputs per scale of group-wise int8 (GGUF's Q8_0), used for the lm_head
# Rows up to which a quantized matmul beats dequantizing the weight and running the float matmul:
# torch's kernels are 2-3x slower than bf16 from 16 rows; ours expands each tile once for all rows.
TORCH_KERNEL_MAX_ROWS = 16
QGEMV_MAX_ROWS = 128

TILE = 64  # outputs per tile of csrc/qgemv.c
QUANTIZE_ROWS = 4096  # rows quantized at a time


class _Layout:
    """Where a quantized weight's matmul beats dequantizing it, by layout."""

    tiled: bool  # our kernel's tiles (csrc/qgemv.c), else torch's layout

    @property
    def kernel_max_rows(self) -> int:
        return QGEMV_MAX_ROWS if self.tiled else TORCH_KERNEL_MAX_ROWS

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] as `matmul` multiplies it by reference(M), in float32: unchanged here."""
        return x.float()


@dataclass
class Int8Weight(_Layout):
    """Tiled for our kernel (csrc/qgemv.c, where the CPU has AVX512-BF16), else torch's layout."""

    q: torch.Tensor  # tiled: [N / 64][K / 2][64][2] int8; else [N, K] int8
    # per output (group_size 0): [N], float32 when tiled, else the activations' dtype (torch's kernel wants
    # it); per group of inputs (tiled only: Q8_0's scheme): [N / 64][K / group][64] float16
    scales: torch.Tensor
    shape: tuple[int, int]
    tiled: bool
    group_size: int = 0

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiled:
            return kernels.qgemv(x, *self.kernel_operands(), self.shape[0], None)
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.q, self.scales)

    def kernel_operands(self) -> tuple | None:
        """(weight, scales, lows, bits, group) as csrc/qgemv.c takes them; None for torch's layout."""
        return (self.q, self.scales, None, 8, self.group_size) if self.tiled else None

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] as `matmul` multiplies it, in float32: up to kernels.qgemv_fused_max_rows() rows our kernel takes
        each group of a row (the weight's group, or 32 inputs with scales per output: kernels.qgemv_row_group)
        as int16 times 2^(e - 15) for the group's largest magnitude f 2^e (f in [0.5, 1)), rounded to
        nearest even: exact for inputs within 2^7 of it. Else x itself."""
        group = kernels.qgemv_row_group(8, self.group_size, self.shape[1]) if self.tiled else 0
        if not group or x.shape[0] > kernels.qgemv_fused_max_rows():
            return x.float()
        groups = x.float().view(x.shape[0], -1, group)
        _, e = torch.frexp(groups.abs().amax(dim=-1, keepdim=True))
        step = torch.ldexp(torch.ones_like(groups[..., :1]), e - 15)  # amax 0: e 0, and the group is zeros
        return ((groups / step).round() * step).view(x.shape)

    def move_streamed(self, arena: HugePageArena) -> None:
        """Our kernel's tiles and scales into `arena` (torch's layout stays where torch put it)."""
        if self.tiled:
            self.q, self.scales = arena.copy(self.q), arena.copy(self.scales)

    def dequantize(self) -> torch.Tensor:
        """The weight in bf16 (tiled) or the scales' dtype: q * s, rounded once."""
        if self.tiled:
            return kernels.qdequant(self.q, self.scales, None, 8, self.group_size, self.shape)
        return self.q.to(self.scales.dtype) * self.scales.unsqueeze(1)

    def reference(self, rows: int = 1) -> torch.Tensor:
        """The float32 weight `matmul` of `rows` rows multiplies by: q * s exactly (per output, the sums
        are scaled once; per group up to kernels.qgemv_fused_max_rows(), each group's sums), else q * s rounded to
        bf16 (the expanded tiles)."""
        if self.group_size and rows > kernels.qgemv_fused_max_rows():
            return self.dequantize().float()
        n, k = self.shape
        q = self.q.transpose(1, 2).reshape(n, k) if self.tiled else self.q
        if not self.group_size:
            return q.float() * self.scales.float().unsqueeze(1)
        scale = self.scales.float().transpose(1, 2).reshape(n, k // self.group_size)
        return (q.float().view(n, -1, self.group_size) * scale.unsqueeze(-1)).view(n, k)


@dataclass
class Int4Weight(_Layout):
    """Tiled for our kernel (csrc/qgemv.c), else torch's packed layout."""

    # tiled: [N / 64][K / 8][64][4] bytes, a word per output and 8 inputs, byte i holding input i low and
    # 4 + i high (csrc/qgemv.c); else torch's layout
    packed: torch.Tensor
    # tiled: scale and low (value = q * scale + low), [2][N / 64][K / group][64] float16, or the scale
    # alone ([1][...]) for symmetric blocks (low = -8 * scale: GGUF's Q4_0); else scale and zero
    # (value = (q - 8) * scale + zero), [K / group][N][2] in the activations' dtype
    scales_zeros: torch.Tensor
    group_size: int
    shape: tuple[int, int]
    tiled: bool

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiled:
            return kernels.qgemv(x, *self.kernel_operands(), self.shape[0], None)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.group_size,
                                                          self.scales_zeros)

    def kernel_operands(self) -> tuple | None:
        """(weight, scales, lows, bits, group) as csrc/qgemv.c takes them; None for torch's layout."""
        return (self.packed, self.scales_zeros[0], self._lows, 4, self.group_size) if self.tiled else None

    def move_streamed(self, arena: HugePageArena) -> None:
        """Our kernel's tiles, scales and lows into `arena` (torch's layout stays where torch put it)."""
        if self.tiled:
            self.packed, self.scales_zeros = arena.copy(self.packed), arena.copy(self.scales_zeros)

    def dequantize(self) -> torch.Tensor:
        """The weight in bf16 (tiled) or the scales' dtype: (q - 8) * scale + zero, rounded once."""
        if self.tiled:
            return kernels.qdequant(self.packed, self.scales_zeros[0], self._lows, 4, self.group_size, self.shape)
        if kernels.native_available():
            return kernels.dequant_int4(self.packed, self.scales_zeros, self.shape, self.group_size)
        return self._exact().to(self.scales_zeros.dtype)

    def reference(self, rows: int = 1) -> torch.Tensor:
        """The float32 weight `matmul` of `rows` rows multiplies by: the exact values (torch's kernel,
        and ours up to kernels.qgemv_fused_max_rows(), which scales each group's sums), else the bf16 values of
        dequantize (our kernel's expanded tiles)."""
        return self.dequantize().float() if self.tiled and rows > kernels.qgemv_fused_max_rows() else self._exact()

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] as `matmul` multiplies it, in float32: up to kernels.qgemv_fused_max_rows() rows our kernel
        rounds each group of a row to int8 (scale amax / 127, to nearest even: GGUF's Q8 blocks, as
        llama.cpp multiplies Q4 weights), else x itself."""
        if not self.tiled or x.shape[0] > kernels.qgemv_fused_max_rows():
            return x.float()
        groups = x.float().view(x.shape[0], -1, self.group_size)
        d = groups.abs().amax(dim=-1, keepdim=True) / 127
        inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
        return ((groups * inv).round().clamp(-127, 127) * d).view(x.shape)

    @property
    def _lows(self) -> torch.Tensor | None:
        return self.scales_zeros[1] if len(self.scales_zeros) == 2 else None

    def integers(self) -> torch.Tensor:
        """q [N, K] (0-15)."""
        n, k = self.shape
        if self.tiled:
            return untile_int4(self.packed, n, k)
        return unpack_int4(self.packed, n, k)

    def _exact(self) -> torch.Tensor:
        n, k = self.shape
        q = self.integers().float().view(n, k // self.group_size, self.group_size)
        if self.tiled:  # [1 or 2][N / 64][K / group][64] scale (, low)
            sl = self.scales_zeros.float().transpose(2, 3).reshape(-1, n, k // self.group_size)
            scale = sl[0]
            zero = sl[1] + 8 * scale if len(sl) == 2 else torch.zeros_like(scale)
        else:  # [K / group][N][2]
            scale, zero = self.scales_zeros.float().transpose(0, 1).unbind(-1)  # [N, K / group] each
        return ((q - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)).view(n, k)


def _tiled(n: int, k: int, dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and n % TILE == 0 and k % 2 == 0 and kernels.qgemv_available()


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype, group_size: int = 0) -> Int8Weight:
    """Symmetric int8 with a scale per output, or per group of `group_size` inputs where our kernel runs
    (Q8_0's scheme: a float16 scale, amax / 127, per 32 inputs)."""
    n, k = weight.shape
    tiled = _tiled(n, k, dtype)
    if group_size and tiled and k % group_size == 0:
        return _quantize_int8_groups(weight, dtype, group_size)
    scales = (weight.abs().amax(dim=1).float() / 127).clamp(min=torch.finfo(torch.float32).tiny)
    if not tiled:
        scales = scales.to(dtype).float()
    q = torch.empty(n, k, dtype=torch.int8)
    for r in range(0, n, QUANTIZE_ROWS):  # a band at a time: a whole-matrix float temporary is GBs on a 7B lm_head
        band = weight[r:r + QUANTIZE_ROWS].float() / scales[r:r + QUANTIZE_ROWS].unsqueeze(1)
        q[r:r + QUANTIZE_ROWS] = band.round_().clamp_(-127, 127)
    if tiled:
        return Int8Weight(q.view(n // TILE, TILE, k // 2, 2).transpose(1, 2).contiguous(), scales, (n, k), True)
    return Int8Weight(q.contiguous(), scales.to(dtype), (n, k), False)


def _quantize_int8_groups(weight: torch.Tensor, dtype: torch.dtype, group_size: int) -> Int8Weight:
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, k // group_size)
    for r in range(0, n, QUANTIZE_ROWS):  # a band at a time, as quantize_int8
        groups = weight[r:r + QUANTIZE_ROWS].float().view(-1, k // group_size, group_size)
        scale = (groups.abs().amax(dim=-1) / 127).to(torch.float16).float()
        if not torch.isfinite(scale).all():  # beyond float16's range: a scale per output instead
            return quantize_int8(weight, dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group (or below float16): q = 0
        q[r:r + QUANTIZE_ROWS] = (groups / scale.unsqueeze(-1)).round_().clamp_(-127, 127).view(-1, k)
        scales[r:r + QUANTIZE_ROWS] = scale
    return int8_from_blocks(q, scales, dtype, group_size)


def int8_from_blocks(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                     group_size: int = Q8_GROUP) -> Int8Weight:
    """Q8_0-style blocks (value = q * scale; q int8 [N, K], scale [N, K / group]) as they are, in our
    tiles with float16 scales (a GGUF block's own numbers, so exact), where the kernel runs; elsewhere
    torch's kernel takes only a scale per output, and the values are quantized again per channel."""
    n, k = q.shape
    if not _tiled(n, k, dtype):
        values = (q.float().view(n, -1, group_size) * scale.float().unsqueeze(-1)).view(n, k)
        return quantize_int8(values, dtype)
    tiles = q.to(torch.int8).view(n // TILE, TILE, k // 2, 2).transpose(1, 2).contiguous()
    scales = scale.to(torch.float16).view(n // TILE, TILE, k // group_size).transpose(1, 2).contiguous()
    return Int8Weight(tiles, scales, (n, k), True, group_size)


def quantize_int4(weight: torch.Tensor, dtype: torch.dtype, group_size: int = INT4_GROUP) -> Int4Weight:
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 needs input features divisible by {group_size}, got {k}")
    tiled = _tiled(n, k, dtype)
    groups = weight.float().view(n, k // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = (high - low) / 15
    # quantize against the values the layout stores: float16 in our tiles (its range must hold them),
    # else the activations' dtype (torch's kernel takes them so)
    stored = torch.float16 if tiled else dtype
    if tiled and not (torch.isfinite(scale.to(stored)).all() and torch.isfinite(low.to(stored)).all()):
        stored = dtype  # beyond float16's range: torch's layout
        tiled = False
    scale, low = scale.to(stored).float(), low.to(stored).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0, value = low
    q = ((groups - low.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15).to(torch.int32).view(n, k)
    return int4_from_blocks(pack_pairs(q), scale, low, dtype, group_size, tiled)


def int4_from_blocks(pairs: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype,
                     group_size: int = INT4_GROUP, tiled: bool | None = None) -> Int4Weight:
    """Q4_1-style blocks (value = q * scale + low; q in [0, 15] as pack_pairs' bytes [N, K / 2], scale
    and low [N, K / group]) in our tiles where the kernel runs (scale and low rounded to float16: a
    GGUF block's own numbers are float16, so exact), else in torch's int4 layout."""
    n, k = pairs.shape[0], 2 * pairs.shape[1]
    if tiled is None:
        tiled = _tiled(n, k, dtype)
    if tiled:
        tiles = tile_int4(unpack_pairs(pairs).view(n, k))
        symmetric = torch.equal(low.float(), -8 * scale.float())  # Q4_0: the low is implied
        sl = torch.stack([scale] if symmetric else [scale, low]).to(torch.float16)
        sl = sl.view(len(sl), n // TILE, TILE, k // group_size).transpose(2, 3)
        return Int4Weight(tiles, sl.contiguous(), group_size, (n, k), True)
    q = unpack_pairs(pairs).view(n, k)
    zeros = low.float() + 8 * scale.float()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    scales_zeros = torch.stack([scale.float(), zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return Int4Weight(packed, scales_zeros, group_size, (n, k), False)


@dataclass
class Int4Rows:
    """A table (a token embedding) kept as 4-bit blocks, q * scale + low, whose rows are expanded only
    when looked up: a 7B GGUF's Q4_0 embedding stays 113 MB instead of 403 MB in bf16. `table[ids]`
    gives the rows in `dtype`, the same values as the dequantized table converted to it."""

    packed: torch.Tensor  # [V, K / 2] uint8, element 2j in the low nibble, 2j + 1 in the high one
    scale: torch.Tensor  # [V, K / group] float16
    low: torch.Tensor  # [V, K / group] float16
    dtype: torch.dtype
    group_size: int = INT4_GROUP

    @classmethod
    def from_blocks(cls, pairs: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> Int4Rows:
        """From int4_from_blocks' arguments: pack_pairs' bytes, scale and low."""
        return cls(pairs, scale.to(torch.float16), low.to(torch.float16), dtype)

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        packed = self.packed[ids]
        q = unpack_pairs(packed).view(*packed.shape[:-1], -1, self.group_size)
        values = q.float() * self.scale[ids].float().unsqueeze(-1) + self.low[ids].float().unsqueeze(-1)
        return values.flatten(-2).to(self.dtype)


def pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """Integers 0-15 [..., K] as bytes [..., K / 2], element 2j in the low nibble, 2j + 1 in the high one."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """pack_pairs undone: [..., K / 2] bytes -> [..., K / 2, 2] integers (flatten the last two for K)."""
    return torch.stack([pairs & 0xF, pairs >> 4], dim=-1)


def tile_int4(q: torch.Tensor) -> torch.Tensor:
    """Integers 0-15 [N, K] in csrc/qgemv.c's int4 tiles: [N / 64][K / 8][64][4] bytes, byte i of
    (tile, word, output) holding input 8 word + i low and 8 word + 4 + i high."""
    n, k = q.shape
    q = q.to(torch.uint8).view(n // TILE, TILE, k // 8, 2, 4)
    return (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).transpose(1, 2).contiguous()


def untile_int4(tiles: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """tile_int4 undone: the integers [N, K] (uint8, 0-15)."""
    words = tiles.view(n // TILE, k // 8, TILE, 4).transpose(1, 2)  # [N / 64][64][K / 8][4]
    return torch.stack([words & 0xF, words >> 4], dim=3).reshape(n, k)


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The integers [N, K] (uint8, 0-15) of torch's CPU int4 layout: [N / 64][K][32] bytes, byte
    (b, k, j) holding weight (64 b + j, k) low and (64 b + 32 + j, k) high (csrc/dequant.c)."""
    blocks = packed.view(n // 64, k, 32)
    return torch.cat([blocks & 0xF, blocks >> 4], dim=2).permute(0, 2, 1).reshape(n, k)


def quantize(weight: torch.Tensor, mode: str, dtype: torch.dtype, int8_group: int = 0) -> Int8Weight | Int4Weight:
    """`int8_group`: int8's scales per group of that many inputs where our kernel runs (0: per output);
    int4 always takes groups of INT4_GROUP."""
    if mode == "int8":
        return quantize_int8(weight, dtype, int8_group)
    if mode == "int4":
        return quantize_int4(weight, dtype)
    raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {mode!r}")
