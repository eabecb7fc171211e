/*
 * y = x W^T (+ b) for int8 or int4 weights, in bf16, for steps of up to a few hundred rows. torch's
 * weight-only kernels are 2-3x slower than the bf16 matmul from 16 rows on a Zen 4 EPYC, and
 * dequantizing the whole weight every step costs more than the matmul at 32 rows (quant.py); here
 * each task expands one tile of 64 outputs into bf16 in a buffer that stays in L2, then multiplies
 * every row by it as gemv.c does (vdpbf16ps of broadcast pairs of x), so memory carries only the
 * quantized bytes and the expansion is paid once per tile whatever the number of rows.
 *
 * int4 at up to FUSED_MAX_M rows runs as llama.cpp's Q4 x Q8 dot products do: each row's inputs are
 * rounded to int8 per group (a float scale, amax / 127, per group of the weight's), and the 4-bit
 * integers multiply them on the integer dot-product unit (vpdpbusd: 64 byte products a vector,
 * summed in fours), each group's sum scaled once. Expanding nibbles to bf16 took a shuffle per 16
 * weights on the one port that runs them; this takes none, and the step reads the weights at memory
 * speed (docs/reproduction.md). quant.Int4Weight.activations gives the rows as the kernel rounds them.
 * int8 at up to FUSED_MAX_M rows likewise multiplies integers: the weights widened to int16 pairs, each
 * row's groups (the weight's, or ROW_GROUP inputs for scales per output) as int16 with a power-of-two scale
 * (exact for every input within 2^7 of its group's largest), on vpdpwssd. quant.Int8Weight.activations
 * gives those rows.
 *
 * Layouts (quant.py packs them), tiles of 64 outputs along N:
 *   int8: q [N / 64][K / 2][64][2] int8, one float32 scale per output [N] (group 0). The tile holds q
 *         exactly (|q| <= 127 is exact in bf16); the sums are scaled at the end: y = s * sum(x q).
 *         With a group G > 0, a float16 scale per group of G inputs instead, [N / 64][K / G][64] (GGUF's
 *         Q8_0 blocks as they are); the tile holds q * scale rounded to bf16.
 *   int4: q [N / 64][K / 8][64] 32-bit words, one per output and eight inputs: byte i holds input i in
 *         its low nibble and input 4 + i in its high one (a mask and a shift give the two sets of four
 *         bytes vpdpbusd multiplies); scale and
 *         low per group of G inputs, [N / 64][K / G][64] float16 each (value = q * scale + low: a
 *         GGUF Q4_0 / Q4_1 block's own f16 numbers; float32 would add a third to the weight's bytes),
 *         lows NULL for symmetric blocks (Q4_0: low = -8 * scale);
 *         the tile holds (q - 8) * scale + zero, zero = low + 8 * scale, rounded to bf16, the value
 *         quant.Int4Weight.dequantize gives.
 * Built where the CPU has AVX512-BF16 and VNNI (BATCHPILOT_QGEMV); elsewhere quant.py uses torch's kernels.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "team.h"
#ifdef BATCHPILOT_QGEMV
#include <immintrin.h>
#include <math.h>

#include "amx_rows.h"
#include "tile_rows.h"

#define FUSED_MAX_M 8 /* up to this many rows, no buffer: integer products (int8 / int4), FUSED_PASS rows a pass */
#define FUSED_PASS 4
#define ROW_GROUP 32  /* inputs per int16 scale of a row for int8 weights with scales per output */

/* Each thread's tile buffer, kept between calls: a fresh allocation per call is a fresh mapping at
 * these sizes (above malloc's mmap threshold), whose page faults cost more than the matmul at one row. */
static __thread uint32_t *tile_buffer = NULL;
static __thread size_t tile_buffer_size = 0;

static uint32_t *thread_buffer(size_t bytes) {
    if (bytes > tile_buffer_size) {
        free(tile_buffer);
        tile_buffer = aligned_alloc(64, (bytes + 63) / 64 * 64);
        tile_buffer_size = tile_buffer == NULL ? 0 : bytes;
    }
    return tile_buffer;
}

