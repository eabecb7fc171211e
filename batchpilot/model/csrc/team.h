/*
 * Work split over the threads of an OpenMP team, for kernels a caller may run inside one parallel
 * region (decode_layers.c runs a whole decode step in one: a region's fork cost ~1 us, and a step
 * of the default model had ~270 of them). A `_team` kernel is called by every thread of the team,
 * takes its share, and returns after a barrier, so the next kernel sees its results.
 *
 * The split is fixed (the first n % T threads take one item more), not OpenMP's choice, because
 * weights are laid out by it: thread j's tiles of every projection lie one after another in a
 * stream of their own (kernels.GemvTiles, split by kernels.split_start), so that each thread reads one
 * long run of memory across the whole step and the prefetchers never restart (docs/reproduction.md).
 */
#ifndef BATCHPILOT_TEAM_H
#define BATCHPILOT_TEAM_H

#include <omp.h>
#include <stdint.h>

/* The first of items [0, n) that part j of `parts` takes. */
static inline int64_t split_start(int64_t n, int parts, int j) {
    const int64_t q = n / parts, r = n % parts;
    return (int64_t)j * q + (j < r ? j : r);
}

static inline int64_t team_start(int64_t n) { return split_start(n, omp_get_num_threads(), omp_get_thread_num()); }
static inline int64_t team_end(int64_t n) { return split_start(n, omp_get_num_threads(), omp_get_thread_num() + 1); }

/* Tile t of `tiles`, each `tile_elems` elements, stored in `parts` pieces split as split_start. */
static inline const uint16_t *part_tile(const uint16_t *const *w, int parts, int64_t tiles, int64_t tile_elems,
                                        int64_t t) {
    int j = (int)(t * parts / tiles);
    while (j > 0 && t < split_start(tiles, parts, j)) j--;
    while (j + 1 < parts && t >= split_start(tiles, parts, j + 1)) j++;
    return w[j] + (t - split_start(tiles, parts, j)) * tile_elems;
}

/* Where this thread's stream goes on after its part of a weight stored as part_tile reads it: the end of its
 * part, where the layout (kernels.GemvTiles.place) puts its part of the next weight; NULL when the parts are not
 * the team's. */
static inline const uint16_t *own_stream_end(const uint16_t *const *w, int parts, int64_t tiles, int64_t tile_elems) {
    const int j = omp_get_thread_num();
    if (parts != omp_get_num_threads()) return NULL;
    return w[j] + (split_start(tiles, parts, j + 1) - split_start(tiles, parts, j)) * tile_elems;
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TEAM_RELAX() _mm_pause()
#else
#define TEAM_RELAX() ((void)0)
#endif

/* The bytes a thread waiting at the end of a projection fetches ahead: about a tile of a 576-input projection
 * (72 KB). Up to 512 KB read the same at batch 1, and made 8-row steps 1.5% slower (docs/reproduction.md). */
#define TEAM_PREFETCH_MAX (64 * 1024)

/* What a team's threads share to wait for one another (team_wait): how many have arrived at the barrier now,
 * and how many barriers the team has passed, each on a cache line of its own. Zeroed by whoever opens the team. */
typedef struct {
    _Alignas(64) int arrived;
    _Alignas(64) unsigned passed;
} TeamBarrier;

/* Spins while *word is `value`, fetching up to `bytes` from `next` (or nothing, NULL) meanwhile. */
static inline void team_spin(const unsigned *word, unsigned value, const void *next, int64_t bytes) {
    for (int64_t at = 0; __atomic_load_n(word, __ATOMIC_ACQUIRE) == value;) {
        if (next != NULL && at < bytes) {
            __builtin_prefetch((const char *)next + at);
            at += 64;
        } else
            TEAM_RELAX();
    }
}

/*
 * A barrier: returns once every thread of the team has called it, and what each wrote before it is seen by all
 * after. A thread that waits fetches from `next` (where it reads next, or NULL) meanwhile, up to `bytes`
 * (TEAM_PREFETCH_MAX at a projection's end): each thread's weights of a step lie in one stream (above), so while the last thread
 * finishes, the others' streams go on instead of stopping at every kernel's end. On a Zen 4 EPYC a batch-1 step's
 * threads waited ~0.25 ms each at its ~180 barriers (docs/reproduction.md); OpenMP's barrier cannot fetch.
 */
static inline void team_wait(TeamBarrier *barrier, const void *next, int64_t bytes) {
    const int team = omp_get_num_threads();
    if (team == 1) return;
    const unsigned passed = __atomic_load_n(&barrier->passed, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&barrier->arrived, 1, __ATOMIC_ACQ_REL) == team) { /* the last to arrive */
        __atomic_store_n(&barrier->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&barrier->passed, passed + 1, __ATOMIC_RELEASE);
        return;
    }
    team_spin(&barrier->passed, passed, next, bytes);
}

#endif
