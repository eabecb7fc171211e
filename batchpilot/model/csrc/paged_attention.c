/*
 * Paged decode attention for the CPU: one query token per sequence, keys and values read
 * straight from the cache blocks (no gather copy), online softmax in float32.
 *
 * Layout (see batchpilot/model/attention.py): q and out are [B, H, D]; k_cache and v_cache
 * are [KVH, S, D] with S = num_blocks * block_size; block_tables is [B, W]; context_lens is
 * [B]. The G = H / KVH query heads of a KV head are processed together, so each K/V row is
 * read from memory once per sequence. Blocks lie anywhere in the cache, where the hardware
 * prefetcher does not follow: each thread fetches the rows of the task it computes next while it
 * computes one (a slice per block), and blocks of its own task ahead of the ones it reads.
 * Parallel over (sequence, KV head) tasks with OpenMP; the process shares torch's libgomp (same
 * soname), so there is one thread pool.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dtype.h"
#include "fast_exp.h"
#include "kernels.h"
#include "team.h"
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

#define MAX_G 16
#define MAX_D 256
#define MAX_BS 128
#define CHUNK_TILES 8 /* tiles of 16 keys per softmax update in attend_bf16 */
/* bytes of K/V rows paged_decode_attention_fetch_team fetches at most per thread (the cache's rows of the first
 * tasks, where the step's other fetches do not evict them first) */
#define ATTENTION_FETCH_MAX (128 * 1024)
/* bytes of its next weight a thread fetches while it waits at the attention's end: at batch 1 of the default model
 * (3 KV heads on 2 threads) one thread waits ~5 us a layer there; 256 KB, about its part of the O projection, read
 * 0.6% faster than the projections' 64 KB (docs/reproduction.md) */
#define ATTENTION_WAIT_FETCH (256 * 1024)

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

/* Blocks lie anywhere in the cache, where the hardware prefetcher does not follow: fetch the rows of
 * the sequence's block after the one starting at `start` (if any) while this one is computed. */
static inline __attribute__((always_inline)) void prefetch_next_block(
        const void *k_cache, const void *v_cache, size_t esize, const int64_t *table, int64_t start, int64_t len,
        int BS, int kh, int64_t num_slots, int D) {
    if (start + BS >= len) return;
    const int64_t next = ((int64_t)kh * num_slots + table[start / BS + 1] * BS) * D;
    const char *kn = (const char *)k_cache + next * esize, *vn = (const char *)v_cache + next * esize;
    for (int64_t off = 0; off < (int64_t)BS * D * (int64_t)esize; off += 64) {
        __builtin_prefetch(kn + off, 0, 3);
        __builtin_prefetch(vn + off, 0, 3);
    }
}

/* The rows of the task a thread computes next, fetched into L2 a slice at a time while it computes the
 * current one: one block of lookahead inside a task left each task's first blocks and the reads of a
 * single stream waiting on memory (measured in docs/reproduction.md). */
typedef struct {
    const int64_t *table;  /* the next task's block ids */
    int64_t head_base;     /* its KV head's first slot */
    int64_t lines;         /* 64-byte lines of its K rows (and as many of V) to fetch */
    int64_t fetched;
    int64_t lines_per_block, this_blocks;
    int BS, D;
} Lookahead;

static inline __attribute__((always_inline)) Lookahead lookahead_start(
        int64_t next_task, int64_t this_len, const int64_t *block_tables, const int64_t *context_lens,
        int num_kv_heads, int table_width, int BS, int64_t num_slots, int D, size_t esize) {
    Lookahead la = {0};
    la.BS = BS;
    la.D = D;
    la.this_blocks = (this_len + BS - 1) / BS;
    la.lines_per_block = (int64_t)BS * D * (int64_t)esize / 64;
    if (la.lines_per_block == 0) la.lines_per_block = 1; /* blocks under a line: one line each */
    if (next_task < 0) return la;
    const int64_t b = next_task / num_kv_heads;
    la.table = block_tables + b * table_width;
    la.head_base = (next_task % num_kv_heads) * num_slots;
    la.lines = (context_lens[b] * D * (int64_t)esize + 63) / 64;
    return la;
}

