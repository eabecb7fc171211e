"""Paged decode attention: the native kernel, the torch path and a dense reference agree."""

import pytest
import torch

from batchpilot.model import kernels
from batchpilot.model.attention import (
    AttentionMetadata,
    PrefillChunk,
    _decode_attention,
    native_prefill,
    paged_attention,
)


def make_case(dtype, lens=(1, 5, 16, 17, 40), heads=6, kv_heads=2, head_dim=32, block_size=8, num_blocks=40):
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(kv_heads, num_blocks * block_size, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks * block_size, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = -(-max(lens) // block_size)
    tables = []
    for n in lens:  # each sequence owns distinct, shuffled blocks, padded with its first block
        own = [perm.pop() for _ in range(-(-n // block_size))]
        tables.append(own + [own[0]] * (width - len(own)))
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, torch.tensor(tables), torch.tensor(lens), block_size


def dense_reference(q, k_cache, v_cache, tables, lens, block_size, scale):
    out = []
    kvh = k_cache.shape[0]
    for b, n in enumerate(lens.tolist()):
        slots = torch.cat([torch.arange(blk * block_size, (blk + 1) * block_size) for blk in tables[b]])[:n]
        k = k_cache[:, slots].float().repeat_interleave(q.shape[1] // kvh, dim=0)  # [H, n, D]
        v = v_cache[:, slots].float().repeat_interleave(q.shape[1] // kvh, dim=0)
        p = torch.softmax((q[b].float().unsqueeze(1) @ k.transpose(1, 2)).squeeze(1) * scale, dim=-1)
        out.append((p.unsqueeze(1) @ v).squeeze(1))
    return torch.stack(out)


# sharpness 40: score gaps past exp's range, near one-hot. Its float32 logits reach ~40, whose
# rounding (1e-5 relative, in a different summation order than the dense reference's) enters exp.
# Shapes: the generic kernel's (head_dim 32, blocks of 8; head_dim 8, blocks of 2) and the bf16 vector
# kernel's (head_dim 64 and 128, blocks of 16 and 32, contexts ending mid-tile and on an odd key).
@pytest.mark.parametrize("shape", [
    dict(), dict(head_dim=64, block_size=16, heads=9, kv_heads=3, lens=(1, 15, 16, 33, 70)),
    dict(head_dim=128, block_size=32, heads=8, kv_heads=2, lens=(2, 31, 47, 64, 65)),
    # several chunks of 8 tiles (the softmax's update interval), the last one partial or mid-tile
    dict(head_dim=64, block_size=16, heads=9, kv_heads=3, lens=(128, 129, 263, 300), num_blocks=64),
    dict(head_dim=128, block_size=32, heads=8, kv_heads=2, lens=(256, 287, 400), num_blocks=40),
    dict(head_dim=8, block_size=2, heads=4, kv_heads=2, lens=(1, 3, 9))])  # bf16 blocks under one cache line
@pytest.mark.parametrize("dtype,sharpness,tol", [(torch.float32, 1.0, 1e-5), (torch.float32, 40.0, 1e-4),
                                                 (torch.bfloat16, 1.0, 2e-2), (torch.bfloat16, 40.0, 2e-2)])
def test_native_and_torch_decode_attention_match_dense(shape, dtype, sharpness, tol):
    q, kc, vc, tables, lens, bs = make_case(dtype, **shape)
    q = (q.float() * sharpness).to(dtype)
    scale = q.shape[-1] ** -0.5
    ref = dense_reference(q, kc, vc, tables, lens, bs, scale)
    meta = AttentionMetadata(torch.empty(0), bs, len(lens), tables, lens, native=False, prefills=[])
    torch_path = _decode_attention(q, kc, vc, meta, scale)
    torch.testing.assert_close(torch_path.float(), ref, atol=tol, rtol=tol)
    assert kernels.native_available(), "gcc is part of the supported setup"
    native = kernels.paged_decode_attention(q, kc, vc, tables, lens, bs, scale)
    assert native.dtype == dtype
    torch.testing.assert_close(native.float(), ref, atol=tol, rtol=tol)


def prefill_reference(q, k_cache, v_cache, slots, context_start, scale):
    """Dense float64 causal attention of a chunk whose query i sits at position context_start + i."""
    n, h, _ = q.shape
    kvh = k_cache.shape[0]
    k = k_cache[:, slots].double().repeat_interleave(h // kvh, dim=0)  # [H, L, D]
    v = v_cache[:, slots].double().repeat_interleave(h // kvh, dim=0)
    scores = (q.double().transpose(0, 1) @ k.transpose(1, 2)) * scale  # [H, n, L]
    visible = torch.arange(len(slots)).unsqueeze(0) <= torch.arange(context_start, context_start + n).unsqueeze(1)
    scores.masked_fill_(~visible, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1)  # [n, H, D]


# Chunk lengths and offsets across the kernel's 32-key blocks, 16-position tasks and 6-row groups;
# grouped (9 over 3, 8 over 2) and plain multi-head attention; head_dim 64 and 128.
@pytest.mark.parametrize("n,context_start,heads,kv_heads,head_dim", [
    (1, 0, 9, 3, 64), (17, 0, 9, 3, 64), (100, 0, 9, 3, 64), (33, 31, 9, 3, 64), (64, 200, 8, 2, 128),
    (50, 7, 4, 4, 64)])
@pytest.mark.parametrize("dtype,sharpness,tol", [(torch.float32, 1.0, 1e-5), (torch.float32, 40.0, 1e-4),
                                                 (torch.bfloat16, 1.0, 2e-2), (torch.bfloat16, 40.0, 2e-2)])
def test_prefill_attention_matches_dense(n, context_start, heads, kv_heads, head_dim, dtype, sharpness, tol):
    """paged_attention's prefill path (our kernel where it is built, torch's elsewhere) on a chunk
    whose keys sit in shuffled cache slots, queries strided as they come out of the fused qkv."""
    g = torch.Generator().manual_seed(n + context_start)
    num_slots = 512
    k_cache = torch.randn(kv_heads, num_slots, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(kv_heads, num_slots, head_dim, generator=g).to(dtype)
    slots = torch.randperm(num_slots, generator=g)[: context_start + n]
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g)
    qkv[:, : heads * head_dim] *= sharpness  # sharp queries; keys stay unit-scale as in the decode test
    qkv = qkv.to(dtype)
    q = qkv[:, : heads * head_dim].view(n, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(n, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(n, kv_heads, head_dim)
    scale = head_dim ** -0.5
    if context_start:
        positions = torch.arange(context_start, context_start + n).unsqueeze(1)
        mask = torch.arange(context_start + n).unsqueeze(0) <= positions
        chunk = PrefillChunk(0, n, context_start, slots, mask)
    else:
        chunk = PrefillChunk(0, n, 0, None, None)
    for native in (False, True):
        kc, vc = k_cache.clone(), v_cache.clone()
        meta = AttentionMetadata(slots[context_start:], 16, 0, None, None, native=native, prefills=[chunk])
        out = paged_attention(q, k, v, kc, vc, meta, scale)
        ref = prefill_reference(q, kc, vc, slots, context_start, scale)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol,
                                   msg=lambda m, native=native: f"native={native}: {m}")
    if kernels.prefill_attention_available():
        direct = kernels.prefill_attention(q, kc, vc, slots, context_start, scale)
        torch.testing.assert_close(direct.double(), ref, atol=tol, rtol=tol)


def test_bf16_prompts_take_our_kernel_wherever_it_leads_torchs():
    """Without AMX our vector kernel leads torch's; with AMX only its tile path does (float32 prompts keep
    torch's kernel there). The prefill test above checks whichever path this host takes against dense."""
    if not kernels.prefill_attention_available():
        assert not native_prefill(torch.bfloat16)
    elif torch.cpu._is_amx_tile_supported():
        assert native_prefill(torch.bfloat16) == kernels.prefill_attention_amx()
        assert not native_prefill(torch.float32)
    else:
        assert native_prefill(torch.bfloat16) and native_prefill(torch.float32)
