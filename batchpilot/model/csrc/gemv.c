/*
 * y = x W^T (+ b) in bf16 for the few rows of a decode step, reading the weights once at memory
 * speed. oneDNN's prepacked path costs ~70 us of call overhead at any size (its primitive set up
 * per call through torch's boxed dispatch) and reads a small weight at well under the bandwidth.
 *
 * The weight is laid out in tiles of 64 outputs, [N / 64][K / 2][64][2], so that a task streams
 * one contiguous tile, which tile_rows.h multiplies with every row (each vdpbf16ps a broadcast pair
 * (x[k], x[k+1]) of a row times the pairs of 16 outputs: no horizontal sums). Products accumulate
 * in float32 and are rounded to bf16 once, as F.linear does. Built where the CPU has AVX512-BF16,
 * or else AVX2 with FMA: there each 32-bit lane of a tile row holds one output's pair, split into
 * two floats by a shift and a mask and multiplied by the broadcast x[k] and x[k+1] (the same exact
 * products and float32 sums).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>

#include "dtype.h"
#endif
#include "kernels.h"
#include "team.h"
#ifdef __AVX512BF16__
#include "amx_rows.h"
#include "tile_rows.h"

#ifdef BATCHPILOT_AMX
static int amx_min_rows; /* steps of at least this many rows take the AMX tiles; 0: never */

/* Steps of at least `min_rows` rows (0: none) take the AMX tiles from now on, if Linux gives this process
 * the tile state. Returns whether it did. */
int gemv_amx_enable(int min_rows) {
    amx_min_rows = amx_granted() ? min_rows : 0;
    return amx_granted();
}

/* The fewest rows a step has to take the AMX tiles; 0: it never does. */
int gemv_amx_min_rows(void) { return amx_min_rows; }

#else
int gemv_amx_enable(int min_rows) {
    (void)min_rows;
    return 0;
}

int gemv_amx_min_rows(void) { return 0; }
#endif

/* Inputs [k2_begin, k2_end) (pairs) of one tile times the M rows of x, on the AMX tiles where amx (pad:
 * amx_begin's, rows of K) or the vector loop otherwise; next: the tile this thread takes after it (fetched
 * meanwhile on the AMX path), or NULL; cold: no earlier tile fetched this one (the AMX path fetches it too). */
static inline void tile_part_times_rows(int amx, int64_t M, const uint16_t *x, int64_t x_stride, const uint16_t *pad,
                                        int64_t K, const uint16_t *tile, int64_t k2_begin, int64_t k2_end,
                                        const uint16_t *bias, void *y, int64_t y_stride, int y_f32,
                                        const uint16_t *next, int cold) {
    x += 2 * k2_begin;
    tile += k2_begin * TILE_N * 2;
#ifdef BATCHPILOT_AMX
    if (amx) {
        amx_tile_times_rows(M, x, x_stride, pad != NULL ? pad + 2 * k2_begin : NULL, K, tile, k2_end - k2_begin, NULL,
                            bias, y, y_stride, y_f32, next, cold);
        return;
    }
#endif
    (void)amx, (void)pad, (void)K, (void)next, (void)cold;
    tile_times_rows(M, x, x_stride, tile, k2_end - k2_begin, NULL, bias, y, y_stride, y_f32);
}

/* Whether a team splits the middle tile by its inputs (see gemv_bf16_team): the same answer on every thread. */
static int gemv_halves(int64_t tiles, int64_t K2, int64_t M) {
    return omp_get_num_threads() == 2 && tiles % 2 == 1 && M <= GEMV_SPLIT_MAX_ROWS &&
           K2 % 32 == 0; /* each half a whole number of the AMX path's 16-pair chunks */
}

/* Thread 0's end of a split middle tile: its half's sums plus thread 1's (once posted: thread 0 fetches from
 * `next` while it waits, as in team_wait), plus bias, into y. */
static void finish_halves(GemvSplit *split, const uint16_t *bias, void *y, int64_t y_stride, int y_f32, int64_t M,
                          const void *next) {
    team_spin(&split->ready, 0, next, TEAM_PREFETCH_MAX);
    split->ready = 0; /* read again only after the team's barrier */
    for (int64_t m = 0; m < M; m++)
        for (int c = 0; c < TILE_N / 16; c++) {
            __m512 v = _mm512_add_ps(_mm512_loadu_ps(split->sums[0] + m * TILE_N + 16 * c),
                                     _mm512_loadu_ps(split->sums[1] + m * TILE_N + 16 * c));
            if (bias != NULL) v = _mm512_add_ps(v, bf16x16_load(bias + 16 * c));
            if (y_f32)
                _mm512_storeu_ps((float *)y + m * y_stride + 16 * c, v);
            else
                bf16x16_store((uint16_t *)y + m * y_stride + 16 * c, v);
        }
}