/* Called before computing block `block` of the current task: fetches the next task's share for it. */
static inline __attribute__((always_inline)) void lookahead_fetch(Lookahead *la, const void *k_cache,
                                                                  const void *v_cache, size_t esize, int64_t block) {
    const int64_t upto = la->lines * (block + 1) / la->this_blocks;
    while (la->fetched < upto) {
        /* the rest of the current block, or as much of it as this share asks (no division per line) */
        const int64_t blk = la->fetched / la->lines_per_block, line = la->fetched - blk * la->lines_per_block;
        const int64_t n = upto - la->fetched < la->lines_per_block - line ? upto - la->fetched
                                                                           : la->lines_per_block - line;
        const char *k = (const char *)k_cache + (la->head_base + la->table[blk] * la->BS) * la->D * (int64_t)esize;
        const char *v = (const char *)v_cache + (k - (const char *)k_cache);
        for (int64_t i = line; i < line + n; i++) {
            __builtin_prefetch(k + i * 64, 0, 2);
            __builtin_prefetch(v + i * 64, 0, 2);
        }
        la->fetched += n;
    }
}

/* Runs BODY for every (sequence b, KV head kh) task, with `next` the task this thread computes after it
 * (-1 if none): tasks are handed out one at a time from a shared counter, a thread claiming its next
 * task as it starts one. */
#define FOR_EACH_TASK(num_seqs, num_kv_heads, num_threads, BODY)                                  \
    do {                                                                                         \
        const int64_t tasks_ = (int64_t)(num_seqs) * (num_kv_heads);                             \
        int64_t counter_ = 0;                                                                    \
        _Pragma("omp parallel num_threads(num_threads)") {                                       \
            int64_t task_ = __atomic_fetch_add(&counter_, 1, __ATOMIC_RELAXED);                  \
            while (task_ < tasks_) {                                                             \
                const int64_t claimed_ = __atomic_fetch_add(&counter_, 1, __ATOMIC_RELAXED);     \
                const int64_t next = claimed_ < tasks_ ? claimed_ : -1;                          \
                const int b = (int)(task_ / (num_kv_heads)), kh = (int)(task_ % (num_kv_heads)); \
                BODY;                                                                            \
                task_ = claimed_;                                                                \
            }                                                                                    \
        }                                                                                        \
    } while (0)