/* 16 int8 values as float32 */
static inline __attribute__((always_inline)) __m512 int8x16_to_float(const int8_t *src) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)src)));
}

/* One k-pair of a tile (64 outputs x 2 inputs) as four vectors of bf16 pairs, 16 outputs each. */
static inline __attribute__((always_inline)) void expand_int8(const int8_t *src, __m512bh *w) {
    for (int c = 0; c < 4; c++) { /* 16 outputs x 2 inputs = 32 bytes -> 32 bf16 in pair order */
        const __m512 lo = int8x16_to_float(src + 32 * c), hi = int8x16_to_float(src + 32 * c + 16);
        w[c] = _mm512_cvtne2ps_pbh(hi, lo);
    }
}

/* 16 float16 as float32 */
static inline __attribute__((always_inline)) __m512 load_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* A group's scale and zero (= low + 8 * scale, in float32; 0 for symmetric blocks, l NULL) for the 16
 * outputs at element i of the scales (and lows) */
static inline __attribute__((always_inline)) void scale_zero(const uint16_t *s, const uint16_t *l, int64_t i,
                                                             __m512 *sc, __m512 *zc) {
    *sc = load_f16(s + i);
    *zc = l == NULL ? _mm512_setzero_ps() : _mm512_fmadd_ps(_mm512_set1_ps(8.0f), *sc, load_f16(l + i));
}

/* expand_int8 with a float16 scale per output for the group (16 outputs at element sg + 16 c of the
 * scales): lanes hold output i's two inputs at 2i and 2i + 1, so each half takes 8 scales twice. */
static inline __attribute__((always_inline)) void expand_int8_grouped(const int8_t *src, const uint16_t *s, int64_t sg,
                                                                      __m512bh *w) {
    const __m512i first = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (int c = 0; c < 4; c++) {
        const __m512 sc = load_f16(s + sg + 16 * c);
        const __m512 lo = int8x16_to_float(src + 32 * c), hi = int8x16_to_float(src + 32 * c + 16);
        w[c] = _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, _mm512_permutexvar_ps(second, sc)),
                                   _mm512_mul_ps(lo, _mm512_permutexvar_ps(first, sc)));
    }
}

/* Input pair p (inputs 2p, 2p + 1 of each word's eight) of 64 outputs' words as bf16 pairs: the bit offsets
 * of the two inputs' nibbles in a word. */
static const int PAIR_SHIFT[4][2] = {{0, 8}, {16, 24}, {4, 12}, {20, 28}};

static inline __attribute__((always_inline)) void expand_int4(const uint32_t *src, int p, const uint16_t *s,
                                                              const uint16_t *l, int64_t sg, __m512bh *w) {
    /* cvtne2ps gives [16 values of k, 16 of k + 1]; this permutation interleaves them into pairs */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i low4 = _mm512_set1_epi32(0xF), eight = _mm512_set1_epi32(8);
    const __m128i s0 = _mm_cvtsi32_si128(PAIR_SHIFT[p][0]), s1 = _mm_cvtsi32_si128(PAIR_SHIFT[p][1]);
    for (int c = 0; c < 4; c++) {
        const __m512i v = _mm512_loadu_si512(src + 16 * c);
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(_mm512_srl_epi32(v, s0), low4), eight));
        const __m512 q1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(_mm512_srl_epi32(v, s1), low4), eight));
        __m512 sc, zc;
        scale_zero(s, l, sg + 16 * c, &sc, &zc);
        const __m512bh v2 = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(q1, sc, zc), _mm512_fmadd_ps(q0, sc, zc));
        w[c] = (__m512bh)_mm512_permutexvar_epi16(interleave, (__m512i)v2);
    }
}

