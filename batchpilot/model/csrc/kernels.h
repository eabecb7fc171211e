/*
 * The kernels one C file calls from another (decode_layers.c), declared once; each defining file
 * includes this header too, so the compiler checks the two agree.
 */
#ifndef BATCHPILOT_KERNELS_H
#define BATCHPILOT_KERNELS_H

#include <stdint.h>

#include "team.h"

/* rows up to which gemv_bf16_team splits a tile between two threads */
#define GEMV_SPLIT_MAX_ROWS 128
/* threads of a team that share out the tiles of an even split at run time (gemv.c); larger teams split statically */
#define GEMV_MAX_TEAM 16
/* One thread's part of the tiles at run time: the tiles [front, back) of it not yet taken, and the call they
 * belong to, packed in one word (gemv.c); a cache line each, as its owner updates it at every tile. */
typedef struct {
    _Alignas(64) uint64_t word;
    int calls; /* the owner's calls of gemv_bf16_team with this GemvSplit so far */
} GemvClaim;
/* What the threads of a team share in gemv_bf16_team (gemv.c): to split one tile between two threads, each
 * half's float32 sums, [M][64], and whether thread 1's are posted (0 between calls); to share out the tiles at
 * run time, each thread's claim. */
typedef struct {
    float sums[2][GEMV_SPLIT_MAX_ROWS * 64];
    unsigned ready;
    GemvClaim claims[GEMV_MAX_TEAM];
} GemvSplit;
/* What the threads of a team share in the `_team` kernels: their barrier and gemv's split. Declared, zeroed, by
 * the function that opens the team. */
typedef struct {
    TeamBarrier barrier;
    GemvSplit gemv;
} TeamShared;

/* rows up to which decode_layers has each thread compute the norms and silu of every row itself */
#define DECODE_PRIVATE_ROWS 4
/* `_team` kernels: called by every thread of an OpenMP team, each returns after the team's barrier (team_wait). */
void gemv_bf16_team(const uint16_t *x, int64_t x_stride, const uint16_t *const *w, int parts, const uint16_t *bias,
                    void *y, int64_t y_stride, int y_f32, int64_t M, int64_t K, int64_t N, TeamShared *team);

int gemv_amx_min_rows(void); /* the fewest rows gemv_bf16_team multiplies on the AMX tiles; 0: never */

/* floats of qgemv_bf16_team's shared workspace, on the caller's stack (half a megabyte; a heap buffer per
 * thread made the batch-1 int4 step 5-8% slower): up to 8 rows' inputs as int8 (int4) or int16 (int8) and
 * their scales per group of 32, for K up to 32768 */
#define QGEMV_WORKSPACE (8 * 32768 / 2 + 8 * 32768 / 32)
/* qgemv is built where the CPU has AVX512-BF16 and AVX512-VNNI (every CPU with the first has the second) */
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#define BATCHPILOT_QGEMV 1
#endif
/* only with BATCHPILOT_QGEMV: */
int qgemv_shape_ok(int bits, int64_t group, int64_t K, int64_t N);
int64_t qgemv_row_group(int bits, int64_t group, int64_t K);
void qgemv_bf16_team(const uint16_t *x, int64_t x_stride, const void *q, const void *scales, const void *lows,
                     int bits, int64_t group, const uint16_t *bias, uint16_t *y, int64_t y_stride, int64_t M,
                     int64_t K, int64_t N, float *workspace, int *failed, TeamShared *team);

void add_rms_norm_rows(uint16_t *x, int64_t x_stride, const uint16_t *delta, int64_t delta_stride,
                       const uint16_t *weight, uint16_t *out, int64_t out_stride, int64_t r0, int64_t r1,
                       int64_t cols, float eps);
void silu_mul_rows(const uint16_t *gate_up, uint16_t *out, int64_t r0, int64_t r1, int64_t cols);
void rope_kv_head(uint16_t *qkv_row, uint16_t *q_row, const float *c, const float *s, int64_t slot, int kh, int H,
                  int KVH, int D, uint16_t *k_cache, uint16_t *v_cache, int64_t num_slots);
/* What paged_decode_attention_team's tasks do first, each for its row and KV head (rope_kv_head):
 * qkv [B, row_stride] (the fused projection's rows), the rotary tables [positions, D / 2] and each row's position
 * and cache slot. q, the kernel's queries, are written there. */
typedef struct {
    uint16_t *qkv;
    int64_t row_stride;
    const float *cos_table, *sin_table;
    const int64_t *positions, *slots;
} HeadPrep;
int paged_decode_attention_ok(int num_heads, int num_kv_heads, int head_dim, int block_size);
void paged_decode_attention_fetch_team(const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *block_tables,
                                       const int64_t *context_lens, int num_seqs, int num_kv_heads, int head_dim,
                                       int table_width, int block_size, int64_t num_slots);
void paged_decode_attention_team(uint16_t *q, uint16_t *k_cache, uint16_t *v_cache, uint16_t *out,
                                 const int64_t *block_tables, const int64_t *context_lens, int num_seqs,
                                 int num_heads, int num_kv_heads, int head_dim, int table_width, int block_size,
                                 int64_t num_slots, float scale, const HeadPrep *prep, TeamShared *team,
                                 const void *next_weights);
void add_rms_norm(void *x, int64_t x_stride, const void *delta, int64_t delta_stride, const void *weight,
                  void *out, int64_t out_stride, int64_t rows, int64_t cols, float eps, int is_bf16,
                  int num_threads);
void rope_in_place(void *qkv, int64_t row_stride, const float *cos_t, const float *sin_t, int64_t rows,
                   int heads, int head_dim, int is_bf16, int num_threads);
void silu_mul(const void *gate_up, void *out, int64_t rows, int64_t cols, int is_bf16, int num_threads);
void write_kv(const void *k, int64_t k_stride, const void *v, int64_t v_stride, void *k_cache, void *v_cache,
              const int64_t *slots, int64_t rows, int kv_heads, int head_dim, int64_t num_slots, int is_bf16,
              int num_threads);
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, void *out,
                           const int64_t *block_tables, const int64_t *context_lens, int num_seqs,
                           int num_heads, int num_kv_heads, int head_dim, int table_width,
                           int block_size, int64_t num_slots, float scale, int is_bf16, int num_threads);

#endif