/* One (sequence, KV head) task; inlined with a constant dtype (see paged_decode_attention). */
static inline __attribute__((always_inline)) void attend(
        int b, int kh, const void *q, const void *k_cache, const void *v_cache, void *out,
        const int64_t *block_tables, const int64_t *context_lens, int num_heads, int num_kv_heads, int D,
        int table_width, int BS, int64_t num_slots, float scale, const int is_bf16, int64_t next_task) {
    const int G = num_heads / num_kv_heads;
    Lookahead la = lookahead_start(next_task, context_lens[b], block_tables, context_lens, num_kv_heads, table_width,
                                   BS, num_slots, D, is_bf16 ? 2 : 4);
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
        prefetch_next_block(k_cache, v_cache, is_bf16 ? 2 : 4, block_tables + (int64_t)b * table_width, start, len,
                            BS, kh, num_slots, D);
        lookahead_fetch(&la, k_cache, v_cache, is_bf16 ? 2 : 4, start / BS);
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

#ifdef __AVX512BF16__
/* Lane i of the result = the sum of the 16 lanes of v[i]: four levels of pairwise shuffles and
 * adds (45 instructions for 16 sums, against ~8 for each horizontal sum on its own). */
static inline __attribute__((always_inline)) __m512 transpose_sum16(const __m512 *v) {
    __m512 w[8], z[4], r[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane l: the lane-l sums of v[4i..4i+3] */
        z[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++)
        r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* attend() for bf16 caches on CPUs with AVX512-BF16, 16 keys at a time: scores as vdpbf16ps
 * partial sums reduced by one transpose_sum16, the softmax on whole vectors, and the weighted values
 * as vdpbf16ps of the probabilities (rounded to bf16, as torch's decode path and GPU flash kernels
 * round them; the denominator sums the rounded ones) with pairs of value rows interleaved once per
 * tile for all G heads. The interleave leaves each 32-dimension chunk's sums in the order
 * unpacklo/hi give (per 128-bit lane: 4 dimensions from the low half, then 4 from the high); one
 * permute per chunk restores it at the end. DC (32-dimension chunks per row) is a literal at each
 * call so that a head's sums stay in registers.
 * Tiles go CHUNK_TILES at a time: the scores of the whole chunk first, then one running-max update,
 * correction and denominator per head, then the values. The softmax's serial chain (reductions, the
 * exponentials) was most of the kernel's time when paid per 16 keys; and the chunk's value products
 * give the blocks of the next chunk time to arrive (docs/reproduction.md). */
static inline __attribute__((always_inline)) void attend_bf16(
        int b, int kh, const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, uint16_t *out,
        const int64_t *block_tables, const int64_t *context_lens, int num_heads, int num_kv_heads, int table_width,
        int BS, int64_t num_slots, float scale, const int DC, int64_t next_task) {
    const int G = num_heads / num_kv_heads, D = 32 * DC;
    Lookahead la = lookahead_start(next_task, context_lens[b], block_tables, context_lens, num_kv_heads, table_width,
                                   BS, num_slots, D, 2);
    __m512 acc[MAX_G][2 * DC];
    __m512bh qv[MAX_G][DC];
    __m512bh vp[8][2 * DC];
    float mx[MAX_G], den[MAX_G];
    const int64_t len = context_lens[b];
    const int64_t head0 = (int64_t)b * num_heads + (int64_t)kh * G;
    const int64_t *table = block_tables + (int64_t)b * table_width;
    for (int g = 0; g < G; g++) {
        for (int c = 0; c < DC; c++) qv[g][c] = (__m512bh)_mm512_loadu_si512(q + (head0 + g) * D + 32 * c);
        for (int c = 0; c < 2 * DC; c++) acc[g][c] = _mm512_setzero_ps();
        mx[g] = -INFINITY;
        den[g] = 0.0f;
    }
    const int64_t tiles = (len + 15) / 16;
    for (int64_t tile0 = 0; tile0 < tiles; tile0 += CHUNK_TILES) {
        /* Up to CHUNK_TILES tiles of 16 keys share one running-max update, one correction and one sum:
         * the softmax's serial chain (reductions, exp) is paid per chunk, not per 16 keys. */
        const int nt = tiles - tile0 < CHUNK_TILES ? (int)(tiles - tile0) : CHUNK_TILES;
        const uint16_t *kt[CHUNK_TILES], *vt[CHUNK_TILES];
        for (int i = 0; i < nt; i++) {
            const int64_t start = (tile0 + i) * 16;
            const int64_t base = ((int64_t)kh * num_slots + table[start / BS] * BS + start % BS) * D;
            kt[i] = k_cache + base;
            vt[i] = v_cache + base;
        }
        /* All 16 rows of a tile lie inside its block (BS % 16 == 0); lanes past the context (last tile
         * only) are masked after the sums, which never mix lanes, and their value rows are never read. */
        const int keys_last = len - (tile0 + nt - 1) * 16 < 16 ? (int)(len - (tile0 + nt - 1) * 16) : 16;
        const __mmask16 live_last = (__mmask16)(keys_last >= 16 ? 0xFFFFu : (1u << keys_last) - 1);
        __m512i pz[MAX_G][CHUNK_TILES];
        float correction[MAX_G];
        for (int g = 0; g < G; g++) {
            __m512 s[CHUNK_TILES];
            __m512 m = _mm512_set1_ps(-INFINITY);
            for (int i = 0; i < nt; i++) {
                __m512 part[16];
                for (int t = 0; t < 16; t++) {
                    __m512 a = _mm512_setzero_ps();
                    for (int c = 0; c < DC; c++)
                        a = _mm512_dpbf16_ps(a, qv[g][c], (__m512bh)_mm512_loadu_si512(kt[i] + t * D + 32 * c));
                    part[t] = a;
                }
                s[i] = _mm512_mul_ps(transpose_sum16(part), _mm512_set1_ps(scale));
                if (i == nt - 1) s[i] = _mm512_mask_blend_ps(live_last, _mm512_set1_ps(-INFINITY), s[i]);
                m = _mm512_max_ps(m, s[i]);
            }
            const float top = fmaxf(mx[g], _mm512_reduce_max_ps(m));
            correction[g] = fast_exp(mx[g] - top); /* exp(-inf) ~ 0 on the first chunk */
            __m512 sum = _mm512_setzero_ps();
            for (int i = 0; i < nt; i++) {
                /* masked lanes: exp(-inf) clamps to ~1e-38 and is left out of the denominator */
                const __m256bh p16 = _mm512_cvtneps_pbh(exp16(_mm512_sub_ps(s[i], _mm512_set1_ps(top))));
                const __m512 pr = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)p16), 16));
                sum = _mm512_add_ps(sum, i == nt - 1 ? _mm512_maskz_mov_ps(live_last, pr) : pr);
                pz[g][i] = _mm512_castsi256_si512((__m256i)p16);
            }
            den[g] = den[g] * correction[g] + _mm512_reduce_add_ps(sum);
            mx[g] = top;
        }
        for (int g = 0; g < G; g++) {
            const __m512 corr = _mm512_set1_ps(correction[g]);
            for (int j = 0; j < 2 * DC; j++) acc[g][j] = _mm512_mul_ps(acc[g][j], corr);
        }
        for (int i = 0; i < nt; i++) {
            /* fetch ahead while the values are weighed: the block of the next chunk's tile i, and the
             * next task's share for this block */
            const int64_t start = (tile0 + i) * 16, ahead = start + CHUNK_TILES * 16;
            if (ahead % BS == 0) prefetch_next_block(k_cache, v_cache, 2, table, ahead - BS, len, BS, kh, num_slots, D);
            if (start % BS == 0) lookahead_fetch(&la, k_cache, v_cache, 2, start / BS);
            const int keys = i == nt - 1 ? keys_last : 16;
            const int npairs = (keys + 1) / 2;
            if (G == 3 && DC == 2) {
                /* The default model's shape (3 heads a group, head_dim 64): every head's sums live at once, 12
                 * independent chains of vdpbf16ps per pair of value rows, where one head at a time left 4
                 * chains waiting on the instruction's latency (the kernel 6% faster; a version for every G
                 * through a literal-count macro was slower than the loop below: docs/reproduction.md). */
                __m512 a0[4], a1[4], a2[4];
                for (int j = 0; j < 4; j++) a0[j] = acc[0][j], a1[j] = acc[1][j], a2[j] = acc[2][j];
                for (int pr = 0; pr < npairs; pr++) {
                    __m512bh v[4];
                    for (int c = 0; c < 2; c++) {
                        const __m512i v0 = _mm512_loadu_si512(vt[i] + 2 * pr * D + 32 * c);
                        const __m512i v1 = 2 * pr + 1 < keys ? _mm512_loadu_si512(vt[i] + (2 * pr + 1) * D + 32 * c)
                                                             : _mm512_setzero_si512();
                        v[2 * c] = (__m512bh)_mm512_unpacklo_epi16(v0, v1);
                        v[2 * c + 1] = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
                    }
                    const __m512i at = _mm512_set1_epi32(pr);
                    const __m512bh w0 = (__m512bh)_mm512_permutexvar_epi32(at, pz[0][i]);
                    const __m512bh w1 = (__m512bh)_mm512_permutexvar_epi32(at, pz[1][i]);
                    const __m512bh w2 = (__m512bh)_mm512_permutexvar_epi32(at, pz[2][i]);
                    for (int j = 0; j < 4; j++) {
                        a0[j] = _mm512_dpbf16_ps(a0[j], v[j], w0);
                        a1[j] = _mm512_dpbf16_ps(a1[j], v[j], w1);
                        a2[j] = _mm512_dpbf16_ps(a2[j], v[j], w2);
                    }
                }
                for (int j = 0; j < 4; j++) acc[0][j] = a0[j], acc[1][j] = a1[j], acc[2][j] = a2[j];
                continue;
            }
            for (int pr = 0; pr < npairs; pr++)
                for (int c = 0; c < DC; c++) {
                    const __m512i v0 = _mm512_loadu_si512(vt[i] + 2 * pr * D + 32 * c);
                    const __m512i v1 = 2 * pr + 1 < keys ? _mm512_loadu_si512(vt[i] + (2 * pr + 1) * D + 32 * c)
                                                         : _mm512_setzero_si512();
                    vp[pr][2 * c] = (__m512bh)_mm512_unpacklo_epi16(v0, v1);
                    vp[pr][2 * c + 1] = (__m512bh)_mm512_unpackhi_epi16(v0, v1);
                }
            for (int g = 0; g < G; g++) {
                __m512 a[2 * DC];
                for (int j = 0; j < 2 * DC; j++) a[j] = acc[g][j];
                for (int pr = 0; pr < npairs; pr++) {
                    const __m512bh w = (__m512bh)_mm512_permutexvar_epi32(_mm512_set1_epi32(pr), pz[g][i]);
                    for (int j = 0; j < 2 * DC; j++) a[j] = _mm512_dpbf16_ps(a[j], vp[pr][j], w);
                }
                for (int j = 0; j < 2 * DC; j++) acc[g][j] = a[j];
            }
        }
    }
    const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    for (int g = 0; g < G; g++) {
        const __m512 inv = _mm512_set1_ps(1.0f / den[g]);
        uint16_t *o = out + (head0 + g) * D;
        for (int c = 0; c < DC; c++) {
            const __m512 lo = acc[g][2 * c], hi = acc[g][2 * c + 1];
            const __m512 low16 = _mm512_mul_ps(_mm512_permutex2var_ps(lo, first, hi), inv);
            const __m512 high16 = _mm512_mul_ps(_mm512_permutex2var_ps(lo, second, hi), inv);
            _mm256_storeu_si256((__m256i *)(o + 32 * c), (__m256i)_mm512_cvtneps_pbh(low16));
            _mm256_storeu_si256((__m256i *)(o + 32 * c + 16), (__m256i)_mm512_cvtneps_pbh(high16));
        }
    }
}
#endif

