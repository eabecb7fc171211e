/*
 * Elements of bf16 or float32 rows as float32, and back: bf16 rounded to nearest-even as torch
 * rounds it (a NaN stays a NaN). Written with memcpy, never a pointer cast between float and
 * integer types, which breaks strict aliasing once inlined.
 */
#ifndef BATCHPILOT_DTYPE_H
#define BATCHPILOT_DTYPE_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof(float));
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof(float));
    const uint32_t rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16; /* round to nearest even */
    const uint32_t quiet_nan = (bits >> 16) | 0x40;                          /* a NaN stays a NaN */
    return (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

/* The value of element i of a row, as float. */
static inline float get(const void *row, int is_bf16, int64_t i) {
    return is_bf16 ? bf16_to_float(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* Rounds to the row's dtype: what torch does when an op's result is stored in bf16. */
static inline float round_to(int is_bf16, float f) {
    return is_bf16 ? bf16_to_float(float_to_bf16(f)) : f;
}

static inline void put(void *row, int is_bf16, int64_t i, float f) {
    if (is_bf16)
        ((uint16_t *)row)[i] = float_to_bf16(f);
    else
        ((float *)row)[i] = f;
}

#ifdef __AVX512F__
#include <immintrin.h>

/* 16 bf16 as floats. */
static inline __attribute__((always_inline)) __m512 bf16x16_load(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

#ifdef __AVX512BF16__
/* float_to_bf16 on 16 lanes, packed into 16 bf16: VCVTNEPS2BF16 rounds to nearest-even and quiets NaNs as
 * float_to_bf16 does, and also flushes denormals to zero (a float under 1.2e-38: none of the values rounded
 * here), in one instruction where the integer rounding below takes ~8. */
static inline __attribute__((always_inline)) __m256i bf16x16_pack(__m512 f) { return (__m256i)_mm512_cvtneps_pbh(f); }
#else
/* float_to_bf16 on 16 lanes: the same integer rounding. */
static inline __attribute__((always_inline)) __m256i bf16x16_pack(__m512 f) {
    const __m512i b = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    const __m512i biased = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb);
    const __m512i rounded = _mm512_srli_epi32(biased, 16);
    const __m512i quiet_nan = _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), quiet_nan));
}
#endif

/* round_to(1, f) on 16 lanes. */
static inline __attribute__((always_inline)) __m512 bf16x16_round(__m512 f) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16x16_pack(f)), 16));
}

/* 16 floats stored as bf16, rounded as put() rounds them. */
static inline __attribute__((always_inline)) void bf16x16_store(uint16_t *p, __m512 f) {
    _mm256_storeu_si256((__m256i *)p, bf16x16_pack(f));
}
#endif

#endif
