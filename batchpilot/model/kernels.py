"""Native CPU kernels, compiled on first use with the system C compiler and loaded by ctypes.

Plain C with OpenMP, no torch headers: every .c file of csrc/ goes into one library, which
compiles in about a second and is cached under the user cache dir, keyed by the sources, the
flags and the CPU's feature flags (it is built with -march=native). Without a compiler,
`native_available()` is False and callers use their torch implementation instead (attention.py,
llama.py, sampler.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from batchpilot.model.loader import cache_dir

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = sorted(_CSRC.glob("*.c"))
# Reassociation lets gcc vectorise the dot-product reductions; infinities stay IEEE (no -ffast-math).
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=fast", "-fassociative-math",
          "-fno-signed-zeros", "-fno-trapping-math"]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build() -> Path:
    sources = b"".join(path.name.encode() + path.read_bytes() for path in sorted(_CSRC.glob("*.[ch]")))
    key = hashlib.sha256(sources + " ".join(_FLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"batchpilot_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler found")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True)
        os.replace(tmp, target)  # atomic: a concurrent build just replaces it with the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        logger.warning("native kernels unavailable, using the torch paths: %s", detail.strip()[:500])
        return None
    ptr, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    signatures = {  # name: (restype, argtypes), as declared in csrc/
        "paged_decode_attention": (i32, [ptr] * 6 + [i32] * 6 + [i64, f32, i32, i32]),
        "prefill_attention": (i32, [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i32, i32, i32, i64, f32, i32, i32]),
        "prefill_attention_available": (i32, []),
        "prefill_attention_amx": (i32, []),
        "argmax_rows": (None, [ptr, i64, i64, ptr, i32, i32]),
        "sample_rows": (None, [ptr, i64, i64, ptr, ptr, ptr, i32, i32]),
        "add_rms_norm": (None, [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, f32, i32, i32]),
        "rope_in_place": (None, [ptr, i64, ptr, ptr, i64, i32, i32, i32, i32]),
        "silu_mul": (None, [ptr, ptr, i64, i64, i32, i32]),
        "write_kv": (None, [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i32, i32, i64, i32, i32]),
        "gemv_bf16": (i32, [ptr, i64, ptr, i32, ptr, ptr, i64, i32, i64, i64, i64, i32]),
        "gemv_amx_enable": (i32, [i32]),
        "gemv_amx_min_rows": (i32, []),
        "decode_layers": (i32, [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32,
                                i64, i64, i64, i32, i32, i32, i64, f32, f32, ptr, i32, i64, ptr, i32, ptr, ptr, i32]),
        "dequant_int4": (None, [ptr, ptr, ptr, i64, i64, i64, i32, i32]),
        "qgemv_bf16": (i32, [ptr, i64, ptr, ptr, ptr, i32, i64, ptr, ptr, i64, i64, i64, i64, i32]),
        "qdequant_bf16": (i32, [ptr, ptr, ptr, i32, i64, ptr, i64, i64, i32]),
        "qgemv_row_group": (i64, [i32, i64, i64]),
        "qgemv_fused_max_rows": (i32, []),
    }
    for name, (restype, argtypes) in signatures.items():
        built_per_cpu = ("gemv_bf16", "gemv_amx_enable", "gemv_amx_min_rows", "decode_layers", "qgemv_bf16",
                         "qdequant_bf16", "qgemv_row_group", "qgemv_fused_max_rows")
        if name in built_per_cpu and not hasattr(lib, name):
            continue
        getattr(lib, name).restype = restype
        getattr(lib, name).argtypes = argtypes
    if hasattr(lib, "gemv_amx_enable"):
        lib.gemv_amx_enable(GEMV_AMX_MIN_ROWS)
    return lib


def native_available() -> bool:
    return _library() is not None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                           scale: float) -> torch.Tensor:
    """Decode attention read straight from the blocks. q: [B, H, D]; caches [KVH, S, D];
    block_tables [B, W] int64; context_lens [B] int64. Returns [B, H, D]."""
    lib = _library()
    assert lib is not None, "call native_available() first"
    q = q.contiguous()
    out = torch.empty_like(q)
    b, h, d = q.shape
    rc = lib.paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        block_tables.data_ptr(), context_lens.data_ptr(), b, h, k_cache.shape[0], d,
        block_tables.shape[1], block_size, k_cache.shape[1], scale, int(q.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"paged attention kernel: unsupported shape (heads {h}, head_dim {d}, block {block_size})")
    return out


@functools.cache
def prefill_attention_available() -> bool:
    """Our prefill kernel is used only where it was built for AVX-512 (csrc/prefill_attention.c)."""
    lib = _library()
    return lib is not None and bool(lib.prefill_attention_available())


@functools.cache
def prefill_attention_amx() -> bool:
    """Whether bf16 prompts take our kernel's AMX path (built for the tiles, and Linux gives them)."""
    lib = _library()
    return lib is not None and bool(lib.prefill_attention_amx())


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                      context_start: int, scale: float) -> torch.Tensor | None:
    """Causal attention of one prompt chunk. q: [n, H, D] (rows may be strided, heads contiguous);
    caches [KVH, S, D] already holding the chunk's keys; slots: int64 [context_start + n], the slot of
    every position. Returns [n, H, D], or None for a shape the kernel does not take (head_dim not a
    multiple of 64): the caller uses torch's kernel then."""
    n, h, d = q.shape
    if q.stride()[1:] != (d, 1):
        q = q.contiguous()
    out = torch.empty(n, h, d, dtype=q.dtype)
    rc = _library().prefill_attention(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), out.stride(0),
        slots.data_ptr(), n, context_start, h, k_cache.shape[0], d, k_cache.shape[1], scale,
        int(q.dtype == torch.bfloat16), torch.get_num_threads())
    if rc == -2:
        raise MemoryError("prefill attention: cannot allocate the key/value panels")
    return None if rc != 0 else out


