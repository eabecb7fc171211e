"""Linear layers for the CPU: bf16 weights laid out for the few rows of decode steps.

`F.linear` hands oneDNN a plain [out, in] weight, which it reorders into its blocked layout on
every call; at a few rows that reorder is most of the call. Prepacking once (what vLLM's CPU
backend and inductor's freezing do) made a bf16 matmul 1.3-2x faster at 1-128 rows on this
host (AMX Xeon), and equal or slower at 512 (a prefill chunk), so steps of up to
`PACKED_MAX_ROWS` rows take the packed weight and larger ones the plain weight. Below
`GEMV_MAX_ROWS` rows our own kernel (kernels.gemv, where the CPU has AVX512-BF16) streams the
weight at memory speed without oneDNN's per-call cost. The copies are kept side by side: packing
is only done for models small enough that they cost little (`PACK_LIMIT_BYTES`); measurements
in docs/reproduction.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchpilot.model import kernels

GEMV_MAX_ROWS = 2
PACKED_MAX_ROWS = 128
PACK_LIMIT_BYTES = 2 * 2**30  # weights of every packed layer together


def packing_supported(dtype: torch.dtype) -> bool:
    return (dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def pack_all(layers: list[Linear]) -> bool:
    """Prepack every layer when their dtype allows it and their weights fit PACK_LIMIT_BYTES."""
    if not layers or not packing_supported(layers[0].weight.dtype):
        return False
    if sum(layer.weight.nbytes for layer in layers) > PACK_LIMIT_BYTES:
        return False
    for layer in layers:
        layer.pack()
    return True


class Linear:
    """y = x W^T + b, from the prepacked weight when there is one and x has few rows."""

    __slots__ = ("weight", "bias", "packed", "gemv")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias
        self.packed: torch.Tensor | None = None
        self.gemv: torch.Tensor | None = None

    def pack(self) -> None:
        """Keep a oneDNN-prepacked copy of the weight, and our kernel's where it runs, for few rows."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
        if kernels.gemv_supports(self.weight):
            self.gemv = kernels.pack_gemv_weight(self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            if self.gemv is not None and x.shape[0] <= GEMV_MAX_ROWS:
                return kernels.gemv(x, self.gemv, self.bias)
            if self.packed is not None and x.shape[0] <= PACKED_MAX_ROWS:
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
