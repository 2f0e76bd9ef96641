/* A float64 sum-tree over an array in shared memory: batched set, get and weighted draws.
 *
 * Layout (the one shmreplay.engine.sumtree documents, unchanged): tree[1] is the root, node i has
 * children 2i and 2i+1, leaf j lives at tree[capacity + j], capacity being the next power of two
 * >= num_leaves; tree[0] and the padding leaves beyond num_leaves are 0. Parents are always
 * recomputed from their children (never adjusted by a delta), so a node is exactly the float sum
 * of its two children and nothing drifts.
 *
 * The array lives in memory every sampler of the table can write, and is read under the table
 * mutex. Whatever it holds, these functions only address tree[0 .. 2·capacity): node indices are
 * computed, never read from it. No Python types here: the daemon's commit round calls it too.
 */
#ifndef SHM_SUMTREE_H
#define SHM_SUMTREE_H

#include <stdint.h>

#include "shm_status.h"

typedef struct {
    double *tree;      /* 2·capacity float64 (shared) */
    int64_t capacity;  /* a power of two >= 1 */
    int64_t num_leaves;
} shm_sumtree;

/* capacity of a tree of num_leaves leaves: the next power of two >= num_leaves (at least 1). */
int64_t shm_sumtree_capacity(int64_t num_leaves);

/* Set leaf leaves[i] to values[i] (values_len 1: the one value for every leaf), in order, so the
 * last value wins for a repeated leaf, then recompute every ancestor of a leaf set. SHM_EINVAL
 * (nothing changed) when a leaf is outside [0, num_leaves). */
int shm_sumtree_set(shm_sumtree *t, const int64_t *leaves, int64_t n, const double *values,
                    int64_t values_len);

/* The same with values[i] = shm_weight(priorities[i], exponent) (random_selectors.h). */
int shm_sumtree_set_weights(shm_sumtree *t, const int64_t *leaves, int64_t n,
                            const double *priorities, double exponent);

/* out[i] = weight of leaves[i]; SHM_EINVAL when a leaf is out of range. */
int shm_sumtree_get(const shm_sumtree *t, const int64_t *leaves, int64_t n, double *out);

static inline double shm_sumtree_total(const shm_sumtree *t) { return t->tree[1]; }

/* Every node and leaf 0. */
void shm_sumtree_clear(shm_sumtree *t);

/* Leaves 0..num_leaves-1 from leaf_values (num_leaves values), padding 0, every node recomputed. */
void shm_sumtree_rebuild(shm_sumtree *t, const double *leaf_values);

/* Recompute every node from the leaves (the level sums of rebuild, leaves untouched). */
void shm_sumtree_recompute(shm_sumtree *t);

/* One draw: the leaf for uniform u in [0, 1), with probability weight/total.
 *
 * mass = u·total; from the root, at node i with left weight lw = tree[2i] and right weight
 * rw = tree[2i+1]: go right (mass -= lw) when lw <= 0, or when mass >= lw and rw > 0; else go
 * left with mass = min(mass, lw). So a leaf of weight 0 or a padding leaf is never reached while
 * the tree is consistent, whatever the rounding. Returns the leaf (>= 0), SHM_EEMPTY when the
 * total is not a finite number > 0, SHM_ECORRUPT when the descent ends on a leaf that is padding
 * or does not weigh > 0 (only an inconsistent tree does that). */
int64_t shm_sumtree_draw(const shm_sumtree *t, double u);

/* n draws, out[i] for u[i]; the first error stops it and is returned. */
int shm_sumtree_sample(const shm_sumtree *t, const double *u, int64_t n, int64_t *out);

/* Which of n 64-bit keys to keep so that a repeated key keeps only its last occurrence:
 * keep[i] = 1 for those, 0 for the others; returns how many are kept, or SHM_ENOMEM. O(n) with
 * an open-addressing hash set (the table's update_priorities runs it on every batch). */
int64_t shm_last_wins(const int64_t *keys, int64_t n, uint8_t *keep);

#endif