LOGIT_DTYPES = (torch.float32, torch.bfloat16)  # what the kernels over rows of logits read


def _logit_rows(name: str, logits: torch.Tensor) -> tuple[ctypes.CDLL, torch.Tensor]:
    """The library and the logits [R, V] as a row kernel reads them (contiguous), or an error naming it."""
    lib = _library()
    assert lib is not None, "call native_available() first"
    if logits.dtype not in LOGIT_DTYPES or logits.dim() != 2:
        raise ValueError(f"{name} takes float32 or bf16 [R, V], got {logits.dtype} {tuple(logits.shape)}")
    return lib, logits.contiguous()


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's maximum (or first NaN), as torch.argmax(dim=-1) gives it.
    logits: float32 or bf16 [R, V]. Returns int64 [R]."""
    lib, logits = _logit_rows("argmax_rows", logits)
    out = torch.empty(logits.shape[0], dtype=torch.long)
    lib.argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr(),
                    int(logits.dtype == torch.bfloat16), torch.get_num_threads())
    return out


def sample_rows(logits: torch.Tensor, temperatures: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the token at which the CDF of softmax(logits / temperature) first exceeds the
    row's uniform number in [0, 1) (csrc/sample.c). logits: float32 or bf16 [R, V];
    temperatures and uniforms: [R]. Returns int64 [R]."""
    lib, logits = _logit_rows("sample_rows", logits)
    inv_temps = (1.0 / temperatures.to(torch.float32)).contiguous()
    uniforms = uniforms.to(torch.float32).contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.long)
    lib.sample_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], inv_temps.data_ptr(), uniforms.data_ptr(),
                    out.data_ptr(), int(logits.dtype == torch.bfloat16), torch.get_num_threads())
    return out


# The layer ops below take bf16 or float32 tensors whose last dimension is contiguous; they are
# the fused forms of llama.py's element-wise code (see csrc/layer_ops.c).
_LAYER_DTYPES = (torch.bfloat16, torch.float32)


def layer_ops_supports(dtype: torch.dtype) -> bool:
    return dtype in _LAYER_DTYPES and native_available()


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor,
                 eps: float) -> None:
    """x += delta (in place, when given), then out = weight * rms_norm(x). All [T, C] but weight [C]."""
    rows, cols = x.shape
    _library().add_rms_norm(x.data_ptr(), x.stride(0), None if delta is None else delta.data_ptr(),
                            0 if delta is None else delta.stride(0), weight.data_ptr(), out.data_ptr(),
                            out.stride(0), rows, cols, eps, int(x.dtype == torch.bfloat16), torch.get_num_threads())