/* k-pair k2 of tile t, expanded. */
static inline __attribute__((always_inline)) void expand(const void *q, const uint16_t *scales, const uint16_t *lows,
                                                         int bits, int64_t group, int64_t K, int64_t t, int64_t k2,
                                                         __m512bh *w) {
    const int64_t K2 = K / 2;
    const int64_t sg = group > 0 ? (t * (K / group) + 2 * k2 / group) * TILE_N : 0;
    if (bits == 8 && group == 0)
        expand_int8((const int8_t *)q + (t * K2 + k2) * TILE_N * 2, w);
    else if (bits == 8)
        expand_int8_grouped((const int8_t *)q + (t * K2 + k2) * TILE_N * 2, scales, sg, w);
    else
        expand_int4((const uint32_t *)q + (t * (K / 8) + k2 / 4) * TILE_N, (int)(k2 % 4), scales, lows, sg, w);
}

/* The whole tile into buf [K / 2][64] bf16 pairs. */
static void expand_tile(const void *q, const uint16_t *scales, const uint16_t *lows, int bits, int64_t group,
                        int64_t K, int64_t t, uint32_t *buf) {
    for (int64_t k2 = 0; k2 < K / 2; k2++) {
        __m512bh w[4];
        expand(q, scales, lows, bits, group, K, t, k2, w);
        for (int c = 0; c < 4; c++) _mm512_storeu_si512(buf + k2 * TILE_N + 16 * c, (__m512i)w[c]);
    }
}

/* The layouts both entry points take: whole tiles along N, pairs along K, and for group-wise scales
 * (int4 always, int8 with group > 0) whole groups of an even size (int4: of whole words, 8 inputs). */
static inline int shape_ok(int bits, int64_t group, int64_t K, int64_t N) {
    return N % TILE_N == 0 && K % 2 == 0 && !(bits == 4 && (group <= 0 || group % 8)) &&
           !(group > 0 && (K % group || group % 2));
}

/* Up to FUSED_MAX_M rows times tile t of int8 weights with a scale per output (applied to the sums),
 * each k-pair expanded in registers. M is a literal at each call. */
static inline __attribute__((always_inline)) void fused_channels(
        const int M, const uint16_t *x, int64_t x_stride, const void *q, int64_t K, int64_t t, const float *scale,
        const uint16_t *bias, uint16_t *y, int64_t y_stride) {
    __m512 acc[TILE_ROWS][4];
    for (int m = 0; m < M; m++)
        for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_ps();
    for (int64_t k2 = 0; k2 < K / 2; k2++) {
        __m512bh w[4];
        expand_int8((const int8_t *)q + (t * (K / 2) + k2) * TILE_N * 2, w);
        tile_accumulate(acc, x, x_stride, M, k2, w);
    }
    tile_finish(acc, M, scale, bias, y + t * TILE_N, y_stride, 0);
}

/* The lanes of a group's 16 inputs from k on that the group still holds (left: group - k). */
static inline __attribute__((always_inline)) __mmask16 part_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* Those inputs as floats, the lanes past the group zero. */
static inline __attribute__((always_inline)) __m512 group_part(const uint16_t *p, int64_t left) {
    const __m256i h = _mm256_maskz_loadu_epi16(part_mask(left), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* The largest magnitude of a group of bf16 inputs. */
static inline __attribute__((always_inline)) float group_amax(const uint16_t *xr, int64_t group) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < group; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(group_part(xr + k, group - k)));
    return _mm512_reduce_max_ps(amax);
}

/* The int8 path's inputs: each row's groups as int16 with a power-of-two scale, xq [M][K] and
 * d = 2^(e - 15) per (row, group) in dx [M][groups], for the group's largest magnitude amax = f 2^e (f in
 * [0.5, 1)): every bf16 input of at least amax / 2^7 is exact (its 8 significant bits fit) and the smaller
 * ones are rounded (to nearest even) at amax / 2^15, below bf16's own step at the group's largest.
 * quant.Int8Weight.activations does the same in torch. */
static void quantize_rows_int16(const uint16_t *x, int64_t x_stride, int64_t M, int64_t K, int64_t group,
                                int16_t *xq, float *dx) {
    const int64_t groups = K / group;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *xr = x + m * x_stride + g * group;
            int16_t *out = xq + m * K + g * group;
            const float amax = group_amax(xr, group);
            int e = 0;
            frexpf(amax, &e);
            /* |x| inv < 2^15: no clamp; cvtps rounds to nearest even */
            const __m512 inv = _mm512_set1_ps(amax != 0.0f ? ldexpf(1.0f, 15 - e) : 0.0f);
            for (int64_t k = 0; k < group; k += 16) {
                const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(group_part(xr + k, group - k), inv));
                _mm256_mask_storeu_epi16(out + k, part_mask(group - k), _mm512_cvtepi32_epi16(i));
            }
            dx[m * groups + g] = amax != 0.0f ? ldexpf(1.0f, e - 15) : 0.0f;
        }
}

