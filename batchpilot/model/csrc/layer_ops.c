/*
 * The small element-wise steps of a decoder layer, fused: in eager torch each is several ops of
 * ~20 us of dispatch apiece (a layer had ~45 of them; at batch 1 they were most of a decode step).
 * Each kernel reproduces the torch code it replaces (llama.py) up to float rounding: the
 * arithmetic is float32, and bf16 results are rounded to nearest-even where torch rounds them.
 *
 * Rows are independent; they are split over threads only when there are enough of them. Each
 * kernel's row function is inlined with a constant dtype inside its own parallel loop, so the
 * dtype tests fold away and gcc vectorises the loops (with the test left in, 7x slower).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dtype.h"
#include "fast_exp.h"
#include "kernels.h"
#include "team.h"

#define MIN_PARALLEL_ROWS 16

#define INLINE static inline __attribute__((always_inline))

/* Runs ROW_CALL(is_bf16) for r in [0, rows), the dtype a literal in each branch. */
#define FOR_ROWS(rows, num_threads, is_bf16, ROW_CALL)                                                    \
    do {                                                                                               \
        if (is_bf16) {                                                                                 \
            _Pragma("omp parallel for schedule(static) num_threads(num_threads) if (rows >= MIN_PARALLEL_ROWS)") \
            for (int64_t r = 0; r < rows; r++) ROW_CALL(1);                                            \
        } else {                                                                                       \
            _Pragma("omp parallel for schedule(static) num_threads(num_threads) if (rows >= MIN_PARALLEL_ROWS)") \
            for (int64_t r = 0; r < rows; r++) ROW_CALL(0);                                            \
        }                                                                                              \
    } while (0)

#ifdef __AVX512F__
/* The row functions below for bf16 rows of a multiple of 16 elements, on 16 lanes at a time (gcc left the
 * scalar loops' bf16 conversions mostly unvectorised): the same arithmetic and roundings, but for the order
 * of the sum of squares and, where dtype.h rounds by VCVTNEPS2BF16, denormals flushed to zero. */
INLINE void add_rms_norm_row16(uint16_t *x, const uint16_t *delta, const uint16_t *weight, uint16_t *out,
                               int64_t cols, float eps) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < cols; i += 16) {
        __m512 v = bf16x16_load(x + i);
        if (delta != NULL) {
            v = bf16x16_round(_mm512_add_ps(v, bf16x16_load(delta + i)));
            bf16x16_store(x + i, v);
        }
        squares = _mm512_fmadd_ps(v, v, squares);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)cols + eps));
    for (int64_t i = 0; i < cols; i += 16) {
        const __m512 normed = bf16x16_round(_mm512_mul_ps(bf16x16_load(x + i), inv));
        bf16x16_store(out + i, _mm512_mul_ps(bf16x16_load(weight + i), normed));
    }
}

INLINE void rope_row16(uint16_t *row, const float *c, const float *s, int heads, int head_dim) {
    const int half = head_dim / 2;
    for (int i = 0; i < half; i += 16) {
        const __m512 ci = bf16x16_round(_mm512_loadu_ps(c + i)), si = bf16x16_round(_mm512_loadu_ps(s + i));
        for (int h = 0; h < heads; h++) {
            uint16_t *head = row + (int64_t)h * head_dim;
            const __m512 x1 = bf16x16_load(head + i), x2 = bf16x16_load(head + half + i);
            const __m512 a = _mm512_sub_ps(bf16x16_round(_mm512_mul_ps(x1, ci)), bf16x16_round(_mm512_mul_ps(x2, si)));
            const __m512 b = _mm512_add_ps(bf16x16_round(_mm512_mul_ps(x2, ci)), bf16x16_round(_mm512_mul_ps(x1, si)));
            bf16x16_store(head + i, a);
            bf16x16_store(head + half + i, b);
        }
    }
}

INLINE void silu_mul_row16(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t cols) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < cols; i += 16) {
        const __m512 g = bf16x16_load(gate + i);
        const __m512 e = exp2_16(_mm512_mul_ps(g, _mm512_set1_ps(-1.44269504f))); /* e^-g */
        const __m512 silu = bf16x16_round(_mm512_div_ps(g, _mm512_add_ps(one, e)));
        bf16x16_store(out + i, _mm512_mul_ps(silu, bf16x16_load(up + i)));
    }
}
#define ROW16(is_bf16, n) ((is_bf16) && (n) % 16 == 0)
#endif