def rope_in_place(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, head_dim: int) -> None:
    """Rotate the first `heads` heads of each row of qkv [T, W] by cos/sin float32 [T, D/2]."""
    _library().rope_in_place(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), qkv.shape[0], heads,
                             head_dim, int(qkv.dtype == torch.bfloat16), torch.get_num_threads())


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [T, 2C] (contiguous), as [T, C]."""
    rows, width = gate_up.shape
    out = gate_up.new_empty(rows, width // 2)
    _library().silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width // 2, int(gate_up.dtype == torch.bfloat16),
                        torch.get_num_threads())
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v [T, KVH, D] (rows may be strided, heads contiguous) into caches [KVH, S, D] at slots [T]."""
    rows, kv_heads, head_dim = k.shape
    if k.stride()[1:] != (head_dim, 1) or v.stride()[1:] != (head_dim, 1) or k.dtype not in _LAYER_DTYPES:
        raise ValueError(f"write_kv takes bf16/float32 rows of contiguous heads, got strides {k.stride()}, "
                         f"{v.stride()} ({k.dtype})")
    _library().write_kv(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
                        slots.data_ptr(), rows, kv_heads, head_dim, k_cache.shape[1],
                        int(k.dtype == torch.bfloat16), torch.get_num_threads())


GEMV_TILE = 64  # outputs per weight tile: TILE_N in csrc/tile_rows.h (and gemv.c's AVX2 path)
# With AMX the tiles outran our vector loop at every row count, one row included (a decode step of the
# default model 1.18x faster at 1 row, 1.55x at 8: docs/reproduction.md).
GEMV_AMX_MIN_ROWS = 1


@functools.cache
def gemv_available() -> bool:
    """Our few-row bf16 matmul is built only where the compiler targets AVX512-BF16 or AVX2 + FMA."""
    lib = _library()
    return lib is not None and hasattr(lib, "gemv_bf16")


def gemv_supports(weight: torch.Tensor) -> bool:
    n, k = weight.shape
    return weight.dtype == torch.bfloat16 and n % GEMV_TILE == 0 and k % 2 == 0 and gemv_available()


def split_start(n: int, parts: int, j: int) -> int:
    """The first of items [0, n) that part j of `parts` takes: csrc/team.h's split, by which a team's
    threads divide a projection's tiles."""
    q, r = divmod(n, parts)
    return j * q + min(j, r)


class GemvTiles:
    """kernels.gemv's tiles of one [N, K] weight, [N / 64][K / 2][64][2], in one or more parts: part j
    holds the tiles thread j of a team of len(parts) computes (split_start), so that each thread's
    tiles of a whole step can lie one after another in a stream of their own (place)."""

    __slots__ = ("parts", "n", "k", "pointers")

    def __init__(self, parts: list[torch.Tensor], n: int, k: int):
        self.parts, self.n, self.k = parts, n, k
        self.pointers = pointers(parts)  # the C array csrc/gemv.c takes

    @property
    def address(self) -> int:
        return ctypes.addressof(self.pointers)

    def place(self, arenas: list) -> GemvTiles:
        """A copy split into len(arenas) parts, part j in arenas[j] (hugepages.HugePageArena)."""
        whole = torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]
        tiles = whole.shape[0]
        cuts = [split_start(tiles, len(arenas), j) for j in range(len(arenas) + 1)]
        return GemvTiles([arena.copy(whole[a:b]) for arena, a, b in zip(arenas, cuts, cuts[1:])], self.n, self.k)