/* Up to FUSED_MAX_M rows times tile t of int8 weights, no buffer: per group of `group` inputs, sum_k q xq
 * exactly in int32 (vpdpwssd: pairs of int16 products, the weights sign-extended from their pairs; at most
 * 32 x 127 x 2^15 per group), then acc += sum * d, times the group's float16 scale (s16) where the weight has
 * them, else times the float32 scale per output (scale) at the end. One widening per 32 weights where the
 * expansion to bf16 took five. M is a literal at each call. */
static inline __attribute__((always_inline)) void fused_int8(
        const int M, const int16_t *xq, const float *dx, int64_t group, const void *q, const uint16_t *s16,
        const float *scale, int64_t K, int64_t t, const uint16_t *bias, uint16_t *y, int64_t y_stride) {
    const int64_t K2 = K / 2, groups = K / group;
    const int8_t *tile = (const int8_t *)q + t * K2 * TILE_N * 2;
    __m512 acc[TILE_ROWS][4];
    for (int m = 0; m < M; m++)
        for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i part[FUSED_PASS][4];
        for (int m = 0; m < M; m++)
            for (int c = 0; c < 4; c++) part[m][c] = _mm512_setzero_si512();
        for (int64_t k2 = g * group / 2; k2 < (g + 1) * group / 2; k2++) {
            __m512i w[4];
            for (int c = 0; c < 4; c++)
                w[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(tile + k2 * TILE_N * 2 + 32 * c)));
            for (int m = 0; m < M; m++) {
                int32_t pair;
                memcpy(&pair, xq + m * K + 2 * k2, sizeof(pair));
                const __m512i xv = _mm512_set1_epi32(pair);
                for (int c = 0; c < 4; c++) part[m][c] = _mm512_dpwssd_epi32(part[m][c], w[c], xv);
            }
        }
        const int64_t sg = (t * groups + g) * TILE_N;
        for (int c = 0; c < 4; c++) {
            const __m512 sc = s16 != NULL ? load_f16(s16 + sg + 16 * c) : _mm512_set1_ps(1.0f);
            for (int m = 0; m < M; m++)
                acc[m][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[m][c]),
                                            _mm512_mul_ps(sc, _mm512_set1_ps(dx[m * groups + g])), acc[m][c]);
        }
    }
    tile_finish(acc, M, scale, bias, y + t * TILE_N, y_stride, 0);
}

/* The int4 path's inputs: each row's groups rounded to int8, xq [M][K], with d = amax / 127 per group,
 * and d and d * sum(xq) per (row, group) in dx [M][groups] and dxs [M][groups]. Rounding is to nearest
 * even (quant.Int4Weight.activations does the same in torch). */
static void quantize_rows(const uint16_t *x, int64_t x_stride, int64_t M, int64_t K, int64_t group, int8_t *xq,
                          float *dx, float *dxs) {
    const int64_t groups = K / group;
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            const uint16_t *xr = x + m * x_stride + g * group;
            int8_t *out = xq + m * K + g * group;
            const float d = group_amax(xr, group) / 127.0f;
            const __m512 inv = _mm512_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
            __m512i sum = _mm512_setzero_si512();
            for (int64_t k = 0; k < group; k += 16) { /* cvtps rounds to nearest even */
                __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(group_part(xr + k, group - k), inv));
                i = _mm512_min_epi32(_mm512_max_epi32(i, lo), hi);
                _mm_mask_storeu_epi8(out + k, part_mask(group - k), _mm512_cvtepi32_epi8(i));
                sum = _mm512_add_epi32(sum, i);
            }
            dx[m * groups + g] = d;
            dxs[m * groups + g] = d * (float)_mm512_reduce_add_epi32(sum);
        }
}