/* A claim word: the call (24 bits, mod 2^24), then the part's first and end tile not yet taken (20 bits each). */
#define CLAIM_TILES (1 << 20)
static inline uint64_t claim_pack(uint64_t call, int64_t front, int64_t back) {
    return ((call & 0xFFFFFF) << 40) | ((uint64_t)front << 20) | (uint64_t)back;
}
static inline int64_t claim_front(uint64_t w) { return (int64_t)((w >> 20) & (CLAIM_TILES - 1)); }
static inline int64_t claim_back(uint64_t w) { return (int64_t)(w & (CLAIM_TILES - 1)); }

/* Takes a tile of part `owner`'s claim for this call: its front one (the owner, in stream order) or its last
 * (another thread, done with its own part); -1 when none is left or the owner has not posted this call's. */
static inline int64_t claim_take(GemvClaim *claim, uint64_t call, int from_back) {
    uint64_t w = __atomic_load_n(&claim->word, __ATOMIC_ACQUIRE);
    for (;;) {
        const int64_t front = claim_front(w), back = claim_back(w);
        if ((w >> 40) != (call & 0xFFFFFF) || front >= back) return -1;
        const uint64_t taken = from_back ? claim_pack(call, front, back - 1) : claim_pack(call, front + 1, back);
        if (__atomic_compare_exchange_n(&claim->word, &w, taken, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return from_back ? back - 1 : front;
    }
}

/* w: [N / 64][K / 2][64][2] bf16 (kernels.pack_gemv_weight) in `parts` pieces (team.h's split of the tiles: laid out
 * per thread, each thread's tiles of a step in one stream); x: [M, K] bf16 with row stride x_stride; bias: [N] bf16 or
 * NULL; y: [M, N] with row stride y_stride, bf16, or float32 (the sums unrounded) when y_f32. Called by every thread of
 * a team; returns after the team's barrier, each thread fetching the start of its part of the next weight while it
 * waits (team_wait). team: what the threads share. A team of two threads over an odd number of tiles splits the middle
 * tile (the last of thread 0's part) by its inputs: each thread takes its half after its own tiles (in stream order:
 * the start of its part is what it fetched while it last waited), thread 1 posts its float32 sums and thread 0 adds
 * them. Otherwise one thread reads a whole tile more than the other, and a thread cannot read faster while the other
 * waits (on a Xeon each core streams at its own limit). Without the halves, the tiles are shared out at run time: each
 * thread takes its own part's from the front, in stream order, then the other parts' from their back, so that a thread
 * the memory serves faster at that moment does not wait for the other at the barrier (the two cores of a Zen 4 EPYC
 * finished the lm_head's even split 37-132 us apart). Each tile is computed whole by whichever thread takes it: the
 * same sums. */
void gemv_bf16_team(const uint16_t *x, int64_t x_stride, const uint16_t *const *w, int parts, const uint16_t *bias,
                    void *y, int64_t y_stride, int y_f32, int64_t M, int64_t K, int64_t N, TeamShared *team) {
    const int64_t tiles = N / TILE_N, K2 = K / 2, tile_elems = K2 * TILE_N * 2, mid = tiles / 2;
    GemvSplit *const split = &team->gemv;
    const size_t esize = y_f32 ? 4 : 2;
    const uint16_t *pad = NULL;
#ifdef BATCHPILOT_AMX
    /* every thread decides alike, but for a padding buffer that cannot be allocated, which changes only how
     * this thread computes its own tiles */
    const int amx = amx_begin(x, x_stride, M, K, amx_min_rows, &pad);
#else
    const int amx = 0;
#endif
    const int halves = gemv_halves(tiles, K2, M), thread = omp_get_thread_num(), threads = omp_get_num_threads();
    const int64_t first = team_start(tiles), last = halves && thread == 0 ? mid : team_end(tiles);
    const uint16_t *const next = own_stream_end(w, parts, tiles, tile_elems);
#define TILE(t) part_tile(w, parts, tiles, tile_elems, (t))
    if (!halves && threads > 1 && threads <= GEMV_MAX_TEAM && tiles < CLAIM_TILES) {
        GemvClaim *own = &split->claims[thread];
        const uint64_t call = (uint64_t)++own->calls;
        __atomic_store_n(&own->word, claim_pack(call, first, last), __ATOMIC_RELEASE);
        for (int64_t t; (t = claim_take(own, call, 0)) >= 0;)
            tile_part_times_rows(amx, M, x, x_stride, pad, K, TILE(t), 0, K2, bias != NULL ? bias + t * TILE_N : NULL,
                                 (char *)y + t * TILE_N * esize, y_stride, y_f32, t + 1 < last ? TILE(t + 1) : NULL,
                                 t == first);
        for (int v = 1; v < threads; v++)
            for (int64_t t; (t = claim_take(&split->claims[(thread + v) % threads], call, 1)) >= 0;)
                tile_part_times_rows(amx, M, x, x_stride, pad, K, TILE(t), 0, K2,
                                     bias != NULL ? bias + t * TILE_N : NULL, (char *)y + t * TILE_N * esize, y_stride,
                                     y_f32, NULL, 1);
        team_wait(&team->barrier, next, TEAM_PREFETCH_MAX);
        return;
    }
    for (int64_t t = first; t < last; t++)
        tile_part_times_rows(amx, M, x, x_stride, pad, K, TILE(t), 0, K2, bias != NULL ? bias + t * TILE_N : NULL,
                             (char *)y + t * TILE_N * esize, y_stride, y_f32,
                             t + 1 < last ? TILE(t + 1) : halves ? TILE(mid) : NULL, t == first);
    if (halves && thread == 1) {
        tile_part_times_rows(amx, M, x, x_stride, pad, K, TILE(mid), K2 / 2, K2, NULL, split->sums[1], TILE_N, 1,
                             NULL, first == last);
        __atomic_store_n(&split->ready, 1, __ATOMIC_RELEASE);
    }
    if (halves && thread == 0) {
        tile_part_times_rows(amx, M, x, x_stride, pad, K, TILE(mid), 0, K2 / 2, NULL, split->sums[0], TILE_N, 1,
                             NULL, first == last);
        finish_halves(split, bias != NULL ? bias + mid * TILE_N : NULL, (char *)y + mid * TILE_N * esize, y_stride,
                      y_f32, M, next);
    }
#undef TILE
    team_wait(&team->barrier, next, TEAM_PREFETCH_MAX);
}
#endif
#if !defined(__AVX512BF16__) && defined(__AVX2__) && defined(__FMA__)

#define TILE_N 64 /* outputs per tile: eight 8-lane float accumulators, one row at a time */

/* As above (same layout, arguments and result); a tile (K x 64 bf16, 72 KB at K = 576) stays in
 * L2 while each row of x passes over it. */
void gemv_bf16_team(const uint16_t *x, int64_t x_stride, const uint16_t *const *w, int parts, const uint16_t *bias,
                    void *y, int64_t y_stride, int y_f32, int64_t M, int64_t K, int64_t N, TeamShared *team) {
    /* whole tiles only: the split was built and measured for AVX512-BF16 hosts */
    const int64_t tiles = N / TILE_N, K2 = K / 2, tile_elems = K2 * TILE_N * 2;
    const __m256i high_half = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int64_t t = team_start(tiles); t < team_end(tiles); t++) {
        const uint16_t *wt = part_tile(w, parts, tiles, tile_elems, t);
        for (int64_t m = 0; m < M; m++) {
            const uint16_t *xm = x + m * x_stride;
            __m256 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_ps();
            for (int64_t k2 = 0; k2 < K2; k2++) {
                const uint16_t *wk = wt + k2 * TILE_N * 2;
                const __m256 x0 = _mm256_set1_ps(bf16_to_float(xm[2 * k2]));
                const __m256 x1 = _mm256_set1_ps(bf16_to_float(xm[2 * k2 + 1]));
                for (int j = 0; j < 8; j++) {
                    const __m256i pairs = _mm256_loadu_si256((const __m256i *)(wk + 16 * j));
                    const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
                    const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(pairs, high_half));
                    acc[j] = _mm256_fmadd_ps(even, x0, acc[j]);
                    acc[j] = _mm256_fmadd_ps(odd, x1, acc[j]);
                }
            }
            const int64_t at = m * y_stride + t * TILE_N;
            float sums[TILE_N];
            for (int j = 0; j < 8; j++) _mm256_storeu_ps(sums + 8 * j, acc[j]);
            for (int n = 0; n < TILE_N; n++) {
                const float v = bias != NULL ? sums[n] + bf16_to_float(bias[t * TILE_N + n]) : sums[n];
                if (y_f32)
                    ((float *)y)[at + n] = v;
                else
                    ((uint16_t *)y)[at + n] = float_to_bf16(v);
            }
        }
    }
    team_wait(&team->barrier, own_stream_end(w, parts, tiles, tile_elems), TEAM_PREFETCH_MAX);
}
#endif
#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))

/* gemv_bf16_team on a team of its own. Returns -1 for an N that is not a multiple of 64 or an odd K. */
int gemv_bf16(const uint16_t *x, int64_t x_stride, const uint16_t *const *w, int parts, const uint16_t *bias, void *y,
              int64_t y_stride, int y_f32, int64_t M, int64_t K, int64_t N, int num_threads) {
    if (N % TILE_N != 0 || K % 2 != 0) return -1;
    TeamShared team = {.barrier = {0}};
#pragma omp parallel num_threads(num_threads)
    gemv_bf16_team(x, x_stride, w, parts, bias, y, y_stride, y_f32, M, K, N, &team);
    return 0;
}
#endif