INLINE void add_rms_norm_row(char *x, const char *delta, const void *weight, char *out, int64_t cols, float eps,
                             const int is_bf16) {
#ifdef __AVX512F__
    if (ROW16(is_bf16, cols)) {
        add_rms_norm_row16((uint16_t *)x, (const uint16_t *)delta, weight, (uint16_t *)out, cols, eps);
        return;
    }
#endif
    float sum = 0.0f;
    if (delta != NULL) {
        for (int64_t i = 0; i < cols; i++) {
            const float v = round_to(is_bf16, get(x, is_bf16, i) + get(delta, is_bf16, i));
            put(x, is_bf16, i, v);
            sum += v * v;
        }
    } else {
        for (int64_t i = 0; i < cols; i++) {
            const float v = get(x, is_bf16, i);
            sum += v * v;
        }
    }
    const float inv = 1.0f / sqrtf(sum / (float)cols + eps);
    for (int64_t i = 0; i < cols; i++) {
        const float normed = round_to(is_bf16, get(x, is_bf16, i) * inv);
        put(out, is_bf16, i, get(weight, is_bf16, i) * normed);
    }
}

/*
 * x += delta (when delta is not NULL), then out = weight * rms_norm(x), the normalised value
 * rounded to x's dtype before the weight multiplies it (llama.py's _rms_norm).
 * x, delta, out: [rows, cols] with row strides; weight: [cols].
 */
void add_rms_norm(void *x, int64_t x_stride, const void *delta, int64_t delta_stride, const void *weight,
                  void *out, int64_t out_stride, int64_t rows, int64_t cols, float eps, int is_bf16,
                  int num_threads) {
    const int64_t elem = is_bf16 ? 2 : 4;
#define ADD_RMS_NORM_ROW(BF16)                                                                          \
    add_rms_norm_row((char *)x + r * x_stride * elem,                                                  \
                     delta ? (const char *)delta + r * delta_stride * elem : NULL, weight,             \
                     (char *)out + r * out_stride * elem, cols, eps, BF16)
    FOR_ROWS(rows, num_threads, is_bf16, ADD_RMS_NORM_ROW);
}

INLINE void rope_row(char *row, const float *c, const float *s, int heads, int head_dim, const int is_bf16) {
#ifdef __AVX512F__
    if (ROW16(is_bf16, head_dim / 2)) {
        rope_row16((uint16_t *)row, c, s, heads, head_dim);
        return;
    }
#endif
    const int half = head_dim / 2;
    const int64_t elem = is_bf16 ? 2 : 4;
    for (int h = 0; h < heads; h++) {
        char *head = row + (int64_t)h * head_dim * elem;
        for (int i = 0; i < half; i++) {
            const float ci = round_to(is_bf16, c[i]), si = round_to(is_bf16, s[i]);
            const float x1 = get(head, is_bf16, i), x2 = get(head, is_bf16, i + half);
            const float a = round_to(is_bf16, x1 * ci) - round_to(is_bf16, x2 * si);
            const float b = round_to(is_bf16, x2 * ci) + round_to(is_bf16, x1 * si);
            put(head, is_bf16, i, a);
            put(head, is_bf16, i + half, b);
        }
    }
}

/*
 * Rotary embedding in place on the first `heads` heads of each row (queries then keys, as the
 * fused QKV projection lays them out): pairs (i, i + D/2), the Hugging Face layout.
 * qkv: [rows, row_stride]; cos, sin: [rows, D/2] float32 (already gathered by position), rounded
 * to the row's dtype first, as llama.py's .to(dtype) does.
 */
void rope_in_place(void *qkv, int64_t row_stride, const float *cos_t, const float *sin_t, int64_t rows,
                   int heads, int head_dim, int is_bf16, int num_threads) {
    const int64_t elem = is_bf16 ? 2 : 4;
#define ROPE_ROW(BF16)                                                                                  \
    rope_row((char *)qkv + r * row_stride * elem, cos_t + r * (head_dim / 2), sin_t + r * (head_dim / 2), \
             heads, head_dim, BF16)
    FOR_ROWS(rows, num_threads, is_bf16, ROPE_ROW);
}

INLINE void silu_mul_row(const char *gate, const char *up, char *out, int64_t cols, const int is_bf16) {
#ifdef __AVX512F__
    if (ROW16(is_bf16, cols)) {
        silu_mul_row16((const uint16_t *)gate, (const uint16_t *)up, (uint16_t *)out, cols);
        return;
    }
#endif
    for (int64_t i = 0; i < cols; i++) {
        const float g = get(gate, is_bf16, i);
        const float silu = round_to(is_bf16, g / (1.0f + fast_exp(-g)));
        put(out, is_bf16, i, silu * get(up, is_bf16, i));
    }
}

/* out = silu(gate) * up, gate and up the two halves of each row of gate_up [rows, 2 * cols]. */
void silu_mul(const void *gate_up, void *out, int64_t rows, int64_t cols, int is_bf16, int num_threads) {
    const int64_t elem = is_bf16 ? 2 : 4;
#define SILU_MUL_ROW(BF16)                                                                              \
    silu_mul_row((const char *)gate_up + r * 2 * cols * elem, (const char *)gate_up + (r * 2 + 1) * cols * elem, \
                 (char *)out + r * cols * elem, cols, BF16)
    FOR_ROWS(rows, num_threads, is_bf16, SILU_MUL_ROW);
}

/* bytes from src to dst; where both allow it (AVX-512, whole aligned lines), by streaming stores that do not
 * read the destination's lines first (the caller fences). */
