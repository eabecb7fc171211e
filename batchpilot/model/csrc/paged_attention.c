/*
 * Paged decode attention for the CPU: one query token per sequence, keys and values read
 * straight from the cache blocks (no gather copy), online softmax in float32.
 *
 * Layout (see batchpilot/model/attention.py): q and out are [B, H, D]; k_cache and v_cache
 * are [KVH, S, D] with S = num_blocks * block_size; block_tables is [B, W]; context_lens is
 * [B]. The G = H / KVH query heads of a KV head are processed together, so each K/V row is
 * read from memory once per sequence, and the next block's rows are prefetched while one block
 * is computed (blocks lie anywhere in the cache, where the hardware prefetcher does not follow).
 * Parallel over (sequence, KV head) with OpenMP; the process shares torch's libgomp (same
 * soname), so there is one thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dtype.h"
#include "fast_exp.h"
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#define MAX_G 16
#define MAX_D 256
#define MAX_BS 128

static inline __attribute__((always_inline)) void load_row(const void *base, int is_bf16, int64_t offset, int d,
                                                          float *dst) {
    const char *row = (const char *)base + offset * (is_bf16 ? 2 : 4);
    for (int i = 0; i < d; i++) dst[i] = get(row, is_bf16, i);
}

static inline __attribute__((always_inline)) void store_row(void *base, int is_bf16, int64_t offset, int d,
                                                           const float *src, float mul) {
    char *row = (char *)base + offset * (is_bf16 ? 2 : 4);
    for (int i = 0; i < d; i++) put(row, is_bf16, i, src[i] * mul);
}

/* One (sequence, KV head) task; inlined with a constant dtype (see paged_decode_attention). */
static inline __attribute__((always_inline)) void attend(
        int b, int kh, const void *q, const void *k_cache, const void *v_cache, void *out,
        const int64_t *block_tables, const int64_t *context_lens, int num_heads, int num_kv_heads, int D,
        int table_width, int BS, int64_t num_slots, float scale, const int is_bf16) {
    const int G = num_heads / num_kv_heads;
    float qf[MAX_G * MAX_D], acc[MAX_G * MAX_D], row[MAX_D], p[MAX_G * MAX_BS];
    float mx[MAX_G], den[MAX_G];
    const int64_t len = context_lens[b];
    const int64_t head0 = (int64_t)b * num_heads + (int64_t)kh * G;
    for (int g = 0; g < G; g++) {
        load_row(q, is_bf16, (head0 + g) * D, D, qf + g * D);
        for (int i = 0; i < D; i++) qf[g * D + i] *= scale;
        memset(acc + g * D, 0, (size_t)D * sizeof(float));
        mx[g] = -INFINITY;
        den[g] = 0.0f;
    }
    for (int64_t start = 0; start < len; start += BS) {
        const int n = (int)((len - start) < BS ? (len - start) : BS);
        const int64_t slot0 = block_tables[(int64_t)b * table_width + start / BS] * BS;
        const int64_t base = ((int64_t)kh * num_slots + slot0) * D;
        if (start + BS < len) { /* the next block's rows, fetched while this one is computed */
            const int64_t next = ((int64_t)kh * num_slots
                                  + block_tables[(int64_t)b * table_width + start / BS + 1] * BS) * D;
            const int64_t bytes = (int64_t)BS * D * (is_bf16 ? 2 : 4);
            const char *kn = (const char *)k_cache + next * (is_bf16 ? 2 : 4);
            const char *vn = (const char *)v_cache + next * (is_bf16 ? 2 : 4);
            for (int64_t off = 0; off < bytes; off += 64) {
                __builtin_prefetch(kn + off, 0, 3);
                __builtin_prefetch(vn + off, 0, 3);
            }
        }
#ifdef __AVX512BF16__
        if (is_bf16 && D % 32 == 0) {
            /* bf16 pairs straight into float sums (vdpbf16ps): no conversion of K, half the FMAs;
             * 5-10% of the kernel's time on an AMX Xeon. */
            const uint16_t *qraw = (const uint16_t *)q + head0 * D;
            for (int t = 0; t < n; t++) {
                const uint16_t *kr = (const uint16_t *)k_cache + base + (int64_t)t * D;
                for (int g = 0; g < G; g++) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int c = 0; c < D; c += 32)
                        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qraw + g * D + c),
                                               (__m512bh)_mm512_loadu_si512(kr + c));
                    p[g * BS + t] = _mm512_reduce_add_ps(acc) * scale;
                }
            }
        } else
#endif
        for (int t = 0; t < n; t++) {
            load_row(k_cache, is_bf16, base + (int64_t)t * D, D, row);
            for (int g = 0; g < G; g++) {
                const float *qg = qf + g * D;
                float s = 0.0f;
                for (int i = 0; i < D; i++) s += qg[i] * row[i];
                p[g * BS + t] = s;
            }
        }
        for (int g = 0; g < G; g++) {
            float m = mx[g];
            for (int t = 0; t < n; t++) m = p[g * BS + t] > m ? p[g * BS + t] : m;
            const float correction = fast_exp(mx[g] - m); /* exp(-inf) = 0 on the first block */
            float sum = den[g] * correction;
            for (int t = 0; t < n; t++) {
                p[g * BS + t] = fast_exp(p[g * BS + t] - m);
            }
            for (int t = 0; t < n; t++) {
                sum += p[g * BS + t];
            }
            if (correction != 1.0f)
                for (int i = 0; i < D; i++) acc[g * D + i] *= correction;
            den[g] = sum;
            mx[g] = m;
        }
        for (int t = 0; t < n; t++) {
            load_row(v_cache, is_bf16, base + (int64_t)t * D, D, row);
            for (int g = 0; g < G; g++) {
                const float w = p[g * BS + t];
                float *ag = acc + g * D;
                for (int i = 0; i < D; i++) ag[i] += w * row[i];
            }
        }
    }
    for (int g = 0; g < G; g++) store_row(out, is_bf16, (head0 + g) * D, D, acc + g * D, 1.0f / den[g]);
}

/* Returns 0, or -1 when a dimension exceeds the fixed per-thread buffers. */
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, void *out,
                           const int64_t *block_tables, const int64_t *context_lens, int num_seqs,
                           int num_heads, int num_kv_heads, int head_dim, int table_width,
                           int block_size, int64_t num_slots, float scale, int is_bf16, int num_threads) {
    if (num_heads / num_kv_heads > MAX_G || head_dim > MAX_D || block_size > MAX_BS) return -1;
    /* One parallel loop per dtype with the dtype a literal: a dtype test left inside the parallel
     * region is not folded (OpenMP outlines the region before inlining) and costs vectorisation. */
#define ATTEND(BF16) attend(b, kh, q, k_cache, v_cache, out, block_tables, context_lens, num_heads, num_kv_heads, \
                            head_dim, table_width, block_size, num_slots, scale, BF16)
    if (is_bf16) {
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)
        for (int b = 0; b < num_seqs; b++)
            for (int kh = 0; kh < num_kv_heads; kh++) ATTEND(1);
    } else {
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)
        for (int b = 0; b < num_seqs; b++)
            for (int kh = 0; kh < num_kv_heads; kh++) ATTEND(0);
    }
    return 0;
}
