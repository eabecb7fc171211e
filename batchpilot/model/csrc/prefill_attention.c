/*
 * Causal attention of one prompt chunk, keys and values read from the paged cache: the prefill
 * counterpart of paged_attention.c. Torch's CPU flash attention runs this at about 35 GFLOP/s on
 * a 2-core EPYC with the default model's shapes (9 query heads over 3 KV heads, head_dim 64), near
 * half of a prefill step whose matmuls run at 850; docs/reproduction.md has the measurements.
 *
 * Two phases. First the chunk's keys and values (all context positions, earlier chunks included)
 * are gathered once from their slots into float32 panels: keys transposed per block of BK keys,
 * [KVH][blocks][D][BK], so that a vector load holds one dimension of BK consecutive keys; values
 * as [KVH][L][D]. Then each task takes one KV head and TQ query positions with the G query heads
 * that share it, MR rows at a time: scores for BK keys by broadcast-multiply of each query element
 * into the key panel (MR x BK float sums kept in registers), an online softmax in float32, and the
 * weighted values summed in registers, 64 dimensions at a time. Keys past a row's own position
 * are masked; key blocks past every row of the group are not visited. Products and sums are
 * float32 throughout, as torch's kernel computes them for bf16 inputs.
 *
 * With bf16 caches on CPUs with AVX512-BF16 the panels stay bf16, laid out in pairs, and both
 * products are vdpbf16ps (two products a lane an instruction, sums in float32), with the softmax
 * on whole registers; the weights are rounded to bf16 for the value products, as in the decode
 * kernel. 1.5-1.9x the float32 path on the Zen 4 EPYC (docs/reproduction.md).
 *
 * Written with gcc's vector extensions (16 floats: one AVX-512 register). It is used only where
 * the build has AVX-512 (prefill_attention_available); with half the registers (AVX2) the
 * accumulators would spill, and torch's kernel is kept there until measured.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#include "dtype.h"
#include "fast_exp.h"
#include "prefill_amx.h"

typedef float v16 __attribute__((vector_size(64)));

#define BK 32  /* keys per score block: two vectors */
#define MR 6   /* rows (query position x head) per register block */
#define TQ 16  /* query positions per task */
#define DC 64  /* output dimensions summed in registers at a time: four vectors */
#define MAX_D 256

/* Whether bf16 prompts take the AMX tiles (prefill_amx.h): built for them, and Linux gives them. */
int prefill_attention_amx(void) {
#ifdef BATCHPILOT_AMX
    return amx_granted();
#else
    return 0;
#endif
}

int prefill_attention_available(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

static inline v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof(v)); }

/* Both attend_rows paths: each row's running maximum, denominator and output cleared; returns the key
 * blocks the group visits (up to the block of its last row's position). */
static inline __attribute__((always_inline)) int64_t start_rows(float *mx, float *den, float *o, int D,
                                                                const int64_t *limit, int rows) {
    for (int m = 0; m < MR; m++) {
        mx[m] = -INFINITY;
        den[m] = 0.0f;
        memset(o + m * D, 0, (size_t)D * sizeof(float));
    }
    int64_t last = 0;
    for (int m = 0; m < rows; m++) last = limit[m] > last ? limit[m] : last;
    return last / BK + 1;
}

/* Each row's output divided by its softmax denominator. */
static inline __attribute__((always_inline)) void finish_rows(float *o, const float *den, int D, int rows) {
    for (int m = 0; m < rows; m++) {
        const float inv = 1.0f / den[m];
        for (int i = 0; i < D; i++) o[m * D + i] *= inv;
    }
}