INLINE void copy_to_cache(char *dst, const char *src, int64_t bytes) {
#ifdef __AVX512F__
    if (bytes % 64 == 0 && (uintptr_t)dst % 64 == 0) {
        for (int64_t o = 0; o < bytes; o += 64) _mm512_stream_si512((void *)(dst + o), _mm512_loadu_si512(src + o));
        return;
    }
#endif
    memcpy(dst, src, (size_t)bytes);
}

/*
 * Each new token's K and V rows into its cache slot: caches [KVH, S, D]; k and v [rows, KVH, D]
 * with their own row strides (views into the QKV projection's output), heads contiguous; slots [rows].
 * A step writes a few rows per sequence anywhere in the pool, whose lines are seldom in the cache: plain
 * stores read each line from memory first (a 512-row step's writes took 5.9 ms over 30 layers, 1.1 by
 * streaming stores on two threads; docs/reproduction.md). The next reads of these rows are the attention's,
 * after the fence.
 */
static void write_kv_rows(const void *k, int64_t k_stride, const void *v, int64_t v_stride, void *k_cache,
                          void *v_cache, const int64_t *slots, int64_t first, int64_t last, int kv_heads,
                          int head_dim, int64_t num_slots, int is_bf16) {
    const int64_t elem = is_bf16 ? 2 : 4, bytes = (int64_t)head_dim * elem;
    for (int64_t r = first; r < last; r++)
        for (int h = 0; h < kv_heads; h++) {
            const int64_t dst = ((int64_t)h * num_slots + slots[r]) * bytes;
            copy_to_cache((char *)k_cache + dst, (const char *)k + (r * k_stride + (int64_t)h * head_dim) * elem,
                          bytes);
            copy_to_cache((char *)v_cache + dst, (const char *)v + (r * v_stride + (int64_t)h * head_dim) * elem,
                          bytes);
        }
#ifdef __AVX512F__
    _mm_sfence();
#endif
}

void write_kv(const void *k, int64_t k_stride, const void *v, int64_t v_stride, void *k_cache, void *v_cache,
              const int64_t *slots, int64_t rows, int kv_heads, int head_dim, int64_t num_slots, int is_bf16,
              int num_threads) {
#pragma omp parallel num_threads(num_threads) if (rows >= MIN_PARALLEL_ROWS)
    write_kv_rows(k, k_stride, v, v_stride, k_cache, v_cache, slots, team_start(rows), team_end(rows), kv_heads,
                  head_dim, num_slots, is_bf16);
}

/* A decode step's per-head work before its attention (decode_layers.c), for one row and KV head kh: the rotary
 * embedding of the head's G = H / KVH query heads and of its key head in place in the row of qkv ([(H + 2 KVH) D]),
 * the query heads copied to q_row ([H D]), the key and value written to the cache at the row's slot. The same
 * functions as rope_in_place and write_kv, head by head: the same values. */
void rope_kv_head(uint16_t *qkv_row, uint16_t *q_row, const float *c, const float *s, int64_t slot, int kh, int H,
                  int KVH, int D, uint16_t *k_cache, uint16_t *v_cache, int64_t num_slots) {
    const int G = H / KVH;
    uint16_t *queries = qkv_row + (int64_t)kh * G * D, *key = qkv_row + (int64_t)(H + kh) * D;
    rope_row((char *)queries, c, s, G, D, 1);
    rope_row((char *)key, c, s, 1, D, 1);
    memcpy(q_row + (int64_t)kh * G * D, queries, (size_t)G * D * 2);
    const int64_t head = (int64_t)kh * num_slots * D;
    write_kv_rows(key, 0, key + (int64_t)KVH * D, 0, k_cache + head, v_cache + head, &slot, 0, 1, 1, D, num_slots, 1);
}

/* Rows [r0, r1) of add_rms_norm (bf16), no barrier: for a team splitting the rows, or for a thread that
 * computes every row itself (decode_layers.c). */
void add_rms_norm_rows(uint16_t *x, int64_t x_stride, const uint16_t *delta, int64_t delta_stride,
                       const uint16_t *weight, uint16_t *out, int64_t out_stride, int64_t r0, int64_t r1,
                       int64_t cols, float eps) {
    for (int64_t r = r0; r < r1; r++)
        add_rms_norm_row((char *)(x + r * x_stride), delta ? (const char *)(delta + r * delta_stride) : NULL, weight,
                         (char *)(out + r * out_stride), cols, eps, 1);
}

/* Rows [r0, r1) of silu_mul (bf16), no barrier, as add_rms_norm_rows. */
void silu_mul_rows(const uint16_t *gate_up, uint16_t *out, int64_t r0, int64_t r1, int64_t cols) {
    for (int64_t r = r0; r < r1; r++)
        silu_mul_row((const char *)(gate_up + r * 2 * cols), (const char *)(gate_up + (r * 2 + 1) * cols),
                     (char *)(out + r * cols), cols, 1);
}
