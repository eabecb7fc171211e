"""The huge-page arena: tensors that hold what was put in them, never overlap, outlive the arena, and
sit on 2 MB pages where the kernel gives transparent huge pages to those who ask."""

import gc
from pathlib import Path

import pytest
import torch

from batchpilot.model import kernels
from batchpilot.model.hugepages import ALIGN, HUGE_PAGE, HugePageArena
from batchpilot.model.linear import Linear, pack_all

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """'always', 'madvise' or 'never' (the bracketed word), or None where the kernel has no THP."""
    if not THP_MODE.exists():
        return None
    return THP_MODE.read_text().split("[")[1].split("]")[0]


def huge_kib_at(address: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds `address`."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_tensors_hold_their_values_are_aligned_and_do_not_overlap():
    arena = HugePageArena(chunk_bytes=1 << 20)
    sources = [torch.randn(n) for n in (1, 7, 1000, 30_000, 300_000)]  # the last outgrows a chunk
    copies = [arena.copy(s) for s in sources]
    for s, c in zip(sources, copies):
        assert torch.equal(s, c) and c.is_contiguous() and c.data_ptr() % ALIGN == 0
    spans = sorted((c.data_ptr(), c.data_ptr() + c.nbytes) for c in copies)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    copies[2].fill_(5.0)  # writing one leaves its neighbours as they were
    assert torch.equal(copies[1], sources[1]) and torch.equal(copies[3], sources[3])


def test_fresh_tensors_are_zero_and_outlive_the_arena():
    arena = HugePageArena(chunk_bytes=1 << 20)
    fresh = arena.empty((3, 5000), torch.bfloat16)
    assert not fresh.any()
    fresh += 2
    del arena
    gc.collect()
    assert torch.equal(fresh, torch.full((3, 5000), 2.0, dtype=torch.bfloat16))


def test_a_tensor_of_several_huge_pages_is_on_huge_pages_where_the_kernel_gives_them():
    arena = HugePageArena()
    big = arena.empty((3 * HUGE_PAGE,), torch.uint8).fill_(1)  # touched: the pages exist
    mode = thp_mode()
    huge = huge_kib_at(big.data_ptr())
    if mode in ("always", "madvise"):
        assert arena.advised and huge >= HUGE_PAGE // 1024, (mode, huge)
    else:  # no THP, or THP refused everywhere: ordinary pages, the same values
        assert huge == 0
    assert int(big.sum()) == 3 * HUGE_PAGE


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_packed_tiles_move_to_the_arena_and_multiply_the_same(streams):
    weight = torch.randn(320, 192).bfloat16()  # 5 tiles: uneven shares for 2 and 3 streams
    plain, moved = Linear(weight), Linear(weight)
    assert pack_all([plain]) == pack_all([moved], [HugePageArena() for _ in range(streams)])
    x = torch.randn(3, 192).bfloat16()
    assert torch.equal(plain(x), moved(x))
    if kernels.gemv_available():  # the first tensor of a fresh arena starts its mapping's first huge page
        assert [part.shape[0] for part in moved.gemv.parts] == [
            kernels.split_start(5, streams, j + 1) - kernels.split_start(5, streams, j) for j in range(streams)]
        assert all(part.data_ptr() % HUGE_PAGE == 0 for part in moved.gemv.parts)
    else:
        assert moved.gemv is None


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_tiles_move_to_the_arena_and_multiply_the_same(mode):
    weight = torch.randn(256, 192)
    plain, moved = Linear(weight), Linear(weight)
    plain.quantize(mode, torch.bfloat16)
    moved.quantize(mode, torch.bfloat16)
    before = moved.quantized.kernel_operands()
    moved.move_streamed([HugePageArena()])
    x = torch.randn(3, 192).bfloat16()
    assert torch.equal(plain(x), moved(x))
    if before is not None:  # our tiles (where the kernel is built) moved; torch's layout stays put
        assert moved.quantized.kernel_operands()[0].data_ptr() % HUGE_PAGE == 0
