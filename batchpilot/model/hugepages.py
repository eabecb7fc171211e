"""Tensors on transparent huge pages (2 MB), for the memory every step streams: the weights' kernel
copies and the KV cache.

A batch-1 decode step reads each weight once, 120 projections in a row for the default model. Two
things decide how fast those reads stream (docs/reproduction.md, Zen 4 EPYC): the page size (the
lm_head's GEMV read 1.27x faster from 2 MB pages than from 4 KB ones, where the prefetchers stop at
every page boundary) and the layout (the 120 projections as separate allocations read at 35 GB/s in
minutes when one long read ran at 57; laid one after another in the order a step reads them, 49).
An arena gives both: tensors packed one after another in anonymous private mappings advised
MADV_HUGEPAGE (a batch-1 step 1.08x faster, paired, than with torch's separate 4 KB-page tensors).
torch's own switch, THP_MEM_ALLOC_ENABLE, is process-wide, read once, and puts every large temporary
on 2 MB pages too. Where the kernel has no transparent huge pages (or the OS is not Linux) the advice
is skipped and the tensors are ordinary memory, still packed.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap

import torch

HUGE_PAGE = 2 << 20
CHUNK_BYTES = 64 << 20  # a mapping's size for the many small tensors of a model
ALIGN = 64  # a cache line: where each tensor in a mapping starts


def advise_huge(region: mmap.mmap) -> bool:
    """Ask for huge pages over a mapping; False where the OS or kernel cannot give them."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or not hasattr(region, "madvise"):
        return False
    try:
        region.madvise(advice)
    except OSError:  # EINVAL: a kernel built without transparent huge pages
        return False
    return True


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give the memory glibc holds free back to the OS. A tensor copied into an arena leaves its
    original to malloc's free lists, which stay resident: a 7B int4 load kept ~450 MB of them."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class HugePageArena:
    """Hands out tensors from huge-page mappings, packed one after another (64-byte aligned), never
    reusing memory: fresh mappings are zero-filled, so `empty` returns zeros until written.

    A mapping lives as long as any tensor in it (each tensor's storage holds the mapping), not as
    long as the arena. Tensors larger than `chunk_bytes` get a mapping of their own; the rest share
    `chunk_bytes` mappings, whose untouched tails cost address space, not memory.
    """

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self._chunk: torch.Tensor | None = None  # uint8 view of the open mapping, from a 2 MB boundary
        self._used = 0
        self.advised = True  # False once the OS refused the advice

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        start = -(-self._used // ALIGN) * ALIGN
        if self._chunk is None or start + nbytes > self._chunk.numel():
            if nbytes > self.chunk_bytes:
                return self._map(nbytes)[:nbytes].view(dtype).view(shape)
            self._chunk, start = self._map(self.chunk_bytes), 0
        self._used = start + nbytes
        return self._chunk[start: start + nbytes].view(dtype).view(shape)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of `tensor` in the arena."""
        out = self.empty(tensor.shape, tensor.dtype)
        out.copy_(tensor)
        return out

    def _map(self, nbytes: int) -> torch.Tensor:
        """A fresh mapping of at least `nbytes`, viewed from its first 2 MB boundary (mmap aligns to 4 KB)."""
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.advised = advise_huge(region) and self.advised
        whole = torch.frombuffer(region, dtype=torch.uint8)  # the storage keeps `region` alive
        offset = -whole.data_ptr() % HUGE_PAGE
        return whole[offset: offset + nbytes]
