/*
 * Many rows of x times one of gemv.c's tiles (64 outputs laid out [K / 2][64][2] bf16) on the AMX
 * tiles. That layout is already the one TDPBF16PS takes for its second operand: 16 input pairs of 16
 * outputs are 16 rows of 64 bytes, 256 bytes apart, so the tiles gemv.c streams need no copy of their
 * own. oneDNN's prepacked matmul reached about half the memory speed on weights that were not in the
 * cache (a decode step's), where these tiles are each thread's one long stream (team.h).
 *
 * Tile registers: 0-1 hold 16 rows of x (32 inputs each), 2-3 the pairs of 16 outputs for 16 input
 * pairs, 4-7 the float32 sums of two blocks of rows times two groups of 16 outputs. Sums are rounded
 * to bf16 once, as F.linear does. A last block of fewer than 16 rows is read from a zero-padded copy.
 * Only where the compiler targets AMX-BF16, and only after the process was given the tile state
 * (amx_granted: Linux hands it out on request).
 */
#ifndef BATCHPILOT_AMX_ROWS_H
#define BATCHPILOT_AMX_ROWS_H

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define BATCHPILOT_AMX 1

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "dtype.h"
#include "tile_rows.h"

#define AMX_ROWS 16 /* rows of x per block */
#define AMX_K 32    /* inputs per block row: 16 bf16 pairs, 64 bytes */

typedef struct __attribute__((packed)) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} AmxConfig;

/* Whether Linux gave this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); asked
 * once per file that includes this, from the calling thread (the request is idempotent). */
static inline int amx_granted(void) {
    static int granted = -1;
    if (granted < 0) granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return granted;
}

/* Every tile 16 rows of 64 bytes. Loaded by each thread at each call: oneDNN's kernels load their own
 * configuration on the same threads. */
static inline void amx_configure(void) {
    AmxConfig cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = AMX_ROWS;
    }
    _tile_loadconfig(&cfg);
}

/* The last `rows` (< 16) rows of x, zero-padded to 16 rows of K, in a buffer of the calling thread's;
 * NULL if it cannot be allocated. */
static inline const uint16_t *amx_pad(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t K) {
    static __thread uint16_t *buffer;
    static __thread int64_t capacity;
    if (capacity < AMX_ROWS * K) {
        free(buffer);
        buffer = aligned_alloc(64, (size_t)(AMX_ROWS * K * 2 + 63) / 64 * 64);
        capacity = buffer != NULL ? AMX_ROWS * K : 0;
        if (buffer == NULL) return NULL;
    }
    for (int64_t m = 0; m < rows; m++) memcpy(buffer + m * K, x + m * x_stride, (size_t)K * 2);
    memset(buffer + rows * K, 0, (size_t)((AMX_ROWS - rows) * K) * 2);
    return buffer;
}

/* Whether M rows of K inputs go on the tiles (at least min_rows of them, 0: never; K a multiple of 32).
 * If they do, this thread's tiles are configured and *pad is amx_pad's copy of the last M % 16 rows (NULL
 * when there are none); if that copy cannot be allocated, they do not. */
static inline int amx_begin(const uint16_t *x, int64_t x_stride, int64_t M, int64_t K, int min_rows,
                            const uint16_t **pad) {
    const int64_t tail = M % AMX_ROWS;
    *pad = NULL;
    if (min_rows <= 0 || M < min_rows || K % AMX_K != 0) return 0;
    if (tail != 0 && (*pad = amx_pad(x + (M - tail) * x_stride, x_stride, tail, K)) == NULL) return 0;
    amx_configure();
    return 1;
}

/* The 16 x 16 sums of tile register C for `rows` live rows, times scale (16 floats, or NULL), plus bias
 * (16 bf16, or NULL), into y (its first output at y): float32, or rounded to bf16. */
#define AMX_STORE(C, rows, scale, bias, y, y_stride, y_f32)                                                 \
    do {                                                                                                   \
        float sums_[AMX_ROWS * 16];                                                                        \
        _tile_stored(C, sums_, 64);                                                                        \
        const __m512 s_ = (scale) != NULL ? _mm512_loadu_ps(scale) : _mm512_set1_ps(1.0f);                 \
        const __m512 b_ = (bias) != NULL ? bf16x16_load(bias) : _mm512_setzero_ps();                       \
        for (int64_t r_ = 0; r_ < (rows); r_++) {                                                          \
            const __m512 v_ = _mm512_fmadd_ps(_mm512_loadu_ps(sums_ + r_ * 16), s_, b_);                   \
            if (y_f32)                                                                                     \
                _mm512_storeu_ps((float *)(y) + r_ * (y_stride), v_);                                      \
            else                                                                                           \
                bf16x16_store((uint16_t *)(y) + r_ * (y_stride), v_);                                      \
        }                                                                                                  \
    } while (0)

/* Chunks (4 KB of a tile's lines each) by which a cold tile's own fetch runs ahead of its loads: 2, 4 and 8 timed
 * alike (docs/reproduction.md). */
#define COLD_AHEAD_CHUNKS 4

