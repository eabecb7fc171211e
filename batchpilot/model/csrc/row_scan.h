/*
 * Scans of one row of float32 or bf16 logits shared by the sampling kernels: its maximum
 * (ignoring NaNs), the first index holding a value, the first NaN, and the argmax built on them.
 */
#ifndef BATCHPILOT_ROW_SCAN_H
#define BATCHPILOT_ROW_SCAN_H

#include <math.h>
#include <stdint.h>

#include "dtype.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define CHUNK 64

static inline __attribute__((always_inline)) float at(const void *row, int is_bf16, int64_t i) {
    return get(row, is_bf16, i);
}

static inline __attribute__((always_inline)) int64_t first_equal(const void *row, int is_bf16, int64_t n,
                                                                 float value) {
    int64_t i = 0;
    for (; i + CHUNK <= n; i += CHUNK) { /* whole chunks tested without a branch per element */
        int hit = 0;
        for (int j = 0; j < CHUNK; j++) hit |= at(row, is_bf16, i + j) == value;
        if (hit) break;
    }
    for (; i < n; i++)
        if (at(row, is_bf16, i) == value) return i;
    return 0;
}

static inline __attribute__((always_inline)) int64_t first_nan(const void *row, int is_bf16, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float v = at(row, is_bf16, i);
        if (v != v) return i;
    }
    return -1;
}

/* The row's maximum ignoring NaNs, and whether it holds a NaN. */
static inline __attribute__((always_inline)) float row_max(const void *row, int is_bf16, int64_t cols,
                                                           int *has_nan) {
    float best = -INFINITY;
    int nan = 0;
    int64_t i = 0;
#ifdef __AVX512F__
    /* gcc leaves a NaN-sensitive max reduction scalar without -ffinite-math-only: 8x slower. */
    __m512 lanes = _mm512_set1_ps(-INFINITY);
    __mmask16 nan_lanes = 0;
    for (; i + 16 <= cols; i += 16) {
        const __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i));
        const __m512 v = is_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16))
                                 : _mm512_loadu_ps((const float *)row + i);
        lanes = _mm512_max_ps(v, lanes); /* a NaN in v leaves the lane as it was */
        nan_lanes |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    best = _mm512_reduce_max_ps(lanes);
    nan = nan_lanes != 0;
#endif
    for (; i < cols; i++) {
        const float v = at(row, is_bf16, i);
        best = v > best ? v : best;
        nan |= v != v;
    }
    *has_nan = nan;
    return best;
}

static inline __attribute__((always_inline)) int64_t argmax_row(const void *row, int is_bf16, int64_t cols) {
    int nan;
    const float best = row_max(row, is_bf16, cols, &nan);
    return nan ? first_nan(row, is_bf16, cols) : first_equal(row, is_bf16, cols, best);
}

#endif
