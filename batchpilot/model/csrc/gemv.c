/*
 * y = x W^T (+ b) in bf16 for the few rows of a decode step, reading the weights once at memory
 * speed. oneDNN's prepacked path costs ~70 us of call overhead at any size (its primitive set up
 * per call through torch's boxed dispatch) and reads a small weight at well under the bandwidth.
 *
 * The weight is laid out in tiles of 64 outputs, [N / 64][K / 2][64][2], so that a task streams
 * one contiguous tile and each vdpbf16ps multiplies a broadcast pair (x[k], x[k+1]) of a row with
 * the pairs of 16 outputs: no horizontal sums. Products accumulate in float32 and are rounded to
 * bf16 once, as F.linear does. Built where the CPU has AVX512-BF16, or else AVX2 with FMA: there
 * each 32-bit lane of a tile row holds one output's pair, split into two floats by a shift and a
 * mask and multiplied by the broadcast x[k] and x[k+1] (the same exact products and float32 sums).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>

#include "dtype.h"
#endif
#include "kernels.h"
#ifdef __AVX512BF16__

#define TILE_N 64 /* outputs per task: four 16-lane float accumulators per row */
#define MAX_M 4   /* rows per pass over a weight tile */

/* `rows` (a literal at each call, so that the sums stay in registers) rows of x times one tile. */
static inline __attribute__((always_inline)) void tile_rows(const int rows, const uint16_t *x, int64_t x_stride,
                                                            const uint16_t *wt, const uint16_t *bias, void *y,
                                                            int64_t y_stride, int y_f32, int64_t K2) {
    __m512 acc[MAX_M][4];
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t k2 = 0; k2 < K2; k2++) {
        const uint16_t *wk = wt + k2 * TILE_N * 2;
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(wk + 32);
        __m512bh w2 = (__m512bh)_mm512_loadu_si512(wk + 64);
        __m512bh w3 = (__m512bh)_mm512_loadu_si512(wk + 96);
        /* held in registers: without this gcc reloads each weight vector once per row, and the loads,
           not the dot products, bound the loop (1.2-1.5x slower from 16 rows) */
        __asm__("" : "+v"(w0), "+v"(w1), "+v"(w2), "+v"(w3));
        for (int m = 0; m < rows; m++) {
            uint32_t pair;
            memcpy(&pair, x + m * x_stride + 2 * k2, sizeof(pair));
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xv, w0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xv, w1);
            acc[m][2] = _mm512_dpbf16_ps(acc[m][2], xv, w2);
            acc[m][3] = _mm512_dpbf16_ps(acc[m][3], xv, w3);
        }
    }
    for (int m = 0; m < rows; m++)
        for (int j = 0; j < 4; j++) {
            __m512 v = acc[m][j];
            if (bias != NULL) {
                const __m256i b16 = _mm256_loadu_si256((const __m256i *)(bias + j * 16));
                v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b16), 16)));
            }
            if (y_f32)
                _mm512_storeu_ps((float *)y + m * y_stride + j * 16, v);
            else
                _mm256_storeu_si256((__m256i *)((uint16_t *)y + m * y_stride + j * 16), (__m256i)_mm512_cvtneps_pbh(v));
        }
}

/* w: [N / 64][K / 2][64][2] bf16 (kernels.pack_gemv_weight); x: [M, K] bf16 with row stride
 * x_stride; bias: [N] bf16 or NULL; y: [M, N] with row stride y_stride, bf16, or float32 (the sums
 * unrounded) when y_f32. Returns -1 for an N that is not a multiple of 64 or an odd K. */
int gemv_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *w, const uint16_t *bias, void *y,
              int64_t y_stride, int y_f32, int64_t M, int64_t K, int64_t N, int num_threads) {
    if (N % TILE_N != 0 || K % 2 != 0) return -1;
    const int64_t tiles = N / TILE_N, K2 = K / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < tiles; t++) {
        const uint16_t *wt = w + t * K2 * TILE_N * 2;
        const uint16_t *b = bias != NULL ? bias + t * TILE_N : NULL;
        for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
            const uint16_t *xm = x + m0 * x_stride;
            void *ym = (char *)y + (m0 * y_stride + t * TILE_N) * (y_f32 ? 4 : 2);
            switch (M - m0 < MAX_M ? M - m0 : MAX_M) {
            case 1: tile_rows(1, xm, x_stride, wt, b, ym, y_stride, y_f32, K2); break;
            case 2: tile_rows(2, xm, x_stride, wt, b, ym, y_stride, y_f32, K2); break;
            case 3: tile_rows(3, xm, x_stride, wt, b, ym, y_stride, y_f32, K2); break;
            default: tile_rows(4, xm, x_stride, wt, b, ym, y_stride, y_f32, K2);
            }
        }
    }
    return 0;
}
#endif
#if !defined(__AVX512BF16__) && defined(__AVX2__) && defined(__FMA__)

#define TILE_N 64 /* outputs per task: eight 8-lane float accumulators, one row at a time */

/* As above (same layout, arguments and result); a tile (K x 64 bf16, 72 KB at K = 576) stays in
 * L2 while each row of x passes over it. */
int gemv_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *w, const uint16_t *bias, void *y,
              int64_t y_stride, int y_f32, int64_t M, int64_t K, int64_t N, int num_threads) {
    if (N % TILE_N != 0 || K % 2 != 0) return -1;
    const int64_t tiles = N / TILE_N, K2 = K / 2;
    const __m256i high_half = _mm256_set1_epi32((int)0xFFFF0000u);
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t t = 0; t < tiles; t++) {
        const uint16_t *wt = w + t * K2 * TILE_N * 2;
        for (int64_t m = 0; m < M; m++) {
            const uint16_t *xm = x + m * x_stride;
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (int64_t k2 = 0; k2 < K2; k2++) {
                const uint16_t *wk = wt + k2 * TILE_N * 2;
                const __m256 x0 = _mm256_set1_ps(bf16_to_float(xm[2 * k2]));
                const __m256 x1 = _mm256_set1_ps(bf16_to_float(xm[2 * k2 + 1]));
                for (int j = 0; j < 8; j++) {
                    const __m256i pairs = _mm256_loadu_si256((const __m256i *)(wk + 16 * j));
                    const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
                    const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(pairs, high_half));
                    acc[j] = _mm256_fmadd_ps(even, x0, acc[j]);
                    acc[j] = _mm256_fmadd_ps(odd, x1, acc[j]);
                }
            }
            const int64_t at = m * y_stride + t * TILE_N;
            float sums[TILE_N];
            for (int j = 0; j < 8; j++) _mm256_storeu_ps(sums + 8 * j, acc[j]);
            for (int n = 0; n < TILE_N; n++) {
                const float v = bias != NULL ? sums[n] + bf16_to_float(bias[t * TILE_N + n]) : sums[n];
                if (y_f32)
                    ((float *)y)[at + n] = v;
                else
                    ((uint16_t *)y)[at + n] = float_to_bf16(v);
            }
        }
    }
    return 0;
}
#endif
