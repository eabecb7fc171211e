/*
 * prefill_attention on the AMX tiles, for bf16 caches and a head_dim that is a multiple of 32. Torch's
 * flash attention reaches 100-250 GFLOP/s on a 2-core AMX Xeon at a prompt's shapes (9 query heads over
 * 3 KV heads, head_dim 64, 100-500 positions), where the tiles multiply at over a TFLOP/s; our vector
 * kernel (prefill_attention.c) is no faster there.
 *
 * Everything is computed transposed, so that a vector's 16 lanes are 16 query positions of one head:
 * the online softmax then takes its maxima and sums across the keys of a block lane by lane, with no
 * reduction across lanes, and the keys are the scores' rows, read as they lie.
 * - scores^T [32 keys][16 positions] = K [keys][D] x q^T, the keys' rows straight from a panel that
 *   gathers them from their slots, the queries' transposed in pairs once per task (the second operand's
 *   layout): two tiles of 16 keys;
 * - the weights, rounded to bf16 as the decode kernel rounds them, are paired key by key into the second
 *   operand's layout [16 key pairs][16 positions][2];
 * - out^T [16 dimensions][16 positions] += V^T [dimensions][32 keys] x weights, V^T from a panel laid out
 *   [block][D][32 keys], one tile per 16 dimensions; the float32 sums are kept in memory, scaled by each
 *   position's correction as its maximum moves.
 * Products of bf16 pairs are exact and summed in float32 (TDPBF16PS), as torch's kernel sums them.
 * Tile registers (amx_configure: all 16 rows of 64 bytes): 0 and 7 keys, 6 the queries, 4-5 scores;
 * 2 weights, 1 and 7 values, 3 and 0 out.
 */
#ifndef BATCHPILOT_PREFILL_AMX_H
#define BATCHPILOT_PREFILL_AMX_H

#include "amx_rows.h"

#ifdef BATCHPILOT_AMX
#include "fast_exp.h"

#define PA_KEYS 32 /* keys per block: two score tiles, one weight tile of 16 pairs */
#define PA_ROWS 16 /* query positions per task: the lanes of a vector */
#define PA_MAX_D 256

/* The 16 x 16 32-bit elements of r transposed in place: r[j] becomes the old lane j of every row. */
static inline __attribute__((always_inline)) void transpose16_epi32(__m512i *r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* per 128-bit lane: four rows of one column each */
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
}

/* The scores^T of key block blk into tile registers 4-5 (keys in 0 and 7, the queries in 6). */
static inline __attribute__((always_inline)) void prefill_amx_scores(const uint16_t *kb, int64_t blk, int D,
                                                                    const uint32_t *qt) {
    const uint16_t *k0 = kb + blk * PA_KEYS * D;
    _tile_zero(4);
    _tile_zero(5);
    for (int c = 0; c < D / 32; c++) {
        _tile_loadd(6, qt + c * 256, 64);
        _tile_loadd(0, k0 + 32 * c, D * 2);
        _tile_loadd(7, k0 + 16 * D + 32 * c, D * 2);
        _tile_dpbf16ps(4, 0, 6);
        _tile_dpbf16ps(5, 7, 6);
    }
}

/* One task: query positions [i0, i0 + rows) of head h against keys [0, their positions] of its KV head
 * (kb: [Lp][D] key rows, vb: [blocks][D][PA_KEYS] values transposed). The next block's scores are
 * multiplied while this block's softmax runs on the vector units. */
