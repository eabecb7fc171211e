/*
 * Every layer of a decode-only step in one call: the same kernels as llama.py's fused forward (gemv, rope,
 * write_kv, paged attention, add_rms_norm, silu_mul), on the same values, so the result is bit for bit the same;
 * the rotary embedding and the cache writes are done head by head by the attention's tasks (rope_kv_head), each
 * task's own, with no barrier of their own. At a few rows each of those kernels takes tens of microseconds
 * while the Python between them took ~60 us a layer (calls, views, ctypes argument conversion):
 * about a seventh of a batch-1 step of the default model. The whole step is one OpenMP region, each
 * kernel a team kernel that ends in a barrier (team.h): a region per kernel cost ~270 forks a step.
 * Built where gemv_bf16 is; a projection may be bf16 or int8 / int4 (qgemv, where the CPU has
 * AVX512-BF16 and VNNI).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "row_scan.h"
#include "team.h"

#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))

/* A layer's pointers: each projection's weight parts (a pointer to `parts` pointers: team.h's split of bf16
 * tiles; quantized weights are one part), scales and lows, then the QKV bias and the norms. */
enum { QKV = 0, O = 3, GATE_UP = 6, DOWN = 9, QKV_BIAS = 12, FFN_NORM, NEXT_NORM, POINTERS_PER_LAYER };
/* A layer's formats: each projection's (bits, group, parts), in the order QKV, O, GATE_UP, DOWN. */
enum { FORMATS_PER_LAYER = 12 };

/* Whether a projection of format f (bits, group, parts) and shape [N, K] runs here. */
static int projection_ok(const int64_t *f, int64_t K, int64_t N) {
    if (f[0] == 16) return N % 64 == 0 && K % 2 == 0 && f[2] >= 1;
#ifdef BATCHPILOT_QGEMV
    return qgemv_shape_ok((int)f[0], f[1], K, N);
#else
    return 0; /* qgemv is built only with AVX512-BF16 and VNNI; kernels.py does not ask for it elsewhere */
#endif
}

/* Whether every projection of every layer runs here. */
static int formats_ok(const int64_t *formats, int num_layers, int64_t C, int64_t W, int64_t HD, int64_t I) {
    const int64_t K[4] = {C, HD, C, I}, N[4] = {W, C, 2 * I, C};
    for (int l = 0; l < num_layers; l++)
        for (int p = 0; p < 4; p++)
            if (!projection_ok(formats + (int64_t)l * FORMATS_PER_LAYER + 3 * p, K[p], N[p])) return 0;
    return 1;
}

/* y [M, N] = x [M, K] W^T (+ bias) on the team: kernels.gemv's bf16 tiles (bits 16) or qgemv's int8 / int4. */
static void project(const void *const *w, const int64_t *format, const uint16_t *x, int64_t x_stride,
                    const void *bias, uint16_t *y, int64_t M, int64_t K, int64_t N, float *workspace, TeamShared *team,
                    int *failed) {
    if (format[0] == 16) {
        gemv_bf16_team(x, x_stride, (const uint16_t *const *)w[0], (int)format[2], bias, y, N, 0, M, K, N, team);
        return;
    }
#ifdef BATCHPILOT_QGEMV
    qgemv_bf16_team(x, x_stride, w[0], w[1], w[2], (int)format[0], format[1], bias, y, N, M, K, N, workspace, failed,
                    team);
#endif
}

/* Where this thread starts reading a projection's weights (w, format as project takes them): its part of bf16
 * tiles split for this team, or NULL (quantized weights are one part, read by all). */
static const void *own_part(const void *const *w, const int64_t *format) {
    if (format[0] != 16 || format[2] != omp_get_num_threads()) return NULL;
    return ((const uint16_t *const *)w[0])[omp_get_thread_num()];
}

/* One thread's part of a row's greedy scan: its columns' maximum and the first index holding it, or its first
 * NaN (index -1: no columns). */
typedef struct {
    float best;
    int nan;
    int64_t index;
} ScanPart;

/* tokens[b] = the first index of row b's maximum in logits [B, vocab], or of its first NaN: argmax.c's answer.
 * Thread j scans the columns of its part of the lm_head's tiles (64 outputs each, gemv_bf16_team's split; it
 * computed most of them, so they are in its caches); then each row's parts are joined in column order: the first
 * part holding the row's first NaN or its maximum holds the first index of it. */