/* One group of up to MR rows: q (MR x D, float, scaled) attends keys [0, limit[m]] of its KV head. */
static inline __attribute__((always_inline)) void attend_rows(
        const float *qf, const int64_t *limit, const float *kt, const float *vf, int64_t L, int D, float *o,
        int rows) {
    float mx[MR], den[MR];
    float s[MR][BK];
    const int64_t nblocks = start_rows(mx, den, o, D, limit, rows);
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const float *kb = kt + blk * (int64_t)D * BK;
        v16 acc[MR][2];
        for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = (v16){0};
        for (int d = 0; d < D; d++) {
            const v16 k0 = load16(kb + d * BK), k1 = load16(kb + d * BK + 16);
            for (int m = 0; m < MR; m++) {
                const float qv = qf[m * D + d];
                acc[m][0] += qv * k0;
                acc[m][1] += qv * k1;
            }
        }
        const int64_t key0 = blk * BK;
        for (int m = 0; m < MR; m++) {
            store16(s[m], acc[m][0]);
            store16(s[m] + 16, acc[m][1]);
        }
        for (int m = 0; m < rows; m++) {
            const int64_t visible = limit[m] - key0 + 1; /* keys of this block the row may see */
            for (int j = (int)(visible < 0 ? 0 : visible); j < BK; j++) s[m][j] = -INFINITY;
            float top = mx[m];
            for (int j = 0; j < BK; j++) top = s[m][j] > top ? s[m][j] : top;
            if (top == -INFINITY) { /* nothing visible yet (cannot happen for causal rows) */
                for (int j = 0; j < BK; j++) s[m][j] = 0.0f;
                continue;
            }
            const float correction = fast_exp(mx[m] - top); /* exp(-inf) = 0 on the first block */
            float sum = 0.0f;
            for (int j = 0; j < BK; j++) s[m][j] = fast_exp(s[m][j] - top);
            for (int j = 0; j < BK; j++) sum += s[m][j];
            den[m] = den[m] * correction + sum;
            mx[m] = top;
            if (correction != 1.0f)
                for (int i = 0; i < D; i++) o[m * D + i] *= correction;
        }
        for (int m = rows; m < MR; m++)
            for (int j = 0; j < BK; j++) s[m][j] = 0.0f;
        const int64_t keys = L - key0 < BK ? L - key0 : BK;
        for (int d0 = 0; d0 < D; d0 += DC) {
            v16 out[MR][4];
            for (int m = 0; m < MR; m++)
                for (int c = 0; c < 4; c++) out[m][c] = load16(o + m * D + d0 + 16 * c);
            for (int64_t j = 0; j < keys; j++) {
                const float *vr = vf + (key0 + j) * D + d0;
                const v16 v0 = load16(vr), v1 = load16(vr + 16), v2 = load16(vr + 32), v3 = load16(vr + 48);
                for (int m = 0; m < MR; m++) {
                    const float p = s[m][j];
                    out[m][0] += p * v0;
                    out[m][1] += p * v1;
                    out[m][2] += p * v2;
                    out[m][3] += p * v3;
                }
            }
            for (int m = 0; m < MR; m++)
                for (int c = 0; c < 4; c++) store16(o + m * D + d0 + 16 * c, out[m][c]);
        }
    }
    finish_rows(o, den, D, rows);
}

#ifdef __AVX512BF16__
/* attend_rows for bf16 caches on CPUs with AVX512-BF16: the products in pairs (vdpbf16ps), half the
 * instructions of the float32 path. q: MR rows of D/2 bf16 pairs, unscaled (the scale multiplies the
 * float32 scores). kp: the KV head's key panel, [blocks][D/2][BK][2]: one vector holds a pair of
 * dimensions of 16 keys. vp: its value panel, [L/2][D][2]: one vector holds 16 dimensions of a pair of
 * keys, padded with zeros to whole blocks. The weights are rounded to bf16 for the value products, as
 * the decode kernel and GPU flash kernels round them. */
