"""Paged attention for one mixed batch of decode tokens and prefill chunks, on the CPU.

The KV cache of a layer is one tensor per K and V of shape [num_kv_heads, num_slots, head_dim],
num_slots = num_blocks * block_size; a token's slot is block_id * block_size + offset. Heads
lead so that gathering whole blocks of every sequence yields [KVH, B, L, D] in one contiguous
copy, which batched matmuls consume without a further transpose copy.

The batch's tokens are laid out decodes first (one token each), then prefill chunks. Decodes
are attended together; each prefill chunk is attended causally (with an offset when earlier
chunks of the same prompt are already in the cache) by our kernel where it is built: 2-3x
torch's flash attention on AVX512-BF16 without AMX; with AMX, for bf16, its path on the tiles,
1.5-2x torch's kernel (which leads our vector path there 1.2-2x). Elsewhere by
scaled_dot_product_attention (docs/reproduction.md).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from batchpilot.model import kernels


@cache
def native_prefill(dtype: torch.dtype) -> bool:
    """Whether prefill chunks of this dtype take our kernel: where it is built, and on an AMX CPU only
    for bf16 on its AMX path (torch's kernel leads our vector path there)."""
    if not kernels.prefill_attention_available():
        return False
    if torch.cpu._is_amx_tile_supported():
        return dtype == torch.bfloat16 and kernels.prefill_attention_amx()
    return True


@dataclass
class PrefillChunk:
    """One sequence's prompt chunk: rows [start, end) of the batch, positions from `context_start`."""

    start: int
    end: int
    context_start: int
    # Slots of positions [0, context_start + n) when earlier tokens are cached, else None.
    context_slots: torch.Tensor | None
    # [n, context_len] True where the query may attend (only with context_slots).
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Built once per step by the runner, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] slot where each new token's K/V is written
    block_size: int
    num_decodes: int  # rows [0, num_decodes) are single decode tokens
    decode_tables: torch.Tensor | None  # [B, W] block tables of the decodes, padded to W blocks
    decode_lens: torch.Tensor | None  # [B] context length of each decode, its new token included
    native: bool  # use the C kernels (kernels.py) for cache writes, decodes and prefills, not torch's
    prefills: list[PrefillChunk]
    # every layer's K then V cache (kernels.cache_pointers), built once by the runner that owns the
    # caches (building it took ~80 us of a ~12 ms batch-1 step); None: the model builds it per step
    cache_pointers: ctypes.Array | None = None


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [KVH, S, D]
    v_cache: torch.Tensor,  # [KVH, S, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend every query row. Returns [T, H, D]."""
    if meta.native:
        kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    else:
        k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    out = torch.empty_like(q)
    if meta.num_decodes:
        q_dec = q[: meta.num_decodes]
        if meta.native:
            out[: meta.num_decodes] = kernels.paged_decode_attention(
                q_dec, k_cache, v_cache, meta.decode_tables, meta.decode_lens, meta.block_size, scale)
        else:
            out[: meta.num_decodes] = _decode_attention(q_dec, k_cache, v_cache, meta, scale)
    for chunk in meta.prefills:
        o = None
        if meta.native and native_prefill(q.dtype):
            slots = meta.slot_mapping[chunk.start : chunk.end] if chunk.context_slots is None else chunk.context_slots
            o = kernels.prefill_attention(q[chunk.start : chunk.end], k_cache, v_cache, slots, chunk.context_start,
                                          scale)
        if o is None:
            o = _prefill_attention(q, k, v, k_cache, v_cache, chunk, scale)
        out[chunk.start : chunk.end] = o
    return out


def _decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The torch path: gather every decode's blocks into [KVH, B, L, D], then two matmuls."""
    b, h, d = q.shape
    kvh = k_cache.shape[0]
    length = meta.decode_tables.shape[1] * meta.block_size
    mask = (torch.arange(length) < meta.decode_lens.unsqueeze(1)).view(1, b, 1, length)
    flat_tables = meta.decode_tables.flatten()
    # Grouped-query attention without repeating K/V: the G query heads of a KV head share it.
    qg = q.view(b, kvh, h // kvh, d).transpose(0, 1)  # [KVH, B, G, D]
    blocks = k_cache.view(kvh, -1, meta.block_size, d)  # [KVH, NB, bs, D]
    keys = blocks.index_select(1, flat_tables).view(kvh, b, length, d)
    # Scores in float32: rounded to bf16 they shift a sharp softmax's weights by tens of percent.
    scores = torch.matmul(qg.float(), keys.transpose(-1, -2).float()) * scale  # [KVH, B, G, L]
    scores.masked_fill_(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    values = v_cache.view(blocks.shape).index_select(1, flat_tables).view(kvh, b, length, d)
    return torch.matmul(probs, values).transpose(0, 1).reshape(b, h, d)


def _prefill_attention(q, k, v, k_cache, v_cache, chunk: PrefillChunk, scale: float) -> torch.Tensor:
    # NOTE: 4-D inputs ([1, heads, n, D]) take torch's CPU flash-attention kernel; 3-D ones
    # fall back to the unfused math path, 2-3x slower.
    qs = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
    if chunk.context_slots is None:
        ks = k[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, KVH, n, D]
        vs = v[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
    else:
        ks = k_cache.index_select(1, chunk.context_slots).unsqueeze(0)  # [1, KVH, L, D]
        vs = v_cache.index_select(1, chunk.context_slots).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=chunk.mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)