int paged_decode_attention_ok(int num_heads, int num_kv_heads, int head_dim, int block_size) {
    return num_heads / num_kv_heads <= MAX_G && head_dim <= MAX_D && block_size <= MAX_BS;
}

/* Returns 0, or -1 when a dimension exceeds the fixed per-thread buffers. */
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, void *out,
                           const int64_t *block_tables, const int64_t *context_lens, int num_seqs,
                           int num_heads, int num_kv_heads, int head_dim, int table_width,
                           int block_size, int64_t num_slots, float scale, int is_bf16, int num_threads) {
    if (!paged_decode_attention_ok(num_heads, num_kv_heads, head_dim, block_size)) return -1;
    /* One parallel loop per dtype with the dtype a literal: a dtype test left inside the parallel
     * region is not folded (OpenMP outlines the region before inlining) and costs vectorisation. */
#define ATTEND(BF16) attend(b, kh, q, k_cache, v_cache, out, block_tables, context_lens, num_heads, num_kv_heads, \
                            head_dim, table_width, block_size, num_slots, scale, BF16, next)
#ifdef __AVX512BF16__
    if (is_bf16 && (head_dim == 64 || head_dim == 128) && block_size % 16 == 0) {
#define ATTEND_BF16(DC) attend_bf16(b, kh, q, k_cache, v_cache, out, block_tables, context_lens, num_heads, \
                                    num_kv_heads, table_width, block_size, num_slots, scale, DC, next)
        /* two inlined copies, each with its head_dim a literal; the branch between them is per task */
        FOR_EACH_TASK(num_seqs, num_kv_heads, num_threads, if (head_dim == 64) ATTEND_BF16(2); else ATTEND_BF16(4));
        return 0;
    }