/* Up to FUSED_MAX_M rows times tile t of int4 weights: per group, sum_k q xq exactly in int32 (vpdpbusd:
 * the nibbles as unsigned bytes, the rounded inputs as signed ones), then acc += sum * scale * d +
 * low * d * sum(xq) (low = -8 scale for symmetric blocks). M is a literal at each call. */
static inline __attribute__((always_inline)) void fused_int4(
        const int M, const int8_t *xq, const float *dx, const float *dxs, const void *q, const uint16_t *s16,
        const uint16_t *l16, int64_t group, int64_t K, int64_t t, const uint16_t *bias, uint16_t *y,
        int64_t y_stride) {
    const int64_t words = K / 8, groups = K / group;
    const uint32_t *tile = (const uint32_t *)q + t * words * TILE_N;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512 acc[TILE_ROWS][4];
    for (int m = 0; m < M; m++)
        for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i part[FUSED_PASS][4];
        for (int m = 0; m < M; m++)
            for (int c = 0; c < 4; c++) part[m][c] = _mm512_setzero_si512();
        for (int64_t j = g * group / 8; j < (g + 1) * group / 8; j++) {
            __m512i lo[4], hi[4];
            for (int c = 0; c < 4; c++) {
                const __m512i v = _mm512_loadu_si512(tile + j * TILE_N + 16 * c);
                lo[c] = _mm512_and_si512(v, nibble);
                hi[c] = _mm512_and_si512(_mm512_srli_epi32(v, 4), nibble);
            }
            for (int m = 0; m < M; m++) {
                int32_t first, second;
                memcpy(&first, xq + m * K + 8 * j, sizeof(first));
                memcpy(&second, xq + m * K + 8 * j + 4, sizeof(second));
                const __m512i xa = _mm512_set1_epi32(first), xb = _mm512_set1_epi32(second);
                for (int c = 0; c < 4; c++)
                    part[m][c] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(part[m][c], lo[c], xa), hi[c], xb);
            }
        }
        const int64_t sg = (t * groups + g) * TILE_N;
        for (int c = 0; c < 4; c++) {
            const __m512 sc = load_f16(s16 + sg + 16 * c);
            const __m512 lw = l16 == NULL ? _mm512_mul_ps(_mm512_set1_ps(-8.0f), sc) : load_f16(l16 + sg + 16 * c);
            for (int m = 0; m < M; m++) {
                const __m512 scaled = _mm512_mul_ps(sc, _mm512_set1_ps(dx[m * groups + g]));
                acc[m][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[m][c]), scaled, acc[m][c]);
                acc[m][c] = _mm512_fmadd_ps(lw, _mm512_set1_ps(dxs[m * groups + g]), acc[m][c]);
            }
        }
    }
    tile_finish(acc, M, NULL, bias, y + t * TILE_N, y_stride, 0);
}

/* The inputs per int16 scale of int8's fused path: the weight's group, or ROW_GROUP for scales per output
 * where K holds whole ones and FUSED_MAX_M such rows fit the workspace (0: else, and the k-pairs are expanded
 * to bf16 instead). */
static inline int64_t int8_row_group(int bits, int64_t group, int64_t K) {
    if (bits != 8) return 0;
    if (group > 0) return group;
    const int fits = FUSED_MAX_M * (K / ROW_GROUP) + (FUSED_MAX_M * K + 1) / 2 <= QGEMV_WORKSPACE;
    return K % ROW_GROUP == 0 && fits ? ROW_GROUP : 0;
}

/* Floats of the workspace the fused paths' rows take: int4, dx and dxs then xq int8; int8, dx then xq int16
 * (each rounded up to whole floats). */
static inline int64_t fused_workspace(int bits, int64_t M, int64_t K, int64_t group) {
    const int64_t g = int8_row_group(bits, group, K);
    if (bits == 4) return 2 * M * (K / group) + (M * K + 3) / 4;
    return g > 0 ? M * (K / g) + (M * K + 1) / 2 : 0;
}

