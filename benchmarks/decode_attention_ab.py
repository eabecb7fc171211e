"""Builds of the paged decode attention kernel side by side, on W1-at-128-like shapes read from memory.

Each library is a separate build of csrc/paged_attention.c, e.g.

    gcc -O3 -march=native -fopenmp -shared -fPIC -ffp-contract=fast -fassociative-math -fno-signed-zeros \
        -fno-trapping-math paged_attention.c -o new.so -lm

They are alternated over 30 layers' caches (4 GiB in all, so that the reads come from memory as in a
W1 run, not from cache), and the others' outputs are compared with the first's. Block tables are laid
out as the block pool hands blocks out (each prompt's blocks contiguous, then the decode blocks of all
sequences interleaved), or shuffled with --random.

    python benchmarks/decode_attention_ab.py old.so,new.so [--seqs 128] [--rounds 8] [--random]
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch

HEADS, KV_HEADS, HEAD_DIM, BLOCK, LAYERS = 9, 3, 64, 16, 30  # the default model's shapes
CACHE_BLOCKS = 11650  # 4 GiB of KV cache for the default model
GENERATED = 64  # decode tokens behind each sequence's prompt


def load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.paged_decode_attention.restype = i32
    lib.paged_decode_attention.argtypes = [ptr] * 6 + [i32] * 6 + [i64, f32, i32, i32]
    return lib


def pool_order_tables(prompts: list[int]) -> list[list[int]]:
    """Block ids as the block pool hands them out: prompts admitted together, then decode steps."""
    tables, next_block = [], 0
    for n in prompts:
        blocks = -(-n // BLOCK)
        tables.append(list(range(next_block, next_block + blocks)))
        next_block += blocks
    for step in range(1, GENERATED + 1):
        for table, n in zip(tables, prompts):
            while len(table) < -(-(n + step) // BLOCK):
                table.append(next_block)
                next_block += 1
    return tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("libraries", help="comma-separated paths of kernel builds")
    ap.add_argument("--seqs", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--random", action="store_true", help="shuffled block tables")
    args = ap.parse_args()
    torch.set_num_threads(2)
    libs = [load(p) for p in args.libraries.split(",")]
    g = torch.Generator().manual_seed(0)
    shape = (KV_HEADS, CACHE_BLOCKS * BLOCK, HEAD_DIM)
    k_caches = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(LAYERS)]
    v_caches = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(LAYERS)]
    q = torch.randn(args.seqs, HEADS, HEAD_DIM, generator=g).to(torch.bfloat16)
    prompts = torch.randint(100, 301, (args.seqs,), generator=g).tolist()
    lens = torch.tensor(prompts) + GENERATED
    rows = pool_order_tables(prompts)
    width = max(map(len, rows))
    if args.random:
        shuffled = torch.randperm(CACHE_BLOCKS, generator=g)[: args.seqs * width].view(args.seqs, width)
        tables = shuffled.contiguous()
    else:
        tables = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    outs = [torch.empty_like(q) for _ in libs]

    def run(i: int, layer: int) -> None:
        rc = libs[i].paged_decode_attention(
            q.data_ptr(), k_caches[layer].data_ptr(), v_caches[layer].data_ptr(), outs[i].data_ptr(),
            tables.data_ptr(), lens.data_ptr(), args.seqs, HEADS, KV_HEADS, HEAD_DIM, width, BLOCK,
            CACHE_BLOCKS * BLOCK, HEAD_DIM ** -0.5, 1, 2)
        assert rc == 0

    for i in range(len(libs)):
        for layer in range(LAYERS):
            run(i, layer)
    for i in range(1, len(libs)):
        print(f"library {i}: max |difference| from library 0: {(outs[i].float() - outs[0].float()).abs().max().item()}")
    kv_bytes = int(lens.sum()) * KV_HEADS * HEAD_DIM * 2 * 2
    times: list[list[float]] = [[] for _ in libs]
    for r in range(args.rounds):
        for i in (range(len(libs)) if r % 2 == 0 else reversed(range(len(libs)))):
            start = time.perf_counter()
            for layer in range(LAYERS):
                run(i, layer)
            times[i].append((time.perf_counter() - start) / LAYERS)
    for i, ts in enumerate(times):
        ts.sort()
        median = ts[len(ts) // 2]
        print(f"library {i}: median {median * 1e3:.3f} ms a layer (best {ts[0] * 1e3:.3f}), "
              f"{kv_bytes / median / 1e9:.1f} GB/s of K and V")


if __name__ == "__main__":
    main()