#endif
    if (is_bf16)
        FOR_EACH_TASK(num_seqs, num_kv_heads, num_threads, ATTEND(1));
    else
        FOR_EACH_TASK(num_seqs, num_kv_heads, num_threads, ATTEND(0));
    return 0;
}

/* paged_decode_attention for bf16 caches, on the calling team (team.h), each thread its share of the
 * (sequence, KV head) tasks in order, split as team.h splits (at batch 1 a step's attention is a few
 * microseconds a task: a shared counter's claims cost more than they balance); each task first does its head's
 * share of `prep` (rope_kv_head). The shape checked by the caller (paged_decode_attention_ok). Returns after the
 * team's barrier; next_weights: where this thread reads next (its part of the next weight, or NULL), fetched while
 * it waits. */
void paged_decode_attention_team(uint16_t *q, uint16_t *k_cache, uint16_t *v_cache, uint16_t *out,
                                 const int64_t *block_tables, const int64_t *context_lens, int num_seqs,
                                 int num_heads, int num_kv_heads, int head_dim, int table_width, int block_size,
                                 int64_t num_slots, float scale, const HeadPrep *prep, TeamShared *team,
                                 const void *next_weights) {
    const int64_t tasks = (int64_t)num_seqs * num_kv_heads, last = team_end(tasks);
    for (int64_t task = team_start(tasks); task < last; task++) {
        const int64_t next = task + 1 < last ? task + 1 : -1;
        const int b = (int)(task / num_kv_heads), kh = (int)(task % num_kv_heads);
        const int64_t at = prep->positions[b] * (head_dim / 2); /* only this task reads these queries, key, value */
        rope_kv_head(prep->qkv + b * prep->row_stride, q + (int64_t)b * num_heads * head_dim, prep->cos_table + at,
                     prep->sin_table + at, prep->slots[b], kh, num_heads, num_kv_heads, head_dim, k_cache, v_cache,
                     num_slots);
#ifdef __AVX512BF16__
        if ((head_dim == 64 || head_dim == 128) && block_size % 16 == 0) {
            if (head_dim == 64) ATTEND_BF16(2); else ATTEND_BF16(4);
        } else
#endif
            ATTEND(1);
    }
    team_wait(&team->barrier, next_weights, ATTENTION_WAIT_FETCH);
}

