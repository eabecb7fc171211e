/*
 * Random sampling with temperature alone, over the rows of float32 or bf16 logits [R, V], in
 * parallel over rows: the token at which the CDF of softmax(logits / T) first exceeds u, for the
 * row's own uniform u in [0, 1).
 *
 * The torch path spends most of a step's sampling in a float32 copy, a softmax and a cumsum (a
 * sequential scan) of every row. Here each row is read in place: pass one finds its maximum,
 * pass two sums exp((x - max) / T) per block of BLOCK entries, then the first block whose
 * running sum exceeds u x total is scanned again, alone. A row is computed by itself, so a
 * seeded request draws the same token in any batch. A weight under e^-87 counts as exactly 0
 * (a -inf logit, a token a grammar forbids, is never drawn), and comparisons are strict, so no
 * zero-weight token is ever returned. A row holding a NaN or +inf gives its argmax.
 */
#include <stdint.h>

#include "fast_exp.h"
#include "row_scan.h"

#define BLOCK 256

static inline __attribute__((always_inline)) float weight(const void *row, int is_bf16, int64_t i, float inv_temp,
                                                          float shift) {
    const float d = get(row, is_bf16, i) * inv_temp - shift;
    return d < -87.0f ? 0.0f : fast_exp(d);
}

static inline __attribute__((always_inline)) float block_sum(const void *row, int is_bf16, int64_t start,
                                                             int64_t end, float inv_temp, float shift) {
    float s = 0.0f;
    for (int64_t i = start; i < end; i++) s += weight(row, is_bf16, i, inv_temp, shift);
    return s;
}

static inline __attribute__((always_inline)) int64_t sample_row(const void *row, int is_bf16, int64_t cols,
                                                                float inv_temp, float u) {
    int nan;
    const float best = row_max(row, is_bf16, cols, &nan);
    if (nan || isinf(best)) return argmax_row(row, is_bf16, cols);
    const float shift = best * inv_temp;
    const int64_t blocks = (cols + BLOCK - 1) / BLOCK;
    float sums[blocks];
    double total = 0.0;
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t end = (b + 1) * BLOCK < cols ? (b + 1) * BLOCK : cols;
        sums[b] = block_sum(row, is_bf16, b * BLOCK, end, inv_temp, shift);
        total += sums[b];
    }
    const double target = (double)u * total;
    double before = 0.0;
    int64_t b = 0, last_block = 0;
    for (; b < blocks; b++) {
        if (sums[b] > 0.0f) last_block = b;
        if (before + sums[b] > target) break;
        before += sums[b];
    }
    if (b == blocks) { /* rounding left the target at the end: the last block that can occur */
        b = last_block;
        before = total - sums[b];
    }
    const int64_t end = (b + 1) * BLOCK < cols ? (b + 1) * BLOCK : cols;
    int64_t last = -1;
    for (int64_t i = b * BLOCK; i < end; i++) {
        const float w = weight(row, is_bf16, i, inv_temp, shift);
        if (w > 0.0f) {
            last = i;
            if (before + w > target) return i;
        }
        before += w;
    }
    return last >= 0 ? last : argmax_row(row, is_bf16, cols);
}

void sample_rows(const void *logits, int64_t rows, int64_t cols, const float *inv_temps, const float *uniforms,
                 int64_t *out, int is_bf16, int num_threads) {
    if (is_bf16) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t r = 0; r < rows; r++)
            out[r] = sample_row((const uint16_t *)logits + r * cols, 1, cols, inv_temps[r], uniforms[r]);
    } else {
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t r = 0; r < rows; r++)
            out[r] = sample_row((const float *)logits + r * cols, 0, cols, inv_temps[r], uniforms[r]);
    }
}
