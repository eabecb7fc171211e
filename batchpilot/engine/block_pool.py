"""Paged KV-cache blocks: the single truth about memory, and the prefix cache.

The pool only counts blocks; the tensors live in the executor. `KVCacheManager` maps each
request to its block table and grows it by checking for room before it takes any block, so a
failed allocation never leaves a request half-grown.

Prefix caching (vLLM's scheme): a full block is named by a hash of its tokens and of the block
before it, so equal names mean equal prefixes. A block whose last reference is dropped keeps its
name while it waits in the free queue; until it is handed out again, a request whose prefix has
that name takes it back instead of recomputing it. A free block is free memory whether or not it
is named: only its content is at risk, never a sequence that holds it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Protocol

# A full block's name: the SHA-256 of its prefix (block_hash), or (request id, index) for requests
# known to share no prefix (KVCacheManager.names_by_request).
BlockName = bytes | tuple[str, int]


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Name of a full block: SHA-256 of its parent's name and its tokens. A cryptographic hash,
    so that no client can craft a prompt whose block collides with another client's cached one."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockPool:
    """Fixed set of block ids with reference counts; free blocks are handed out least recently
    freed first, so the named blocks used last stay cached longest."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._block_by_hash: dict[BlockName, int] = {}
        self._hash_by_block: dict[int, BlockName] = {}
        self.num_shared_blocks = 0  # blocks held by two sequences or more
        self.num_saved_blocks = 0  # references beyond the first: blocks that sharing saves
        self.num_cached_free_blocks = 0  # free blocks that still hold a named prefix (reclaimable)

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence, cached ones included (taking one evicts its content)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def allocate(self, n: int) -> list[int] | None:
        """Take n blocks (evicting the cached content of those that had some), or None (and take
        nothing) when fewer are free."""
        if n > len(self._free):
            return None
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            name = self._hash_by_block.pop(block, None)
            if name is not None:
                del self._block_by_hash[name]
                self.num_cached_free_blocks -= 1
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block; a block nobody holds joins the end of the free queue
        (give a sequence's blocks tail first, so its tail is evicted before its prefix)."""
        refs = self.ref_counts
        for block in block_ids:
            refs[block] -= 1
            if refs[block] >= 1:
                self.num_saved_blocks -= 1
                if refs[block] == 1:
                    self.num_shared_blocks -= 1
            else:
                self._free[block] = None
                if block in self._hash_by_block:
                    self.num_cached_free_blocks += 1

    def lookup(self, name: BlockName) -> int | None:
        """The block caching the prefix with this name, if any."""
        return self._block_by_hash.get(name)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference to cached blocks (a prefix hit); free ones leave the free queue."""
        refs = self.ref_counts
        for block in block_ids:
            if refs[block] == 0:
                del self._free[block]
                self.num_cached_free_blocks -= 1
            else:
                self.num_saved_blocks += 1
                if refs[block] == 1:
                    self.num_shared_blocks += 1
            refs[block] += 1

    def forget_cached(self) -> None:
        """Drop every name: no block can be found by its prefix any more (their memory is untouched)."""
        self._block_by_hash.clear()
        self._hash_by_block.clear()
        self.num_cached_free_blocks = 0

    def cache(self, block: int, name: BlockName) -> None:
        """Name a held, full block. A name already cached keeps its block: two sequences that
        computed the same prefix at once keep one copy findable."""
        if name not in self._block_by_hash and block not in self._hash_by_block:
            self._block_by_hash[name] = block
            self._hash_by_block[block] = name


class HasTokens(Protocol):
    request_id: str
    block_hashes: list[BlockName]

    @property
    def num_tokens(self) -> int: ...

    def token_ids(self, start: int, end: int) -> list[int]: ...


class KVCacheManager:
    """Block tables of the requests that hold KV cache, and the prefix cache's counters."""

    def __init__(self, pool: BlockPool, enable_prefix_caching: bool = True, names_by_request: bool = False):
        self.pool = pool
        self.block_size = pool.block_size
        self.enable_prefix_caching = enable_prefix_caching
        # For requests known to share no prefix (the simulator's placeholder prompts): block i of a
        # request is named (request id, i), which finds what hashing would (a preempted request's own
        # blocks) without hashing every block.
        self.names_by_request = names_by_request
        self.block_tables: dict[str, list[int]] = {}
        self._num_named: dict[str, int] = {}  # leading blocks of each table already named in the cache
        self.num_prefix_queries = 0  # prompt tokens looked up at admission (vLLM's prefix_cache_queries)
        self.num_prefix_hits = 0  # of which found cached (prefix_cache_hits)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, req: HasTokens, num_blocks: int) -> list[BlockName]:
        """The names of req's first num_blocks full blocks, computed once per request."""
        hashes, bs = req.block_hashes, self.block_size
        if self.names_by_request:
            hashes.extend((req.request_id, i) for i in range(len(hashes), num_blocks))
            return hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else b"", req.token_ids(i * bs, (i + 1) * bs)))
        return hashes

    def cached_prefix(self, req: HasTokens) -> list[int]:
        """Blocks that hold the longest cached prefix of req's tokens. At least the last token is
        left to compute (its logits give the next token), so a full hit stops a block short."""
        if not self.enable_prefix_caching or req.request_id in self.block_tables:
            return []
        hits: list[int] = []
        hashes = req.block_hashes
        for i in range((req.num_tokens - 1) // self.block_size):
            block = self.pool.lookup(hashes[i] if i < len(hashes) else self._hashes(req, i + 1)[i])
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(self, request_id: str, num_tokens: int, cached: list[int] = ()) -> list[int] | None:
        """Grow the request's table to hold `num_tokens` tokens and return it; None (nothing
        taken) if the pool has no room. `cached`: a new table's first blocks, from
        `cached_prefix` (their tokens count as computed)."""
        table = self.block_tables.get(request_id)
        if table is None:
            pool = self.pool
            missing = self.blocks_for(num_tokens) - len(cached)
            reclaimed = sum(1 for b in cached if pool.ref_counts[b] == 0)
            if missing > pool.num_free_blocks - reclaimed:
                return None
            pool.touch(cached)
            table = self.block_tables[request_id] = [*cached, *pool.allocate(max(0, missing))]
            self._num_named[request_id] = len(cached)
            return table
        if num_tokens <= len(table) * self.block_size:  # the common case: room in the last block
            return table
        new = self.pool.allocate(self.blocks_for(num_tokens) - len(table))
        if new is None:
            return None
        table.extend(new)
        return table

    def record_admission(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.num_prefix_queries += num_prompt_tokens
            self.num_prefix_hits += num_cached_tokens

    def cache_computed(self, req: HasTokens, num_computed_tokens: int) -> None:
        """Name the blocks of req's table that `num_computed_tokens` fills, so later requests
        (and req itself after a preemption) find them. A no-op with prefix caching off."""
        if not self.enable_prefix_caching:
            return
        rid = req.request_id
        named = self._num_named[rid]
        full = num_computed_tokens // self.block_size
        if full <= named:
            return
        table, hashes = self.block_tables[rid], self._hashes(req, full)
        for i in range(named, full):
            self.pool.cache(table[i], hashes[i])
        self._num_named[rid] = full

    def free(self, request_id: str) -> None:
        """Return all of the request's blocks, tail first (no-op when it holds none)."""
        self._num_named.pop(request_id, None)
        self.pool.free(reversed(self.block_tables.pop(request_id, [])))