/* Fetches into L2 the first ATTENTION_FETCH_MAX bytes of K and V rows of this thread's share of the (sequence, KV
 * head) tasks that paged_decode_attention_team will give it (bf16 caches, its split): decode_layers calls it before
 * the QKV projection, so that the rows, which lie in blocks anywhere in the cache where the hardware prefetcher does
 * not follow, arrive while the projection streams its weights. The attention's own lookahead fetches the rest. */
void paged_decode_attention_fetch_team(const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *block_tables,
                                       const int64_t *context_lens, int num_seqs, int num_kv_heads, int head_dim,
                                       int table_width, int block_size, int64_t num_slots) {
    const int64_t tasks = (int64_t)num_seqs * num_kv_heads, last = team_end(tasks);
    int64_t budget = ATTENTION_FETCH_MAX;
    for (int64_t task = team_start(tasks); task < last && budget > 0; task++) {
        const int b = (int)(task / num_kv_heads), kh = (int)(task % num_kv_heads);
        const int64_t len = context_lens[b], *table = block_tables + (int64_t)b * table_width;
        for (int64_t start = 0; start < len && budget > 0; start += block_size) {
            const int64_t base = ((int64_t)kh * num_slots + table[start / block_size] * block_size) * head_dim;
            const int64_t bytes = (len - start < block_size ? len - start : block_size) * head_dim * 2;
            for (int64_t at = 0; at < bytes; at += 64) {
                __builtin_prefetch((const char *)(k_cache + base) + at, 0, 2);
                __builtin_prefetch((const char *)(v_cache + base) + at, 0, 2);
            }
            budget -= 2 * bytes;
        }
    }
}