def pack_gemv_weight(weight: torch.Tensor) -> GemvTiles:
    """[N, K] -> tiles of 64 outputs [N / 64][K / 2][64][2], the layout csrc/gemv.c streams, in one part."""
    n, k = weight.shape
    return GemvTiles([weight.view(n // GEMV_TILE, GEMV_TILE, k // 2, 2).transpose(1, 2).contiguous()], n, k)


def gemv(x: torch.Tensor, tiles: GemvTiles, bias: torch.Tensor | None, float_out: bool = False) -> torch.Tensor:
    """x [M, K] bf16 (rows may be strided) times a pack_gemv_weight weight, plus bias: [M, N] bf16, or
    float32 (the sums unrounded) with float_out."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = x.new_empty(x.shape[0], tiles.n, dtype=torch.float32 if float_out else x.dtype)
    rc = _library().gemv_bf16(x.data_ptr(), x.stride(0), tiles.address, len(tiles.parts),
                              None if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0), int(float_out),
                              x.shape[0], tiles.k, tiles.n, torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"gemv: unsupported shape {tuple(x.shape)} x [{tiles.n}, {tiles.k}]")
    return y


def gemv_use_amx(min_rows: int) -> bool:
    """Let gemv (and the decode loop's projections) multiply steps of at least `min_rows` rows on the AMX
    tiles (0: never; GEMV_AMX_MIN_ROWS from the library's load on). False where the library is built
    without AMX or Linux refuses the process the tile state."""
    lib = _library()
    return lib is not None and hasattr(lib, "gemv_amx_enable") and bool(lib.gemv_amx_enable(min_rows))


def gemv_amx_min_rows() -> int:
    """The fewest rows a gemv takes the AMX tiles at; 0 where it never does."""
    lib = _library()
    return lib.gemv_amx_min_rows() if lib is not None and hasattr(lib, "gemv_amx_min_rows") else 0


def decode_layers_available() -> bool:
    """Whether the whole-step decode loop (csrc/decode_layers.c) is built: where gemv_bf16 is."""
    return gemv_available() and hasattr(_library(), "decode_layers")


def pointers(tensors: list[torch.Tensor | int | None]) -> ctypes.Array:
    """The tensors' data pointers (None as NULL, an int as the address it is) as a C array, for kernels
    that take one per layer."""
    return (ctypes.c_void_p * len(tensors))(*(t if t is None or isinstance(t, int) else t.data_ptr()
                                              for t in tensors))


def cache_pointers(kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> ctypes.Array:
    """Every layer's K then V cache, the order decode_layers takes them in."""
    return pointers([cache for layer in kv_caches for cache in layer])


def decode_layers(x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor, embed: torch.Tensor | None,
                  token_ids: torch.Tensor, weights: ctypes.Array, formats: ctypes.Array, caches: ctypes.Array,
                  num_layers: int, rope_cos: torch.Tensor, rope_sin: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, block_size: int, num_slots: int,
                  heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float, scale: float,
                  first_norm: torch.Tensor, head: GemvTiles | None = None, logits: torch.Tensor | None = None,
                  argmax: torch.Tensor | None = None) -> None:
    """Every layer of a decode-only bf16 step (csrc/decode_layers.c): x [B, C] the residual stream, set to the
    rows of embed ([vocab, C] bf16) that token_ids ([B] int64) pick, unless embed is None (then the caller has
    set them), and updated in place; y [B, C] set to x normed by first_norm (the first layer's input norm), and
    on return the lm_head's input. rope_cos, rope_sin: the model's tables [positions, D/2] float32, indexed by
    positions ([B] int64) in the call. scratch: bf16, decode_scratch_elements(...) of them. With head (the
    lm_head's tiles) and logits ([B, vocab], float32 or bf16), the lm_head's GEMV runs too, in the same native
    call; and with argmax ([B] int64) each row's argmax of the logits, as argmax_rows gives it (greedy sampling,
    from the logits while they are in the threads' caches).
    weights: 15 pointers a layer (the qkv, o, gate_up and down projections' weight, scales and lows,
    then the qkv bias, the ffn norm, the next norm; a bf16 weight is the address of its GemvTiles'
    pointers); formats: 12 int64 a layer (each projection's bits, group and parts); caches: a layer's
    K then V cache."""
    b, c = x.shape
    if (head is None) != (logits is None):
        raise ValueError("decode_layers: head and logits go together")
    if argmax is not None and (logits is None or argmax.dtype != torch.long or argmax.shape != (b,)):
        raise ValueError("decode_layers: argmax needs the logits and one int64 per row")
    if scratch.numel() < decode_scratch_elements(b, c, heads, kv_heads, head_dim, intermediate):
        raise ValueError("decode_layers: scratch too small")
    rc = _library().decode_layers(x.data_ptr(), y.data_ptr(), None if embed is None else embed.data_ptr(),
                                  token_ids.data_ptr(), first_norm.data_ptr(), weights, formats, caches, num_layers,
                                  rope_cos.data_ptr(), rope_sin.data_ptr(), positions.data_ptr(), slots.data_ptr(),
                                  tables.data_ptr(), lens.data_ptr(), tables.shape[1], block_size, num_slots, b, c,
                                  heads, kv_heads, head_dim, intermediate, eps, scale,
                                  None if head is None else head.address, 0 if head is None else len(head.parts),
                                  0 if head is None else head.n, None if logits is None else logits.data_ptr(),
                                  int(logits is not None and logits.dtype == torch.float32),
                                  None if argmax is None else argmax.data_ptr(), scratch.data_ptr(),
                                  torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"decode_layers: kernel error {rc} (heads {heads}, head_dim {head_dim}, block {block_size})")


def decode_scratch_elements(rows: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                            intermediate: int) -> int:
    """The bf16 elements of scratch decode_layers needs for `rows` rows (csrc/decode_layers.c's buffers)."""
    return rows * ((heads + 2 * kv_heads) * head_dim + 2 * heads * head_dim + hidden + 3 * intermediate)


def dequant_int4(packed: torch.Tensor, scales_zeros: torch.Tensor, shape: tuple[int, int], group: int) -> torch.Tensor:
    """torch's CPU int4 layout back to a [N, K] weight in the scales' dtype (csrc/dequant.c)."""
    n, k = shape
    out = torch.empty(n, k, dtype=scales_zeros.dtype)
    _library().dequant_int4(packed.data_ptr(), scales_zeros.data_ptr(), out.data_ptr(), n, k, group,
                            int(scales_zeros.dtype == torch.bfloat16), torch.get_num_threads())
    return out


@functools.cache
def qgemv_available() -> bool:
    """Our int8/int4 matmul (csrc/qgemv.c) is built only where the CPU has AVX512-BF16."""
    lib = _library()
    return lib is not None and hasattr(lib, "qgemv_bf16")


def qgemv_row_group(bits: int, group: int, k: int) -> int:
    """The inputs per int16 scale our int8 kernel gives each row at few rows (csrc/qgemv.c); 0 where it
    multiplies the rows as they are."""
    lib = _library()
    return int(lib.qgemv_row_group(bits, group, k)) if lib is not None and hasattr(lib, "qgemv_row_group") else 0


@functools.cache
def qgemv_fused_max_rows() -> int:
    """The most rows our int8/int4 kernel multiplies in integers, the inputs rounded to int8 (int4 weights) or
    int16 (int8) first (csrc/qgemv.c, FUSED_MAX_M); 0 where it is not built."""
    lib = _library()
    return int(lib.qgemv_fused_max_rows()) if lib is not None and hasattr(lib, "qgemv_fused_max_rows") else 0


def qgemv(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor | None, bits: int, group: int,
          n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] bf16 (rows may be strided) times a weight in qgemv.c's tiles: [M, N] bf16. int8: float32
    scales per output, no lows; int4: float16 scales and lows per group."""
    if x.stride(-1) != 1 or x.stride(0) % 2:
        x = x.contiguous()
    k = x.shape[1]
    y = x.new_empty(x.shape[0], n)
    rc = _library().qgemv_bf16(x.data_ptr(), x.stride(0), q.data_ptr(), scales.data_ptr(),
                               None if lows is None else lows.data_ptr(), bits, group,
                               None if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0), x.shape[0], k, n,
                               torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"qgemv: unsupported shape {tuple(x.shape)} x [{n}, {k}] ({bits}-bit)" if rc == -1
                         else "qgemv: cannot allocate its tile buffer")
    return y


def qdequant(q: torch.Tensor, scales: torch.Tensor, lows: torch.Tensor | None, bits: int, group: int,
             shape: tuple[int, int]) -> torch.Tensor:
    """A weight in qgemv.c's tiles back to [N, K] bf16."""
    n, k = shape
    out = torch.empty(n, k, dtype=torch.bfloat16)
    rc = _library().qdequant_bf16(q.data_ptr(), scales.data_ptr(), None if lows is None else lows.data_ptr(), bits,
                                  group, out.data_ptr(), k, n, torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"qdequant: unsupported shape [{n}, {k}] ({bits}-bit)")
    return out
