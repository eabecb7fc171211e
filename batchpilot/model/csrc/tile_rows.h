/*
 * A few rows of x times one tile of 64 outputs laid out [K / 2][64][2] bf16 (the pairs of inputs of 64
 * outputs): gemv.c's packed weights and qgemv.c's expanded tiles. Each vdpbf16ps multiplies a broadcast
 * pair (x[k], x[k+1]) of a row with the pairs of 16 outputs: no horizontal sums. Products accumulate
 * in float32 and are rounded once, as F.linear does. Only with AVX512-BF16.
 */
#ifndef BATCHPILOT_TILE_ROWS_H
#define BATCHPILOT_TILE_ROWS_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define TILE_N 64   /* outputs per tile: four 16-lane float accumulators per row */
#define TILE_ROWS 6 /* rows per pass over a tile: 24 accumulators, 4 weight vectors, 1 broadcast */

/* acc[m] += x[m, 2 k2 : 2 k2 + 2] w (w: the k-pair's four vectors of the tile), for `rows` rows. */
static inline __attribute__((always_inline)) void tile_accumulate(__m512 acc[TILE_ROWS][4], const uint16_t *x,
                                                                  int64_t x_stride, int rows, int64_t k2,
                                                                  const __m512bh *w) {
    for (int m = 0; m < rows; m++) {
        int32_t pair;
        memcpy(&pair, x + m * x_stride + 2 * k2, sizeof(pair));
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
        for (int c = 0; c < 4; c++) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], xv, w[c]);
    }
}

/* The sums times scale (float32 per output, or NULL), plus bias (bf16, or NULL), into y: bf16, or
 * float32 (unrounded) when y_f32. */
static inline __attribute__((always_inline)) void tile_finish(__m512 acc[TILE_ROWS][4], int rows, const float *scale,
                                                              const uint16_t *bias, void *y, int64_t y_stride,
                                                              int y_f32) {
    for (int m = 0; m < rows; m++)
        for (int c = 0; c < 4; c++) {
            __m512 v = acc[m][c];
            if (scale != NULL) v = _mm512_mul_ps(v, _mm512_loadu_ps(scale + 16 * c));
            if (bias != NULL) {
                const __m256i b16 = _mm256_loadu_si256((const __m256i *)(bias + 16 * c));
                v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b16), 16)));
            }
            if (y_f32)
                _mm512_storeu_ps((float *)y + m * y_stride + 16 * c, v);
            else
                _mm256_storeu_si256((__m256i *)((uint16_t *)y + m * y_stride + 16 * c), (__m256i)_mm512_cvtneps_pbh(v));
        }
}

/* `rows` (a literal at each call, so that the sums stay in registers) rows of x times the tile. The
 * k-pair's four weight vectors are pinned in registers by an empty asm: left to itself gcc reloads
 * each once per row, and the loads, not the dot products, bound the loop (1.2-1.5x slower from 16
 * rows on a Zen 4 EPYC). */
static inline __attribute__((always_inline)) void tile_rows(const int rows, const uint16_t *x, int64_t x_stride,
                                                            const uint16_t *tile, int64_t K2, const float *scale,
                                                            const uint16_t *bias, void *y, int64_t y_stride,
                                                            int y_f32) {
    __m512 acc[TILE_ROWS][4];
    for (int m = 0; m < rows; m++)
        for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_ps();
    for (int64_t k2 = 0; k2 < K2; k2++) {
        __m512bh w[4];
        for (int c = 0; c < 4; c++) w[c] = (__m512bh)_mm512_loadu_si512(tile + (k2 * TILE_N + 16 * c) * 2);
        __asm__("" : "+v"(w[0]), "+v"(w[1]), "+v"(w[2]), "+v"(w[3]));
        tile_accumulate(acc, x, x_stride, rows, k2, w);
    }
    tile_finish(acc, rows, scale, bias, y, y_stride, y_f32);
}

/* Every one of the M rows of x times the tile, TILE_ROWS rows per pass (the tile is read from L2 after
 * the first); y points at the tile's first output of row 0. */
static inline __attribute__((always_inline)) void tile_times_rows(int64_t M, const uint16_t *x, int64_t x_stride,
                                                                  const uint16_t *tile, int64_t K2, const float *scale,
                                                                  const uint16_t *bias, void *y, int64_t y_stride,
                                                                  int y_f32) {
    for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
        const uint16_t *xm = x + m0 * x_stride;
        void *ym = (char *)y + m0 * y_stride * (y_f32 ? 4 : 2);
#define ROWS(R) tile_rows(R, xm, x_stride, tile, K2, scale, bias, ym, y_stride, y_f32)
        switch (M - m0 < TILE_ROWS ? M - m0 : TILE_ROWS) {
        case 1: ROWS(1); break;
        case 2: ROWS(2); break;
        case 3: ROWS(3); break;
        case 4: ROWS(4); break;
        case 5: ROWS(5); break;
        default: ROWS(6);
        }
#undef ROWS
    }
}

#endif