/* All M rows of x times the tile, times scale (a float per output, or NULL), plus bias; y points at the
 * tile's first output of row 0. K2 (input pairs) a multiple of 16; pad: amx_begin's copy of the last
 * M % 16 rows (NULL when there are none), pad_stride elements a row (x, pad and tile may point into the
 * middle of their inputs: gemv.c takes half a tile's inputs on each of two threads). The tile's two halves
 * of 32 outputs are taken in turn, so that the half stays in L1 while every block of rows passes. The tile
 * this thread computes next (`next`, or NULL) is fetched into L2 meanwhile, a few lines per chunk of inputs:
 * the tile loads wait on memory otherwise (a decode step's weights are not in the cache). A `cold` tile, one
 * that no earlier tile fetched (a thread's first of a projection), fetches its own lines too, a few chunks
 * ahead of its loads during the first half. */
static inline void amx_tile_times_rows(int64_t M, const uint16_t *x, int64_t x_stride, const uint16_t *pad,
                                       int64_t pad_stride, const uint16_t *tile, int64_t K2, const float *scale,
                                       const uint16_t *bias, void *y, int64_t y_stride, int y_f32,
                                       const uint16_t *next, int cold) {
    const int64_t blocks = (M + AMX_ROWS - 1) / AMX_ROWS, chunks = K2 / 16, full = M / AMX_ROWS;
    const size_t esize = y_f32 ? 4 : 2;
    /* a chunk: 16 input pairs of 64 outputs (4 KB); a tile: `chunks` of them */
    const int64_t chunk_lines = 16 * TILE_N * 2 * 2 / 64, tile_lines = chunks * chunk_lines;
    /* a cold tile's own lines, COLD_AHEAD_CHUNKS ahead of the first half's loads */
    const int64_t own_lines = cold ? tile_lines : 0;
    int64_t own = 0;
    for (; own < own_lines && own < COLD_AHEAD_CHUNKS * chunk_lines; own++)
        __builtin_prefetch((const char *)tile + own * 64, 0, 2);
    /* the next tile's lines, spread evenly over this tile's chunk passes */
    const int64_t lines = next != NULL ? tile_lines : 0, passes = 2 * ((blocks + 1) / 2) * chunks;
    const int64_t per_chunk = (lines + passes - 1) / passes;
    int64_t fetched = 0;
    for (int half = 0; half < 2; half++) {
        const uint16_t *w = tile + half * 32 * 2;
        const uint16_t *b0 = bias != NULL ? bias + half * 32 : NULL, *b1 = bias != NULL ? b0 + 16 : NULL;
        const float *s0 = scale != NULL ? scale + half * 32 : NULL, *s1 = scale != NULL ? s0 + 16 : NULL;
        for (int64_t mb = 0; mb < blocks; mb += 2) {
            const int two = mb + 1 < blocks;
            const uint16_t *a0 = mb < full ? x + mb * AMX_ROWS * x_stride : pad;
            const uint16_t *a1 = mb + 1 < full ? x + (mb + 1) * AMX_ROWS * x_stride : pad;
            const int64_t stride0 = (mb < full ? x_stride : pad_stride) * 2;
            const int64_t stride1 = (mb + 1 < full ? x_stride : pad_stride) * 2;
            _tile_zero(4);
            _tile_zero(5);
            _tile_zero(6);
            _tile_zero(7);
            for (int64_t c = 0; c < chunks; c++) {
                for (int64_t i = 0; i < chunk_lines && own < own_lines; i++, own++)
                    __builtin_prefetch((const char *)tile + own * 64, 0, 2);
                for (int64_t i = 0; i < per_chunk && fetched < lines; i++, fetched++)
                    __builtin_prefetch((const char *)next + fetched * 64, 0, 2);
                const uint16_t *wc = w + c * 16 * 128;
                _tile_loadd(2, wc, 256);
                _tile_loadd(3, wc + 32, 256);
                _tile_loadd(0, a0 + c * AMX_K, stride0);
                _tile_dpbf16ps(4, 0, 2);
                _tile_dpbf16ps(5, 0, 3);
                if (two) {
                    _tile_loadd(1, a1 + c * AMX_K, stride1);
                    _tile_dpbf16ps(6, 1, 2);
                    _tile_dpbf16ps(7, 1, 3);
                }
            }
            const int64_t rows0 = M - mb * AMX_ROWS < AMX_ROWS ? M - mb * AMX_ROWS : AMX_ROWS;
            char *y0 = (char *)y + (mb * AMX_ROWS * y_stride + half * 32) * esize;
            AMX_STORE(4, rows0, s0, b0, y0, y_stride, y_f32);
            AMX_STORE(5, rows0, s1, b1, y0 + 16 * esize, y_stride, y_f32);
            if (two) {
                const int64_t rows1 = M - (mb + 1) * AMX_ROWS < AMX_ROWS ? M - (mb + 1) * AMX_ROWS : AMX_ROWS;
                char *y1 = y0 + AMX_ROWS * y_stride * esize;
                AMX_STORE(6, rows1, s0, b0, y1, y_stride, y_f32);
                AMX_STORE(7, rows1, s1, b1, y1 + 16 * esize, y_stride, y_f32);
            }
        }
    }
}

#endif
#endif
