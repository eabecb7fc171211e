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

#endif