static inline __attribute__((always_inline)) void attend_rows_bf16(
        const uint32_t *qp, const int64_t *limit, const uint16_t *kp, const uint16_t *vp, int64_t L, int D,
        float scale, float *o, int rows) {
    const int P = D / 2;
    float mx[MR], den[MR];
    uint32_t w[MR][BK / 2];
    const int64_t nblocks = start_rows(mx, den, o, D, limit, rows);
    const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80); /* bf16 1.0 */
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const uint16_t *kb = kp + blk * (int64_t)D * BK;
        __m512 acc[MR][2];
        for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
        for (int p = 0; p < P; p++) {
            const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kb + p * 2 * BK);
            const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kb + p * 2 * BK + 32);
            for (int m = 0; m < MR; m++) {
                const __m512bh qv = (__m512bh)_mm512_set1_epi32((int)qp[m * P + p]);
                acc[m][0] = _mm512_dpbf16_ps(acc[m][0], qv, k0);
                acc[m][1] = _mm512_dpbf16_ps(acc[m][1], qv, k1);
            }
        }
        const int64_t key0 = blk * BK;
        for (int m = 0; m < MR; m++) {
            if (m >= rows) {
                memset(w[m], 0, sizeof(w[m]));
                continue;
            }
            /* The online softmax in registers: keys past the row's position masked, the weights rounded
             * to bf16 pairs and the denominator summing the rounded ones (a dot product with ones). */
            const int64_t visible = limit[m] - key0 + 1;
            const __mmask16 m0 = visible >= 16 ? 0xFFFF : visible <= 0 ? 0 : (__mmask16)((1u << visible) - 1);
            const __mmask16 m1 = visible >= 32 ? 0xFFFF : visible <= 16 ? 0 : (__mmask16)((1u << (visible - 16)) - 1);
            const __m512 s0 = _mm512_mask_blend_ps(m0, ninf, _mm512_mul_ps(acc[m][0], vscale));
            const __m512 s1 = _mm512_mask_blend_ps(m1, ninf, _mm512_mul_ps(acc[m][1], vscale));
            const float top = fmaxf(mx[m], _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
            const __m512 vtop = _mm512_set1_ps(top);
            const __m512bh pairs = _mm512_cvtne2ps_pbh(_mm512_maskz_mov_ps(m1, exp16(_mm512_sub_ps(s1, vtop))),
                                                       _mm512_maskz_mov_ps(m0, exp16(_mm512_sub_ps(s0, vtop))));
            _mm512_storeu_si512(w[m], (__m512i)pairs);
            const float correction = fast_exp(mx[m] - top); /* ~0 on the first block (mx = -inf) */
            den[m] = den[m] * correction + _mm512_reduce_add_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), pairs, ones));
            mx[m] = top;
            if (correction != 1.0f)
                for (int i = 0; i < D; i++) o[m * D + i] *= correction;
        }
        const int64_t keys = L - key0 < BK ? L - key0 : BK;
        const int npairs = (int)(keys + 1) / 2;
        const uint16_t *vb = vp + key0 * D;
        for (int d0 = 0; d0 < D; d0 += DC) {
            __m512 out[MR][4];
            for (int m = 0; m < MR; m++)
                for (int c = 0; c < 4; c++) out[m][c] = _mm512_loadu_ps(o + m * D + d0 + 16 * c);
            for (int pr = 0; pr < npairs; pr++) {
                const uint16_t *vr = vb + ((int64_t)pr * D + d0) * 2;
                const __m512bh v0 = (__m512bh)_mm512_loadu_si512(vr), v1 = (__m512bh)_mm512_loadu_si512(vr + 32);
                const __m512bh v2 = (__m512bh)_mm512_loadu_si512(vr + 64), v3 = (__m512bh)_mm512_loadu_si512(vr + 96);
                for (int m = 0; m < MR; m++) {
                    const __m512bh wv = (__m512bh)_mm512_set1_epi32((int)w[m][pr]);
                    out[m][0] = _mm512_dpbf16_ps(out[m][0], wv, v0);
                    out[m][1] = _mm512_dpbf16_ps(out[m][1], wv, v1);
                    out[m][2] = _mm512_dpbf16_ps(out[m][2], wv, v2);
                    out[m][3] = _mm512_dpbf16_ps(out[m][3], wv, v3);
                }
            }
            for (int m = 0; m < MR; m++)
                for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + m * D + d0 + 16 * c, out[m][c]);
        }
    }
    finish_rows(o, den, D, rows);
}
#define HAVE_BF16_PATH 1
#else
#define HAVE_BF16_PATH 0
#endif

/*
 * q: [n, H, D] rows with stride q_stride (elements); out likewise with out_stride. k_cache and
 * v_cache: [KVH, S, D]; slots[j] is the slot of context position j, j < L = context_start + n (the
 * chunk's own keys already written). Query i sits at position context_start + i and attends
 * positions 0..context_start + i. Returns 0, -1 for a head_dim that is not a multiple of 64 or
 * above MAX_D, -2 when the panels cannot be allocated.
 */
