"""Paged decode attention: the native kernel, the torch path and a dense reference agree."""

import pytest
import torch

from batchpilot.model import kernels
from batchpilot.model.attention import AttentionMetadata, _decode_attention


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
@pytest.mark.parametrize("dtype,sharpness,tol", [(torch.float32, 1.0, 1e-5), (torch.float32, 40.0, 1e-4),
                                                 (torch.bfloat16, 1.0, 2e-2), (torch.bfloat16, 40.0, 2e-2)])
def test_native_and_torch_decode_attention_match_dense(dtype, sharpness, tol):
    q, kc, vc, tables, lens, bs = make_case(dtype)
    q = (q.float() * sharpness).to(dtype)
    scale = q.shape[-1] ** -0.5
    ref = dense_reference(q, kc, vc, tables, lens, bs, scale)
    meta = AttentionMetadata(torch.empty(0), bs, len(lens), tables, lens, native_decode=False, prefills=[])
    torch_path = _decode_attention(q, kc, vc, meta, scale)
    torch.testing.assert_close(torch_path.float(), ref, atol=tol, rtol=tol)
    assert kernels.native_available(), "gcc is part of the supported setup"
    native = kernels.paged_decode_attention(q, kc, vc, tables, lens, bs, scale)
    assert native.dtype == dtype
    torch.testing.assert_close(native.float(), ref, atol=tol, rtol=tol)
