/* The sum-tree (see sumtree.h). */
#include "sumtree.h"

#include <math.h>
#include <string.h>

#include "random_selectors.h"

int64_t shm_sumtree_capacity(int64_t num_leaves) {
    int64_t cap = 1;
    while (cap < num_leaves)
        cap <<= 1;
    return cap;
}

/* Recompute the ancestors of one leaf node, bottom up: each from its two children. */
static inline void fix_up(double *tree, int64_t node) {
    for (node >>= 1; node >= 1; node >>= 1)
        tree[node] = tree[2 * node] + tree[2 * node + 1];
}

void shm_sumtree_recompute(shm_sumtree *t) {
    double *tree = t->tree;
    for (int64_t i = t->capacity - 1; i >= 1; i--)
        tree[i] = tree[2 * i] + tree[2 * i + 1];
}

/* Batches this large relative to the tree recompute all nodes once (2·capacity additions)
 * instead of walking each leaf's path (n·depth): both give the same bits, every node being the
 * float sum of its children either way. */
static inline int whole_tree_is_cheaper(const shm_sumtree *t, int64_t n) {
    int64_t depth = 0;
    while (((int64_t)1 << depth) < t->capacity)
        depth++;
    return n * depth >= t->capacity;
}

static int check_leaves(const shm_sumtree *t, const int64_t *leaves, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (leaves[i] < 0 || leaves[i] >= t->num_leaves)
            return SHM_EINVAL;
    return SHM_OK;
}

static void finish_set(shm_sumtree *t, const int64_t *leaves, int64_t n) {
    if (whole_tree_is_cheaper(t, n)) {
        shm_sumtree_recompute(t);
        return;
    }
    /* Every leaf is set before any path is walked: a node on two paths is recomputed by the
     * later walk from children that are final by then. */
    for (int64_t i = 0; i < n; i++)
        fix_up(t->tree, t->capacity + leaves[i]);
}

int shm_sumtree_set(shm_sumtree *t, const int64_t *leaves, int64_t n, const double *values,
                    int64_t values_len) {
    if (n <= 0)
        return SHM_OK;
    if (values_len != n && values_len != 1)
        return SHM_EINVAL;
    if (check_leaves(t, leaves, n) != SHM_OK)
        return SHM_EINVAL;
    for (int64_t i = 0; i < n; i++)
        t->tree[t->capacity + leaves[i]] = values[values_len == 1 ? 0 : i];
    finish_set(t, leaves, n);
    return SHM_OK;
}

int shm_sumtree_set_weights(shm_sumtree *t, const int64_t *leaves, int64_t n,
                            const double *priorities, double exponent) {
    if (n <= 0)
        return SHM_OK;
    if (check_leaves(t, leaves, n) != SHM_OK)
        return SHM_EINVAL;
    for (int64_t i = 0; i < n; i++)
        t->tree[t->capacity + leaves[i]] = shm_weight(priorities[i], exponent);
    finish_set(t, leaves, n);
    return SHM_OK;
}

int shm_sumtree_get(const shm_sumtree *t, const int64_t *leaves, int64_t n, double *out) {
    if (check_leaves(t, leaves, n) != SHM_OK)
        return SHM_EINVAL;
    for (int64_t i = 0; i < n; i++)
        out[i] = t->tree[t->capacity + leaves[i]];
    return SHM_OK;
}

void shm_sumtree_clear(shm_sumtree *t) {
    memset(t->tree, 0, (size_t)(2 * t->capacity) * sizeof(double));
}

void shm_sumtree_rebuild(shm_sumtree *t, const double *leaf_values) {
    shm_sumtree_clear(t);
    memcpy(t->tree + t->capacity, leaf_values, (size_t)t->num_leaves * sizeof(double));
    shm_sumtree_recompute(t); /* no node at capacity 1: the root is the one leaf */
}

int64_t shm_sumtree_draw(const shm_sumtree *t, double u) {
    const double *tree = t->tree;
    double total = tree[1];
    if (!(total > 0.0 && total < INFINITY)) /* an inf total would put every draw on one leaf */
        return SHM_EEMPTY;
    double mass = u * total;
    int64_t node = 1;
    while (node < t->capacity) {
        int64_t left = 2 * node;
        double lw = tree[left];
        double rw = tree[left + 1];
        if (lw <= 0.0 || (mass >= lw && rw > 0.0)) {
            mass -= lw;
            node = left + 1;
        } else {
            mass = mass < lw ? mass : lw;
            node = left;
        }
    }
    int64_t leaf = node - t->capacity;
    /* Only a tree whose nodes are not the sums of their children (a stray store into shared
     * memory) ends on padding or on a leaf that weighs nothing (or NaN). */
    if (leaf >= t->num_leaves || !(tree[node] > 0.0))
        return SHM_ECORRUPT;
    return leaf;
}

int shm_sumtree_sample(const shm_sumtree *t, const double *u, int64_t n, int64_t *out) {
    for (int64_t i = 0; i < n; i++) {
        int64_t leaf = shm_sumtree_draw(t, u[i]);
        if (leaf < 0)
            return (int)leaf;
        out[i] = leaf;
    }
    return SHM_OK;
}