/* bits 4: int4 (float16 scales and lows per group), 8: int8 (float32 scales per output with group 0, float16
 * scales per group with group > 0; lows NULL). x: [M, K] bf16
 * rows with stride x_stride (K even, rows 4-byte aligned); y: [M, N] bf16. Called by every thread of a team
 * (team.h), the shape checked by the caller (qgemv_shape_ok); returns after the team's barrier. workspace: shared,
 * at least QGEMV_WORKSPACE floats; *failed set to 1 when a thread's buffer cannot be allocated. */
void qgemv_bf16_team(const uint16_t *x, int64_t x_stride, const void *q, const void *scales, const void *lows,
                     int bits, int64_t group, const uint16_t *bias, uint16_t *y, int64_t y_stride, int64_t M,
                     int64_t K, int64_t N, float *workspace, int *failed, TeamShared *team) {
    const int64_t tiles = N / TILE_N, K2 = K / 2;
    const int64_t groups = group > 0 ? K / group : 0;
    float *dx = workspace, *dxs = workspace + M * groups;
    int8_t *xq = (int8_t *)(workspace + 2 * M * groups);
    const int64_t row_group = int8_row_group(bits, group, K);
    int16_t *xq16 = row_group > 0 ? (int16_t *)(workspace + M * (K / row_group)) : NULL;
    const int64_t row_scales = bits == 4 ? groups : row_group > 0 ? K / row_group : 0; /* dx's per row */
    /* integer products up to FUSED_MAX_M rows; int8 without whole groups expands each k-pair in registers,
     * which pays off for one pass (FUSED_PASS rows) only */
    const int fused = M <= (bits == 4 || row_group > 0 ? FUSED_MAX_M : FUSED_PASS);
    if (fused && (bits == 4 || row_group > 0)) {
#pragma omp single
        if (bits == 4)
            quantize_rows(x, x_stride, M, K, group, xq, dx, dxs);
        else
            quantize_rows_int16(x, x_stride, M, K, row_group, xq16, dx);
    }
    /* more rows: the tile expanded once into the thread's buffer, then every row group reads it from L2 */
    uint32_t *buf = !fused ? thread_buffer((size_t)K2 * TILE_N * sizeof(uint32_t)) : NULL;
    if (!fused && buf == NULL) {
#pragma omp atomic write
        *failed = 1;
    }
#ifdef BATCHPILOT_AMX
    /* more rows with AMX: the expanded tile multiplied on the tiles (gemv.c's threshold) */
    const uint16_t *pad = NULL;
    const int amx = !fused && amx_begin(x, x_stride, M, K, gemv_amx_min_rows(), &pad);
#endif
    for (int64_t t = team_start(tiles); t < team_end(tiles); t++) {
        const float *scale = bits == 8 && group == 0 ? (const float *)scales + t * TILE_N : NULL;
        const uint16_t *s16 = (const uint16_t *)scales, *l16 = (const uint16_t *)lows;
        const uint16_t *b = bias ? bias + t * TILE_N : NULL;
        if (fused) {
            /* FUSED_PASS rows at a time over the tile (read again from L2), the count a literal in each copy:
             * the rows' sums stay in registers */
            for (int64_t m0 = 0; m0 < M; m0 += FUSED_PASS) {
                const int8_t *xq_m = xq + m0 * K;
                const int16_t *xq16_m = xq16 != NULL ? xq16 + m0 * K : NULL;
                const float *dx_m = dx + m0 * row_scales, *dxs_m = dxs + m0 * groups;
                const uint16_t *x_m = x + m0 * x_stride;
                uint16_t *y_m = y + m0 * y_stride;
#define FUSED(ROWS)                                                                                               \
    (bits == 4 ? fused_int4(ROWS, xq_m, dx_m, dxs_m, q, s16, l16, group, K, t, b, y_m, y_stride)                \
     : row_group > 0 ? fused_int8(ROWS, xq16_m, dx_m, row_group, q, group > 0 ? s16 : NULL, scale, K, t, b, y_m, \
                                  y_stride)                                                                       \
                     : fused_channels(ROWS, x_m, x_stride, q, K, t, scale, b, y_m, y_stride))
                switch (M - m0 < FUSED_PASS ? M - m0 : FUSED_PASS) {
                case 1: FUSED(1); break;
                case 2: FUSED(2); break;
                case 3: FUSED(3); break;
                default: FUSED(4);
                }
#undef FUSED
            }
            continue;
        }
        if (buf == NULL) continue;
        expand_tile(q, s16, l16, bits, group, K, t, buf);
#ifdef BATCHPILOT_AMX
        if (amx) {
            amx_tile_times_rows(M, x, x_stride, pad, K, (const uint16_t *)buf, K2, scale, b, y + t * TILE_N,
                                y_stride, 0, NULL, 0);
            continue;
        }
#endif
        tile_times_rows(M, x, x_stride, (const uint16_t *)buf, K2, scale, b, y + t * TILE_N, y_stride, 0);
    }
    team_wait(&team->barrier, NULL, 0);
}

