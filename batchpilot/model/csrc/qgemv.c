/*
 * y = x W^T (+ b) for int8 or int4 weights, in bf16, for steps of up to a few hundred rows. torch's
 * weight-only kernels are 2-3x slower than the bf16 matmul from 16 rows on a Zen 4 EPYC, and
 * dequantizing the whole weight every step costs more than the matmul at 32 rows (quant.py); here
 * each task expands one tile of 64 outputs into bf16 in a buffer that stays in L2, then multiplies
 * every row by it as gemv.c does (vdpbf16ps of broadcast pairs of x), so memory carries only the
 * quantized bytes and the expansion is paid once per tile whatever the number of rows.
 *
 * Layouts (quant.py packs them), tiles of 64 outputs along N and pairs along K:
 *   int8: q [N / 64][K / 2][64][2] int8, one float32 scale per output [N]. The tile holds q exactly
 *         (|q| <= 127 is exact in bf16); the sums are scaled at the end: y = s * sum(x q).
 *   int4: q [N / 64][K / 2][64] bytes, k even in the low nibble and k + 1 in the high one; scale and
 *         zero per group of G inputs, [N / 64][K / G][64] float32 each; the tile holds
 *         (q - 8) * scale + zero rounded to bf16, the value quant.Int4Weight.dequantize gives.
 * Built where the CPU has AVX512-BF16; elsewhere quant.py uses torch's kernels.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512BF16__
#include <immintrin.h>

#define TILE_N 64
#define MAX_M 4

/* Expand one tile's k-pairs [k2_0, k2_1) into buf [K / 2][64][2] bf16 (as 32-bit pairs). */
static inline void expand_int8(const int8_t *qt, int64_t k2_0, int64_t k2_1, uint32_t *buf) {
    for (int64_t k2 = k2_0; k2 < k2_1; k2++) {
        const int8_t *src = qt + k2 * TILE_N * 2;
        for (int c = 0; c < 4; c++) { /* 16 outputs x 2 inputs = 32 bytes -> 32 bf16 in pair order */
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + 32 * c))));
            const __m512 hi = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + 32 * c + 16))));
            _mm512_storeu_si512(buf + k2 * TILE_N + 16 * c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
}

static inline void expand_int4(const uint8_t *qt, const float *st, const float *zt, int64_t k2_0, int64_t k2_1,
                               int64_t group, uint32_t *buf) {
    /* cvtne2ps gives [16 values of k, 16 of k + 1]; this permutation interleaves them into pairs */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i low4 = _mm512_set1_epi32(0xF), eight = _mm512_set1_epi32(8);
    for (int64_t k2 = k2_0; k2 < k2_1; k2++) {
        const uint8_t *src = qt + k2 * TILE_N;
        const int64_t g = 2 * k2 / group;
        for (int c = 0; c < 4; c++) {
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + 16 * c)));
            const __m512 q0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, low4), eight));
            const __m512 q1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight));
            const __m512 s = _mm512_loadu_ps(st + g * TILE_N + 16 * c), z = _mm512_loadu_ps(zt + g * TILE_N + 16 * c);
            const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(q1, s, z), _mm512_fmadd_ps(q0, s, z));
            _mm512_storeu_si512(buf + k2 * TILE_N + 16 * c, _mm512_permutexvar_epi16(interleave, (__m512i)v));
        }
    }
}

/* The rows of x times one expanded tile; bias (bf16) and per-output scales (float, or NULL) applied. */
static inline void tile_rows(const uint16_t *x, int64_t x_stride, const uint32_t *buf, int64_t K2, int64_t M,
                             const float *scale, const uint16_t *bias, uint16_t *y, int64_t y_stride) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
        const int rows = (int)(M - m0 < MAX_M ? M - m0 : MAX_M);
        __m512 acc[MAX_M][4];
        for (int m = 0; m < MAX_M; m++)
            for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
        for (int64_t k2 = 0; k2 < K2; k2++) {
            const uint32_t *wk = buf + k2 * TILE_N;
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk), w1 = (__m512bh)_mm512_loadu_si512(wk + 16);
            const __m512bh w2 = (__m512bh)_mm512_loadu_si512(wk + 32), w3 = (__m512bh)_mm512_loadu_si512(wk + 48);
            for (int m = 0; m < rows; m++) {
                int32_t pair;
                memcpy(&pair, x + (m0 + m) * x_stride + 2 * k2, sizeof(pair));
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
                acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xv, w0);
                acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xv, w1);
                acc[m][2] = _mm512_dpbf16_ps(acc[m][2], xv, w2);
                acc[m][3] = _mm512_dpbf16_ps(acc[m][3], xv, w3);
            }
        }
        for (int m = 0; m < rows; m++)
            for (int j = 0; j < 4; j++) {
                __m512 v = acc[m][j];
                if (scale != NULL) v = _mm512_mul_ps(v, _mm512_loadu_ps(scale + 16 * j));
                if (bias != NULL) {
                    const __m256i b16 = _mm256_loadu_si256((const __m256i *)(bias + 16 * j));
                    v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b16), 16)));
                }
                _mm256_storeu_si256((__m256i *)(y + (m0 + m) * y_stride + 16 * j), (__m256i)_mm512_cvtneps_pbh(v));
            }
    }
}

