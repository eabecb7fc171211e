/*
 * int4 weights in torch's CPU packed layout (`_convert_weight_to_int4pack_for_cpu`, inner K tiles 1)
 * back to bf16 or float32 rows, for steps with too many rows for torch's int4 kernel (from 16 rows
 * it is 2-3x slower than dequantizing once and running the bf16 matmul; quant.py).
 *
 * Layout (checked by tests/test_quant.py against torch's own kernel): [N / 64][K][32] bytes; byte
 * (b, k, j) holds weight (64 b + j, k) in its low nibble and (64 b + 32 + j, k) in its high one.
 * scales_zeros [K / group][N][2] (scale, zero) in the output's dtype; value = (q - 8) * scale + zero,
 * computed in float32 and rounded once, as torch's kernel forms it before its float32 sums.
 */
#include <stdint.h>

#include "dtype.h"

void dequant_int4(const uint8_t *packed, const void *scales_zeros, void *out, int64_t N, int64_t K,
                  int64_t group, int is_bf16, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t n = 0; n < N; n++) {
        const int64_t b = n / 64, j = n % 64;
        const uint8_t *col = packed + b * K * 32 + (j % 32);
        const int shift = j < 32 ? 0 : 4;
        char *row = (char *)out + n * K * (is_bf16 ? 2 : 4);
        for (int64_t k0 = 0; k0 < K; k0 += group) {
            const int64_t sz = ((k0 / group) * N + n) * 2;
            const float scale = get(scales_zeros, is_bf16, sz), zero = get(scales_zeros, is_bf16, sz + 1);
            for (int64_t k = k0; k < k0 + group; k++)
                put(row, is_bf16, k, (float)(((col[k * 32] >> shift) & 0xF) - 8) * scale + zero);
        }
    }
}