static void argmax_team(const void *logits, int is_bf16, int64_t B, int64_t vocab, ScanPart *parts,
                        int64_t *tokens, TeamShared *team) {
    const int T = omp_get_num_threads(), j = omp_get_thread_num();
    const int64_t tiles = vocab / 64, first = team_start(tiles) * 64, n = team_end(tiles) * 64 - first;
    for (int64_t b = 0; b < B && n > 0; b++) {
        ScanPart *part = parts + b * T + j;
        const char *row = (const char *)logits + (b * vocab + first) * (is_bf16 ? 2 : 4);
        part->best = row_max(row, is_bf16, n, &part->nan);
        part->index = first + (part->nan ? first_nan(row, is_bf16, n) : first_equal(row, is_bf16, n, part->best));
    }
    for (int64_t b = 0; b < B && n == 0; b++) parts[b * T + j] = (ScanPart){.best = -INFINITY, .nan = 0, .index = -1};
    team_wait(&team->barrier, NULL, 0);
    for (int64_t b = team_start(B); b < team_end(B); b++) {
        const ScanPart *row = parts + b * T;
        int at = -1;
        for (int i = 0; i < T && at < 0; i++)
            if (row[i].nan) at = i;
        float best = -INFINITY;
        for (int i = 0; i < T; i++)
            if (row[i].index >= 0 && row[i].best > best) best = row[i].best;
        for (int i = 0; i < T && at < 0; i++)
            if (row[i].index >= 0 && row[i].best == best) at = i;
        tokens[b] = at < 0 ? 0 : row[at].index;
    }
    team_wait(&team->barrier, NULL, 0);
}

/*
 * x: [B, C] bf16, the residual stream (updated in place), first set to the rows token_ids ([B] int64) pick from
 * embed ([vocab, C] bf16) where embed is not NULL (else the caller has set it); y: [B, C] bf16, set to the normed
 * input of the first layer's QKV (first_norm) and on return the lm_head's. head: the lm_head's bf16 tile parts
 * (head_parts of them, [vocab, C]) or NULL; with it, logits [B, vocab] (float32 when logits_f32, else
 * bf16) get y times it in the same region, and with tokens ([B] int64, or NULL) each row's argmax too (greedy
 * sampling): the Python and the region's start that a call of its own cost come after the weights' stream, from
 * cold caches (docs/reproduction.md). weights:
 * POINTERS_PER_LAYER a layer (NEXT_NORM is the next layer's input norm or the final one; an absent
 * bias or lows is NULL); formats: FORMATS_PER_LAYER a layer. caches: a layer's K then V cache,
 * [KVH, S, D] each. rope_cos, rope_sin: [positions, D/2] float32, row positions[b] ([B] int64) for row b: the
 * step's inputs are indexed here, not by a torch call each (a cold torch call cost ~15 us). scratch: bf16, at least
 * B * ((H + 2 KVH) D + 2 H D + C + 3 I). One parallel region for the whole step: each kernel is a team
 * kernel ending in a barrier. At up to DECODE_PRIVATE_ROWS rows each thread keeps its own copy of x, y and the
 * MLP's activations and computes the norms and silu of every row itself (the same functions, so the same values
 * in each copy): the rows' norms and silu cost a thread ~1 us where a team kernel's barrier and the other thread
 * idling cost as much, and a barrier each split the weights' stream (a 270 MB read in 300 barrier-separated runs
 * took ~8% longer than in one on a Zen 4 EPYC at 60 GB/s: docs/reproduction.md): a barrier a layer after each
 * projection and after the attention, 5, where the team's norms and silu add 3. Returns 0, -1 for a shape the
 * kernels do not take, -2 when a buffer cannot be allocated.
 */
