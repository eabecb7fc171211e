/*
 * The kernels one C file calls from another (decode_layers.c), declared once; each defining file
 * includes this header too, so the compiler checks the two agree.
 */
#ifndef BATCHPILOT_KERNELS_H
#define BATCHPILOT_KERNELS_H

#include <stdint.h>

int gemv_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *w, const uint16_t *bias, void *y,
              int64_t y_stride, int y_f32, int64_t M, int64_t K, int64_t N, int num_threads);
int qgemv_bf16(const uint16_t *x, int64_t x_stride, const void *q, const void *scales, const void *lows,
               int bits, int64_t group, const uint16_t *bias, uint16_t *y, int64_t y_stride, int64_t M, int64_t K,
               int64_t N, int num_threads); /* only with AVX512-BF16 */
void add_rms_norm(void *x, int64_t x_stride, const void *delta, int64_t delta_stride, const void *weight,
                  void *out, int64_t out_stride, int64_t rows, int64_t cols, float eps, int is_bf16,
                  int num_threads);
void rope_in_place(void *qkv, int64_t row_stride, const float *cos_t, const float *sin_t, int64_t rows,
                   int heads, int head_dim, int is_bf16, int num_threads);
void silu_mul(const void *gate_up, void *out, int64_t rows, int64_t cols, int is_bf16, int num_threads);
void write_kv(const void *k, int64_t k_stride, const void *v, int64_t v_stride, void *k_cache, void *v_cache,
              const int64_t *slots, int64_t rows, int kv_heads, int head_dim, int64_t num_slots, int is_bf16);
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, void *out,
                           const int64_t *block_tables, const int64_t *context_lens, int num_seqs,
                           int num_heads, int num_kv_heads, int head_dim, int table_width,
                           int block_size, int64_t num_slots, float scale, int is_bf16, int num_threads);

#endif