static inline void prefill_amx_task(const uint16_t *q, int64_t q_stride, uint16_t *out, int64_t out_stride,
                                    const uint16_t *kb, const uint16_t *vb, int64_t i0, int rows, int h,
                                    int64_t context_start, int D, float scale) {
    const int DT = D / 16;
    uint32_t qt[PA_MAX_D / 32 * 256] __attribute__((aligned(64))); /* q^T per 32 dimensions: [16 pairs][16 rows] */
    uint32_t pt[16 * 16] __attribute__((aligned(64)));              /* weights: [16 key pairs][16 rows] */
    float s[PA_KEYS * 16] __attribute__((aligned(64)));              /* scores^T: [32 keys][16 rows] */
    float o[PA_MAX_D * 16] __attribute__((aligned(64)));             /* out^T: [D][16 rows] */
    float t[2][16 * 16] __attribute__((aligned(64)));
    for (int c = 0; c < D / 32; c++) {
        __m512i r[16];
        for (int m = 0; m < 16; m++)
            r[m] = m < rows ? _mm512_loadu_si512(q + (i0 + m) * q_stride + (int64_t)h * D + 32 * c)
                            : _mm512_setzero_si512();
        transpose16_epi32(r);
        for (int k = 0; k < 16; k++) _mm512_store_si512(qt + c * 256 + 16 * k, r[k]);
    }
    memset(o, 0, (size_t)D * 16 * sizeof(float));
    /* each lane's position; lanes past the chunk repeat its last row's (their zero queries stay finite) */
    int32_t lane_pos[16];
    for (int m = 0; m < 16; m++) lane_pos[m] = (int32_t)(context_start + i0 + (m < rows ? m : rows - 1));
    const __m512i pos = _mm512_loadu_si512(lane_pos);
    const __m512 c16 = _mm512_set1_ps(scale * 1.44269504f), neg_inf = _mm512_set1_ps(-INFINITY);
    const __m512bh ones = (__m512bh)_mm512_set1_epi16((short)0x3F80);
    const __m512i pair_keys = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                               6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512 mx = neg_inf, den = _mm512_setzero_ps();
    const int64_t first = context_start + i0, blocks = (context_start + i0 + rows - 1) / PA_KEYS + 1;
    prefill_amx_scores(kb, 0, D, qt);
    _tile_stored(4, s, 64);
    _tile_stored(5, s + 16 * 16, 64);
    for (int64_t blk = 0; blk < blocks; blk++) {
        if (blk + 1 < blocks) prefill_amx_scores(kb, blk + 1, D, qt);
        /* keys no lane may see yet are masked; a block every lane sees whole needs no mask */
        const int whole = blk * PA_KEYS + PA_KEYS - 1 <= first;
        __m512 m = mx;
        if (whole)
            for (int j = 0; j < PA_KEYS; j++) m = _mm512_max_ps(m, _mm512_load_ps(s + 16 * j));
        else
            for (int j = 0; j < PA_KEYS; j++) {
                const __mmask16 seen = _mm512_cmpge_epi32_mask(pos, _mm512_set1_epi32((int)(blk * PA_KEYS + j)));
                const __m512 sj = _mm512_mask_blend_ps(seen, neg_inf, _mm512_load_ps(s + 16 * j));
                _mm512_store_ps(s + 16 * j, sj);
                m = _mm512_max_ps(m, sj);
            }
        /* weights 2^((s - m) scale log2(e)); the maxima are of the unscaled sums (scale > 0) */
        const __m512 mc = _mm512_mul_ps(m, c16);
        const __m512 corr = exp2_16(_mm512_fmsub_ps(mx, c16, mc));
        mx = m;
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < PA_KEYS; j += 2) {
            const __m512 s0 = _mm512_load_ps(s + 16 * j), s1 = _mm512_load_ps(s + 16 * (j + 1));
            __m512 p0 = exp2_16(_mm512_fmsub_ps(s0, c16, mc)), p1 = exp2_16(_mm512_fmsub_ps(s1, c16, mc));
            if (!whole) { /* masked keys weigh 0 */
                p0 = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s0, neg_inf, _CMP_EQ_OQ), p0, _mm512_setzero_ps());
                p1 = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s1, neg_inf, _CMP_EQ_OQ), p1, _mm512_setzero_ps());
            }
            /* the two keys' weights of each lane side by side, bf16; their sum by one vdpbf16ps with ones */
            const __m512i w = _mm512_permutexvar_epi16(pair_keys, (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
            _mm512_store_si512(pt + 8 * j, w);
            sum = _mm512_dpbf16_ps(sum, (__m512bh)w, ones);
        }
        den = _mm512_fmadd_ps(den, corr, sum);
        _tile_loadd(2, pt, 64);
        const uint16_t *v0 = vb + blk * D * PA_KEYS;
        for (int dt = 0; dt < DT; dt += 2) { /* two groups of 16 dimensions at a time, in tiles 1/3 and 0/7 */
            const int two = dt + 1 < DT;
            _tile_zero(3);
            _tile_loadd(1, v0 + 16 * dt * PA_KEYS, PA_KEYS * 2);
            if (two) {
                _tile_zero(0);
                _tile_loadd(7, v0 + 16 * (dt + 1) * PA_KEYS, PA_KEYS * 2);
            }
            _tile_dpbf16ps(3, 1, 2);
            if (two) _tile_dpbf16ps(0, 7, 2);
            _tile_stored(3, t[0], 64);
            if (two) _tile_stored(0, t[1], 64);
            for (int u = 0; u < 2 && dt + u < DT; u++) {
                float *od = o + 16 * (dt + u) * 16;
                for (int r = 0; r < 16; r++)
                    _mm512_store_ps(od + 16 * r, _mm512_fmadd_ps(_mm512_load_ps(od + 16 * r), corr,
                                                                  _mm512_load_ps(t[u] + 16 * r)));
            }
        }
        if (blk + 1 < blocks) {
            _tile_stored(4, s, 64);
            _tile_stored(5, s + 16 * 16, 64);
        }
    }
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), den);
    for (int dt = 0; dt < DT; dt++) {
        __m512i r[16];
        for (int d = 0; d < 16; d++)
            r[d] = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(o + (16 * dt + d) * 16), inv));
        transpose16_epi32(r);
        for (int m = 0; m < rows; m++)
            bf16x16_store(out + (i0 + m) * out_stride + (int64_t)h * D + 16 * dt, _mm512_castsi512_ps(r[m]));
    }
}