/* The most rows qgemv_bf16 multiplies in integers (the fused paths: quant.py's reference rounds the inputs alike). */
int qgemv_fused_max_rows(void) { return FUSED_MAX_M; }

/* The inputs per int16 scale the fused int8 path gives each row (quant.Int8Weight.activations); 0 where it
 * does not run. */
int64_t qgemv_row_group(int bits, int64_t group, int64_t K) { return int8_row_group(bits, group, K); }

int qgemv_shape_ok(int bits, int64_t group, int64_t K, int64_t N) {
    return shape_ok(bits, group, K, N) && fused_workspace(bits, FUSED_MAX_M, K, group) <= QGEMV_WORKSPACE;
}

/* qgemv_bf16_team on a team of its own. Returns -1 for N not a multiple of 64 or an odd K, -2 when a buffer
 * cannot be allocated. */
int qgemv_bf16(const uint16_t *x, int64_t x_stride, const void *q, const void *scales, const void *lows,
               int bits, int64_t group, const uint16_t *bias, uint16_t *y, int64_t y_stride, int64_t M, int64_t K,
               int64_t N, int num_threads) {
    if (!qgemv_shape_ok(bits, group, K, N)) return -1;
    float workspace[QGEMV_WORKSPACE];
    int failed = 0;
    TeamShared team = {.barrier = {0}};
#pragma omp parallel num_threads(num_threads)
    qgemv_bf16_team(x, x_stride, q, scales, lows, bits, group, bias, y, y_stride, M, K, N, workspace, &failed, &team);
    return failed ? -2 : 0;
}

/* The whole weight as [N, K] bf16 (int8 per output: q * scale rounded once; else the tile's values), for
 * steps with more rows than qgemv_bf16 serves well. */
int qdequant_bf16(const void *q, const void *scales, const void *lows, int bits, int64_t group, uint16_t *out,
                  int64_t K, int64_t N, int num_threads) {
    if (!shape_ok(bits, group, K, N)) return -1;
    const int64_t tiles = N / TILE_N, K2 = K / 2;
    const int per_output = bits == 8 && group == 0; /* float32 scales applied here, not in the tile */
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        uint32_t *buf = thread_buffer((size_t)K2 * TILE_N * sizeof(uint32_t));
        if (buf == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            if (buf == NULL) continue;
            expand_tile(q, (const uint16_t *)scales, (const uint16_t *)lows, bits, group, K, t, buf);
            for (int n = 0; n < TILE_N; n++) {
                uint32_t *row = (uint32_t *)(out + (t * TILE_N + n) * K);
                const float s = per_output ? ((const float *)scales)[t * TILE_N + n] : 1.0f;
                for (int64_t k2 = 0; k2 < K2; k2++) {
                    const uint32_t pair = buf[k2 * TILE_N + n];
                    if (per_output) {
                        const __m128 v = _mm_mul_ps(
                            _mm_castsi128_ps(_mm_set_epi32(0, 0, (int)(pair & 0xFFFF0000u), (int)(pair << 16))),
                            _mm_set1_ps(s));
                        row[k2] = (uint32_t)_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(v));
                    } else {
                        row[k2] = pair;
                    }
                }
            }
        }
    }
    return failed ? -2 : 0;
}
#endif