/* bits 4: int4 (scales and zeros per group), 8: int8 (scales per output, zeros NULL). x: [M, K] bf16
 * rows with stride x_stride (K even, rows 4-byte aligned); y: [M, N] bf16. Returns -1 for N not a
 * multiple of 64 or an odd K, -2 when a buffer cannot be allocated. */
int qgemv_bf16(const uint16_t *x, int64_t x_stride, const void *q, const float *scales, const float *zeros,
               int bits, int64_t group, const uint16_t *bias, uint16_t *y, int64_t y_stride, int64_t M, int64_t K,
               int64_t N, int num_threads) {
    if (N % TILE_N != 0 || K % 2 != 0 || (bits == 4 && K % group != 0)) return -1;
    const int64_t tiles = N / TILE_N, K2 = K / 2;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        uint32_t *buf = aligned_alloc(64, (size_t)K2 * TILE_N * sizeof(uint32_t));
        if (buf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            if (buf == NULL) continue;
            if (bits == 8) {
                expand_int8((const int8_t *)q + t * K2 * TILE_N * 2, 0, K2, buf);
                tile_rows(x, x_stride, buf, K2, M, scales + t * TILE_N, bias ? bias + t * TILE_N : NULL,
                          y + t * TILE_N, y_stride);
            } else {
                expand_int4((const uint8_t *)q + t * K2 * TILE_N, scales + t * (K / group) * TILE_N,
                            zeros + t * (K / group) * TILE_N, 0, K2, group, buf);
                tile_rows(x, x_stride, buf, K2, M, NULL, bias ? bias + t * TILE_N : NULL, y + t * TILE_N,
                          y_stride);
            }
        }
        free(buf);
    }
    return failed ? -2 : 0;
}

/* The whole weight as [N, K] bf16 (int8: q * scale rounded once; int4: the tile's values), for
 * steps with more rows than qgemv_bf16 serves well. */
int qdequant_bf16(const void *q, const float *scales, const float *zeros, int bits, int64_t group, uint16_t *out,
                  int64_t K, int64_t N, int num_threads) {
    if (N % TILE_N != 0 || K % 2 != 0 || (bits == 4 && K % group != 0)) return -1;
    const int64_t tiles = N / TILE_N, K2 = K / 2;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        uint32_t *buf = aligned_alloc(64, (size_t)K2 * TILE_N * sizeof(uint32_t));
        if (buf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            if (buf == NULL) continue;
            if (bits == 8)
                expand_int8((const int8_t *)q + t * K2 * TILE_N * 2, 0, K2, buf);
            else
                expand_int4((const uint8_t *)q + t * K2 * TILE_N, scales + t * (K / group) * TILE_N,
                            zeros + t * (K / group) * TILE_N, 0, K2, group, buf);
            for (int n = 0; n < TILE_N; n++) {
                uint32_t *row = (uint32_t *)(out + (t * TILE_N + n) * K);
                const float s = bits == 8 ? scales[t * TILE_N + n] : 1.0f;
                for (int64_t k2 = 0; k2 < K2; k2++) {
                    const uint32_t pair = buf[k2 * TILE_N + n];
                    if (bits == 8) {
                        const __m128 v = _mm_mul_ps(
                            _mm_castsi128_ps(_mm_set_epi32(0, 0, (int)(pair & 0xFFFF0000u), (int)(pair << 16))),
                            _mm_set1_ps(s));
                        row[k2] = (uint32_t)_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(v));
                    } else {
                        row[k2] = pair;
                    }
                }
            }
        }
        free(buf);
    }
    return failed ? -2 : 0;
}
#endif
