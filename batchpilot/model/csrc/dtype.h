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

#endif