/* prefill_attention's AMX path; its arguments, the caches bf16. Returns 0, or -2 when the panels cannot
 * be allocated. */
static int prefill_amx(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache,
                                 const uint16_t *v_cache, uint16_t *out, int64_t out_stride, const int64_t *slots,
                                 int64_t n, int64_t context_start, int num_heads, int num_kv_heads, int D,
                                 int64_t num_slots, float scale, int num_threads) {
    const int64_t L = context_start + n, blocks = (L + PA_KEYS - 1) / PA_KEYS, Lp = blocks * PA_KEYS;
    const int G = num_heads / num_kv_heads;
    /* keys as rows [KVH][Lp][D]; values transposed per block, [KVH][blocks][D][PA_KEYS]; zeros past L */
    uint16_t *kp = aligned_alloc(64, (size_t)num_kv_heads * Lp * D * 2);
    uint16_t *vt = aligned_alloc(64, (size_t)num_kv_heads * Lp * D * 2);
    if (kp == NULL || vt == NULL) {
        free(kp);
        free(vt);
        return -2;
    }
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads)
    for (int kh = 0; kh < num_kv_heads; kh++)
        for (int64_t blk = 0; blk < blocks; blk++) {
            uint16_t *kr = kp + ((int64_t)kh * Lp + blk * PA_KEYS) * D;
            uint16_t *vr = vt + ((int64_t)kh * blocks + blk) * D * PA_KEYS;
            for (int j = 0; j < PA_KEYS; j++) {
                const int64_t p = blk * PA_KEYS + j;
                if (p >= L) {
                    memset(kr + j * D, 0, (size_t)D * 2);
                    for (int d = 0; d < D; d++) vr[d * PA_KEYS + j] = 0;
                    continue;
                }
                const int64_t offset = ((int64_t)kh * num_slots + slots[p]) * D;
                memcpy(kr + j * D, k_cache + offset, (size_t)D * 2);
                for (int d = 0; d < D; d++) vr[d * PA_KEYS + j] = v_cache[offset + d];
            }
        }
    const int64_t tiles = (n + PA_ROWS - 1) / PA_ROWS;
#pragma omp parallel num_threads(num_threads)
    {
        amx_configure();
        /* tasks from the last positions (the most keys) down, so that the short ones fill the gaps */
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tiles * num_heads; task++) {
            const int64_t tile = tiles - 1 - task / num_heads;
            const int h = (int)(task % num_heads), kh = h / G;
            const int64_t i0 = tile * PA_ROWS;
            const int rows = (int)(n - i0 < PA_ROWS ? n - i0 : PA_ROWS);
            prefill_amx_task(q, q_stride, out, out_stride, kp + (int64_t)kh * Lp * D,
                             vt + (int64_t)kh * blocks * D * PA_KEYS, i0, rows, h, context_start, D, scale);
        }
    }
    free(kp);
    free(vt);
    return 0;
}

#endif
#endif
