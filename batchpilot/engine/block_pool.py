"""Paged KV-cache blocks: the single truth about memory.

The pool only counts blocks; the tensors live in the executor. `KVCacheManager` maps each
request to its block table and grows it in pairs of `can_allocate`-style checks and
allocations, so a failed allocation never leaves a request half-grown.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    """Fixed set of block ids, handed out and returned in FIFO order."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def allocate(self, n: int) -> list[int] | None:
        """Take n blocks, or None (and take nothing) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.popleft() for _ in range(n)]

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)


class KVCacheManager:
    """Block tables of the requests that hold KV cache."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_size = pool.block_size
        self.block_tables: dict[str, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grow the request's table to hold `num_tokens` tokens and return it; None (nothing
        taken) if the pool has no room."""
        table = self.block_tables.get(request_id)
        if table is None:
            table = self.block_tables[request_id] = []
        elif num_tokens <= len(table) * self.block_size:  # the common case: room in the last block
            return table
        missing = self.blocks_for(num_tokens) - len(table)
        if missing <= 0:
            return table
        new = self.pool.allocate(missing)
        if new is None:
            if not table:
                del self.block_tables[request_id]
            return None
        table.extend(new)
        return table

    def free(self, request_id: str) -> None:
        """Return all of the request's blocks (no-op when it holds none)."""
        self.pool.free(self.block_tables.pop(request_id, []))
