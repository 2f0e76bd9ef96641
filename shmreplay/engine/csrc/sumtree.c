/* The sum-tree (see sumtree.h). */
#include "sumtree.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "random_selectors.h"

int64_t shm_sumtree_capacity(int64_t num_leaves) {
    int64_t cap = 1;
    while (cap < num_leaves)
        cap <<= 1;
    return cap;
}

/* Leaves whose paths are walked together (set) and draws that descend together (sample). */
#define WALK_GROUP 32
#define DRAW_GROUP 16

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
    /* Near the root the paths of a batch share their nodes: the levels of at most `top` nodes
     * (top: the largest power of two <= n) are recomputed whole after the walks (fewer than 2n
     * additions in all instead of n per level). Below them, every leaf is set before any path is
     * walked: a node on two paths is recomputed by the later walk from children that are final
     * by then. The paths of a group of leaves are walked level by level together, so that their
     * cache misses (a large tree is mostly out of cache) overlap instead of following one
     * another. Any of these orders gives the same bits: a node is the sum of its children. */
    double *tree = t->tree;
    int64_t top = 1;
    while (2 * top <= n)
        top *= 2;
    for (int64_t start = 0; start < n; start += WALK_GROUP) {
        int64_t g = n - start < WALK_GROUP ? n - start : WALK_GROUP;
        int64_t node[WALK_GROUP];
        for (int64_t k = 0; k < g; k++)
            node[k] = t->capacity + leaves[start + k];
        for (int64_t width = t->capacity / 2; width > top; width >>= 1) /* the parents' level */
            for (int64_t k = 0; k < g; k++) {
                int64_t p = node[k] >>= 1;
                tree[p] = tree[2 * p] + tree[2 * p + 1];
            }
    }
    for (int64_t lo = top < t->capacity / 2 ? top : t->capacity / 2; lo >= 1; lo >>= 1)
        for (int64_t i = lo; i < 2 * lo; i++)
            tree[i] = tree[2 * i] + tree[2 * i + 1];
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

/* The descent of shm_sumtree_draw for one step: from node (an inner node) to a child. Without
 * branches (the direction is a coin flip per level: mispredicted branches cost more than the
 * loads): both candidate masses are computed and one is selected by a bit mask. */
static inline int64_t step(const double *tree, int64_t node, double *mass) {
    int64_t left = 2 * node;
    double lw = tree[left];
    double rw = tree[left + 1];
    double m = *mass;
    int right = (lw <= 0.0) | ((m >= lw) & (rw > 0.0));
    double go_right = m - lw;
    double go_left = m < lw ? m : lw;
    uint64_t r, l, mask = (uint64_t)0 - (uint64_t)right;
    memcpy(&r, &go_right, sizeof r);
    memcpy(&l, &go_left, sizeof l);
    r = (r & mask) | (l & ~mask);
    memcpy(mass, &r, sizeof r);
    return left + right;
}

/* The leaf a descent ended on, or SHM_ECORRUPT when it is padding or does not weigh > 0: only a
 * tree whose nodes are not the sums of their children (a stray store into shared memory) ends
 * there. */
static inline int64_t landed(const shm_sumtree *t, int64_t node) {
    int64_t leaf = node - t->capacity;
    if (leaf >= t->num_leaves || !(t->tree[node] > 0.0))
        return SHM_ECORRUPT;
    return leaf;
}

static inline int total_is_drawable(double total) {
    return total > 0.0 && total < INFINITY; /* an inf total would put every draw on one leaf */
}

int64_t shm_sumtree_draw(const shm_sumtree *t, double u) {
    double total = t->tree[1];
    if (!total_is_drawable(total))
        return SHM_EEMPTY;
    double mass = u * total;
    int64_t node = 1;
    while (node < t->capacity)
        node = step(t->tree, node, &mass);
    return landed(t, node);
}

int shm_sumtree_sample(const shm_sumtree *t, const double *u, int64_t n, int64_t *out) {
    double total = t->tree[1];
    if (n > 0 && !total_is_drawable(total))
        return SHM_EEMPTY;
    /* A group of draws descends level by level together: each level's loads are independent
     * across the group, so their cache misses overlap. Each draw is the one shm_sumtree_draw
     * makes. */
    for (int64_t start = 0; start < n; start += DRAW_GROUP) {
        int64_t g = n - start < DRAW_GROUP ? n - start : DRAW_GROUP;
        int64_t node[DRAW_GROUP];
        double mass[DRAW_GROUP];
        for (int64_t k = 0; k < g; k++) {
            node[k] = 1;
            mass[k] = u[start + k] * total;
        }
        for (int64_t width = 1; width < t->capacity; width <<= 1) {
            for (int64_t k = 0; k < g; k++) {
                node[k] = step(t->tree, node[k], &mass[k]);
                /* The 64-byte line of this node's descendants three levels down (8 nodes
                 * from 8·node): fetched while the levels between are walked, so a draw has
                 * up to three misses in flight instead of one. Never dereferenced here. */
                if (16 * width <= t->capacity)
                    __builtin_prefetch(t->tree + 8 * node[k]);
            }
        }
        for (int64_t k = 0; k < g; k++) {
            int64_t leaf = landed(t, node[k]);
            if (leaf < 0)
                return (int)leaf;
            out[start + k] = leaf;
        }
    }
    return SHM_OK;
}

/* A hash set of keys for shm_last_wins: 2n to 4n buckets, on the stack for small batches. */
#define LAST_WINS_STACK 1024

int64_t shm_last_wins(const int64_t *keys, int64_t n, uint8_t *keep) {
    if (n <= 0)
        return 0;
    int64_t nb = 1;
    while (nb < 2 * n)
        nb <<= 1;
    int64_t stack_keys[LAST_WINS_STACK];
    uint8_t stack_used[LAST_WINS_STACK];
    int64_t *bucket = stack_keys;
    uint8_t *used = stack_used;
    if (nb > LAST_WINS_STACK) {
        bucket = malloc((size_t)nb * sizeof *bucket);
        used = malloc((size_t)nb);
        if (bucket == NULL || used == NULL) {
            free(bucket);
            free(used);
            return SHM_ENOMEM;
        }
    }
    memset(used, 0, (size_t)nb);
    int64_t kept = 0;
    for (int64_t i = n - 1; i >= 0; i--) { /* from the end: the first one seen is the last */
        uint64_t h = (uint64_t)keys[i] * UINT64_C(0x9E3779B97F4A7C15); /* Fibonacci hashing */
        int64_t b = (int64_t)(h >> 32) & (nb - 1);
        while (used[b] && bucket[b] != keys[i])
            b = (b + 1) & (nb - 1);
        keep[i] = !used[b];
        if (!used[b]) {
            used[b] = 1;
            bucket[b] = keys[i];
            kept++;
        }
    }
    if (bucket != stack_keys) {
        free(bucket);
        free(used);
    }
    return kept;
}