int decode_layers(uint16_t *x, uint16_t *y, const uint16_t *embed, const int64_t *token_ids,
                  const uint16_t *first_norm, const void *const *weights, const int64_t *formats, void *const *caches,
                  int num_layers, const float *rope_cos, const float *rope_sin, const int64_t *positions,
                  const int64_t *slots, const int64_t *block_tables, const int64_t *context_lens, int table_width,
                  int block_size, int64_t num_slots, int64_t B, int64_t C, int H, int KVH, int D, int64_t I, float eps,
                  float scale, const uint16_t *const *head, int head_parts, int64_t vocab, void *logits, int logits_f32,
                  int64_t *tokens, uint16_t *scratch, int num_threads) {
    const int64_t W = (int64_t)(H + 2 * KVH) * D, HD = (int64_t)H * D;
    if (!formats_ok(formats, num_layers, C, W, HD, I) || !paged_decode_attention_ok(H, KVH, D, block_size)) return -1;
    const int64_t head_format[3] = {16, 0, head_parts};
    if (head != NULL && !projection_ok(head_format, C, vocab)) return -1;
    uint16_t *qkv = scratch, *q = qkv + B * W, *attn = q + B * HD, *proj = attn + B * HD;
    uint16_t *gate_up = proj + B * C, *act = gate_up + B * 2 * I;
    float workspace[QGEMV_WORKSPACE];
    TeamShared team = {.barrier = {0}};
    int failed = 0;
    ScanPart *scan = NULL;
    if (head != NULL && tokens != NULL && (scan = malloc((size_t)(B * num_threads) * sizeof(ScanPart))) == NULL)
        return -2;
    const int64_t own_elems = B * (2 * C + I); /* a thread's copy of x, y and act */
    uint16_t *own = NULL;
    if (B <= DECODE_PRIVATE_ROWS && (own = malloc((size_t)(own_elems * num_threads) * 2)) == NULL) {
        free(scan);
        return -2;
    }
#pragma omp parallel num_threads(num_threads)
    {
        /* this thread's x, y and act, and the rows whose norms and silu it computes: every row of its own copies,
         * or its share of the team's */
        uint16_t *const mine = own != NULL ? own + omp_get_thread_num() * own_elems : NULL;
        uint16_t *const xt = mine != NULL ? mine : x, *const yt = mine != NULL ? mine + B * C : y;
        uint16_t *const actt = mine != NULL ? mine + 2 * B * C : act;
        const int64_t r0 = mine != NULL ? 0 : team_start(B), r1 = mine != NULL ? B : team_end(B);
        for (int64_t b = r0; (embed != NULL || mine != NULL) && b < r1; b++) /* the rows from embed, or the caller's */
            memcpy(xt + b * C, embed != NULL ? embed + token_ids[b] * C : x + b * C, (size_t)C * 2);
        add_rms_norm_rows(xt, C, NULL, 0, first_norm, yt, C, r0, r1, C, eps);
        if (mine == NULL) team_wait(&team.barrier, own_part(weights + QKV, formats), TEAM_PREFETCH_MAX);
        for (int l = 0; l < num_layers; l++) {
            const void *const *lw = weights + (int64_t)l * POINTERS_PER_LAYER;
            const int64_t *lf = formats + (int64_t)l * FORMATS_PER_LAYER;
            uint16_t *k_cache = caches[2 * l], *v_cache = caches[2 * l + 1];
            paged_decode_attention_fetch_team(k_cache, v_cache, block_tables, context_lens, (int)B, KVH, D, table_width,
                                              block_size, num_slots);
            project(lw + QKV, lf, yt, C, lw[QKV_BIAS], qkv, B, C, W, workspace, &team, &failed);
            const HeadPrep prep = {qkv, W, rope_cos, rope_sin, positions, slots};
            paged_decode_attention_team(q, k_cache, v_cache, attn, block_tables, context_lens, (int)B, H, KVH, D,
                                        table_width, block_size, num_slots, scale, &prep, &team,
                                        own_part(lw + O, lf + 3));
            project(lw + O, lf + 3, attn, HD, NULL, proj, B, HD, C, workspace, &team, &failed);
            add_rms_norm_rows(xt, C, proj, C, lw[FFN_NORM], yt, C, r0, r1, C, eps);
            if (mine == NULL) team_wait(&team.barrier, own_part(lw + GATE_UP, lf + 6), TEAM_PREFETCH_MAX);
            project(lw + GATE_UP, lf + 6, yt, C, NULL, gate_up, B, C, 2 * I, workspace, &team, &failed);
            silu_mul_rows(gate_up, actt, r0, r1, I);
            if (mine == NULL) team_wait(&team.barrier, own_part(lw + DOWN, lf + 9), TEAM_PREFETCH_MAX);
            project(lw + DOWN, lf + 9, actt, I, NULL, proj, B, I, C, workspace, &team, &failed);
            add_rms_norm_rows(xt, C, proj, C, lw[NEXT_NORM], yt, C, r0, r1, C, eps);
            if (mine == NULL) team_wait(&team.barrier, NULL, 0); /* the projection's wait fetched what comes next */
        }
        if (head != NULL) gemv_bf16_team(yt, C, head, head_parts, NULL, logits, vocab, logits_f32, B, C, vocab, &team);
        if (scan != NULL) argmax_team(logits, !logits_f32, B, vocab, scan, tokens, &team);
        if (mine != NULL && omp_get_thread_num() == 0) {
            memcpy(x, xt, (size_t)(B * C) * 2);
            memcpy(y, yt, (size_t)(B * C) * 2);
        }
    }
    free(own);
    free(scan);
    return failed ? -2 : 0;
}
#endif
