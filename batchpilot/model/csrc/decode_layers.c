/*
 * Every layer of a decode-only step in one call: the same kernels in the same order as
 * llama.py's fused forward (gemv, rope, write_kv, paged attention, add_rms_norm, silu_mul), so the
 * result is bit for bit the same. At a few rows each of those kernels takes tens of microseconds
 * while the Python between them took ~60 us a layer (calls, views, ctypes argument conversion):
 * about a seventh of a batch-1 step of the default model. Built where gemv_bf16 is; a projection
 * may be bf16 or int8 / int4 (qgemv, where the CPU has AVX512-BF16).
 */
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))

/* A layer's pointers: each projection's (weight, scales, lows), then the QKV bias and the norms. */
enum { QKV = 0, O = 3, GATE_UP = 6, DOWN = 9, QKV_BIAS = 12, FFN_NORM, NEXT_NORM, POINTERS_PER_LAYER };
/* A layer's formats: each projection's (bits, group), in the order QKV, O, GATE_UP, DOWN. */
enum { FORMATS_PER_LAYER = 8 };

/* y [M, N] = x [M, K] W^T (+ bias): kernels.gemv's bf16 tiles (bits 16) or qgemv's int8 / int4 ones. */
static int project(const void *const *w, const int64_t *format, const uint16_t *x, int64_t x_stride,
                   const void *bias, uint16_t *y, int64_t M, int64_t K, int64_t N, int num_threads) {
    if (format[0] == 16) return gemv_bf16(x, x_stride, w[0], bias, y, N, 0, M, K, N, num_threads);
#ifdef __AVX512BF16__
    return qgemv_bf16(x, x_stride, w[0], w[1], w[2], (int)format[0], format[1], bias, y, N, M, K, N, num_threads);
#else
    return -1; /* qgemv is built only with AVX512-BF16; kernels.py does not ask for it elsewhere */
#endif
}

/*
 * x: [B, C] bf16, the residual stream (updated in place); y: [B, C] bf16, the normed input of the
 * first layer's QKV on entry and of the lm_head on return. weights: POINTERS_PER_LAYER a layer
 * (NEXT_NORM is the next layer's input norm or the final one; an absent bias or lows is NULL);
 * formats: FORMATS_PER_LAYER a layer. caches: a layer's K then V cache, [KVH, S, D] each.
 * cos, sin: [B, D/2] float32. scratch: bf16, at least B * ((H + 2 KVH) D + 2 H D + C + 3 I).
 * Returns 0, or the first failing kernel's code.
 */
int decode_layers(uint16_t *x, uint16_t *y, const void *const *weights, const int64_t *formats,
                  void *const *caches, int num_layers, const float *cos_t, const float *sin_t, const int64_t *slots,
                  const int64_t *block_tables, const int64_t *context_lens, int table_width, int block_size,
                  int64_t num_slots, int64_t B, int64_t C, int H, int KVH, int D, int64_t I, float eps, float scale,
                  uint16_t *scratch, int num_threads) {
    const int64_t W = (int64_t)(H + 2 * KVH) * D, HD = (int64_t)H * D;
    uint16_t *qkv = scratch, *q = qkv + B * W, *attn = q + B * HD, *proj = attn + B * HD;
    uint16_t *gate_up = proj + B * C, *act = gate_up + B * 2 * I;
    for (int l = 0; l < num_layers; l++) {
        const void *const *lw = weights + (int64_t)l * POINTERS_PER_LAYER;
        const int64_t *lf = formats + (int64_t)l * FORMATS_PER_LAYER;
        void *k_cache = caches[2 * l], *v_cache = caches[2 * l + 1];
        int rc = project(lw + QKV, lf, y, C, lw[QKV_BIAS], qkv, B, C, W, num_threads);
        if (rc != 0) return rc;
        rope_in_place(qkv, W, cos_t, sin_t, B, H + KVH, D, 1, num_threads);
        write_kv(qkv + HD, W, qkv + HD + (int64_t)KVH * D, W, k_cache, v_cache, slots, B, KVH, D, num_slots, 1);
        for (int64_t b = 0; b < B; b++) memcpy(q + b * HD, qkv + b * W, (size_t)HD * 2);
        rc = paged_decode_attention(q, k_cache, v_cache, attn, block_tables, context_lens, (int)B, H, KVH, D,
                                    table_width, block_size, num_slots, scale, 1, num_threads);
        if (rc != 0) return rc;
        if ((rc = project(lw + O, lf + 2, attn, HD, NULL, proj, B, HD, C, num_threads)) != 0) return rc;
        add_rms_norm(x, C, proj, C, lw[FFN_NORM], y, C, B, C, eps, 1, num_threads);
        if ((rc = project(lw + GATE_UP, lf + 4, y, C, NULL, gate_up, B, C, 2 * I, num_threads)) != 0) return rc;
        silu_mul(gate_up, act, B, I, 1, num_threads);
        if ((rc = project(lw + DOWN, lf + 6, act, I, NULL, proj, B, I, C, num_threads)) != 0) return rc;
        add_rms_norm(x, C, proj, C, lw[NEXT_NORM], y, C, B, C, eps, 1, num_threads);
    }
    return 0;
}
#endif