int prefill_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out,
                      int64_t out_stride, const int64_t *slots, int64_t n, int64_t context_start, int num_heads,
                      int num_kv_heads, int D, int64_t num_slots, float scale, int is_bf16, int num_threads) {
#ifdef BATCHPILOT_AMX
    if (is_bf16 && D % 32 == 0 && D <= PA_MAX_D && scale > 0 && amx_granted())
        return prefill_amx(q, q_stride, k_cache, v_cache, out, out_stride, slots, n, context_start,
                           num_heads, num_kv_heads, D, num_slots, scale, num_threads);
#endif
    if (D % DC != 0 || D > MAX_D) return -1;
    const int64_t L = context_start + n, nblocks = (L + BK - 1) / BK, G = num_heads / num_kv_heads;
    const size_t esize = is_bf16 ? 2 : 4;
    const int pairs = is_bf16 && HAVE_BF16_PATH; /* bf16 panels and products */
    const size_t panel = (size_t)num_kv_heads * nblocks * D * BK; /* elements of each panel */
    /* float32 panels: keys [KVH][blocks][D][BK], values [KVH][L][D] (+64: whole-vector reads past the
     * end); bf16 panels: keys [KVH][blocks][D/2][BK][2], values [KVH][blocks * BK / 2][D][2]. */
    void *kt = aligned_alloc(64, panel * (pairs ? 2 : 4));
    void *vf = aligned_alloc(64, pairs ? panel * 2 : ((size_t)num_kv_heads * L * D + 64) * sizeof(float));
    if (kt == NULL || vf == NULL) {
        free(kt);
        free(vf);
        return -2;
    }
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads)
    for (int kh = 0; kh < num_kv_heads; kh++)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            for (int j = 0; j < BK; j++) {
                const int64_t pos = blk * BK + j;
                const int64_t offset = pos < L ? ((int64_t)kh * num_slots + slots[pos]) * D : 0;
                const char *krow = (const char *)k_cache + offset * esize;
                const char *vsrc = (const char *)v_cache + offset * esize;
                if (pairs) {
                    uint16_t *kpanel = (uint16_t *)kt + ((int64_t)kh * nblocks + blk) * D * BK;
                    uint16_t *vpanel = (uint16_t *)vf + ((int64_t)kh * nblocks * BK + blk * BK + (j & ~1)) * D;
                    const uint16_t *k16 = (const uint16_t *)krow, *v16 = (const uint16_t *)vsrc;
                    for (int d = 0; d < D; d++) {
                        kpanel[(d / 2 * BK + j) * 2 + d % 2] = pos < L ? k16[d] : 0;
                        vpanel[2 * d + (j & 1)] = pos < L ? v16[d] : 0;
                    }
                    continue;
                }
                float *kpanel = (float *)kt + ((int64_t)kh * nblocks + blk) * D * BK;
                if (pos >= L) {
                    for (int d = 0; d < D; d++) kpanel[d * BK + j] = 0.0f;
                    continue;
                }
                float *vrow = (float *)vf + ((int64_t)kh * L + pos) * D;
                for (int d = 0; d < D; d++) {
                    kpanel[d * BK + j] = get(krow, is_bf16, d);
                    vrow[d] = get(vsrc, is_bf16, d);
                }
            }
        }
    const int64_t tiles = (n + TQ - 1) / TQ;
    /* Tasks from the last positions (the most keys) down, so that the short ones fill the gaps. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t task = 0; task < tiles * num_kv_heads; task++) {
        const int64_t tile = tiles - 1 - task / num_kv_heads;
        const int kh = (int)(task % num_kv_heads);
        const int64_t i0 = tile * TQ, i1 = i0 + TQ < n ? i0 + TQ : n;
        const int64_t total = (i1 - i0) * G;
        float qf[MR * MAX_D], o[MR * MAX_D];
        uint32_t qp[MR * MAX_D / 2];
        int64_t limit[MR];
        for (int64_t r0 = 0; r0 < total; r0 += MR) {
            const int rows = (int)(total - r0 < MR ? total - r0 : MR);
            for (int m = 0; m < MR; m++) {
                if (m >= rows) {
                    memset(qf + m * D, 0, (size_t)D * sizeof(float));
                    memset(qp + m * D / 2, 0, (size_t)D * 2);
                    limit[m] = 0;
                    continue;
                }
                const int64_t i = i0 + (r0 + m) / G, h = kh * G + (r0 + m) % G;
                const char *qrow = (const char *)q + (i * q_stride + h * D) * esize;
                if (pairs)
                    memcpy(qp + m * D / 2, qrow, (size_t)D * 2);
                else
                    for (int d = 0; d < D; d++) qf[m * D + d] = get(qrow, is_bf16, d) * scale;
                limit[m] = context_start + i;
            }
#if HAVE_BF16_PATH
            if (pairs)
                attend_rows_bf16(qp, limit, (const uint16_t *)kt + (int64_t)kh * nblocks * D * BK,
                                 (const uint16_t *)vf + (int64_t)kh * nblocks * D * BK, L, D, scale, o, rows);
            else
#endif
                attend_rows(qf, limit, (const float *)kt + (int64_t)kh * nblocks * D * BK,
                            (const float *)vf + (int64_t)kh * L * D, L, D, o, rows);
            for (int m = 0; m < rows; m++) {
                const int64_t i = i0 + (r0 + m) / G, h = kh * G + (r0 + m) % G;
                char *orow = (char *)out + (i * out_stride + h * D) * esize;
                for (int d = 0; d < D; d++) put(orow, is_bf16, d, o[m * D + d]);
            }
        }
    }
    free(kt);
    free(vf);
    return 0;
}
