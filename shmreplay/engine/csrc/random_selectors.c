/* Uniform's and Prioritized's operations (see random_selectors.h). */
#include "random_selectors.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "shm_atomics.h"

double shm_priority_limit(double exponent, double w_max) {
    if (exponent == 0.0 || shm_weight(DBL_MAX, exponent) <= w_max)
        return DBL_MAX;
    if (exponent == 1.0)
        return w_max;
    /* Positive float64s are ordered like their bit patterns: bisect those, 63 steps at most.
     * Invariant: weight(lo) <= w_max < weight(hi). */
    double zero = 0.0, top = DBL_MAX;
    int64_t lo, hi;
    memcpy(&lo, &zero, sizeof lo);
    memcpy(&hi, &top, sizeof hi);
    while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2;
        double p;
        memcpy(&p, &mid, sizeof p);
        if (shm_weight(p, exponent) <= w_max)
            lo = mid;
        else
            hi = mid;
    }
    double limit;
    memcpy(&limit, &lo, sizeof limit);
    return limit;
}

int shm_prioritized_insert(shm_prioritized *s, const int64_t *slots, const double *priorities,
                           int64_t n) {
    int rc = shm_sumtree_set_weights(&s->tree, slots, n, priorities, s->exponent);
    if (rc != SHM_OK)
        return rc;
    return shm_dense_insert(&s->items, slots, n);
}

int shm_prioritized_update(shm_prioritized *s, const int64_t *slots, const double *priorities,
                           int64_t n) {
    return shm_sumtree_set_weights(&s->tree, slots, n, priorities, s->exponent);
}

int shm_prioritized_remove(shm_prioritized *s, const int64_t *slots, int64_t n) {
    int rc = shm_dense_remove(&s->items, slots, n);
    if (rc != SHM_OK)
        return rc;
    const double zero = 0.0;
    return shm_sumtree_set(&s->tree, slots, n, &zero, 1);
}

int shm_prioritized_sample(const shm_prioritized *s, const double *u, int64_t n, int64_t *slots,
                           double *prob) {
    if (n <= 0)
        return SHM_OK;
    int64_t count = shm_dense_count(&s->items);
    if (count < 0)
        return (int)count;
    double total = shm_sumtree_total(&s->tree);
    if (!(total >= 0.0 && total <= DBL_MAX)) /* NaN, negative or infinite: rebuild the tree */
        return SHM_ECORRUPT;
    if (total == 0.0) { /* every weight 0: uniform among the items */
        int rc = shm_dense_draw(&s->items, u, n, slots);
        if (rc != SHM_OK)
            return rc;
        for (int64_t i = 0; i < n; i++)
            prob[i] = 1.0 / (double)count;
        return SHM_OK;
    }
    int rc = shm_sumtree_sample(&s->tree, u, n, slots); /* grouped draws: see sumtree.c */
    if (rc != SHM_OK)
        return rc;
    const double *leaves = s->tree.tree + s->tree.capacity;
    for (int64_t i = 0; i < n; i++) {
        /* weight > 0, so weight/total > 0 unless it underflows: raised to the smallest normal
         * so that 1/prob (an importance weight) stays finite */
        double p = leaves[slots[i]] / total;
        prob[i] = p > DBL_MIN ? p : DBL_MIN;
    }
    return SHM_OK;
}

/* The rare path of victims: k distinct uniform picks among the members that weigh 0 (those
 * picked already weigh > 0 once restored, so are not among them). */
static int zero_weight_picks(shm_prioritized *s, int64_t count, const double *u, int64_t k,
                             int64_t *out) {
    const double *leaves = s->tree.tree + s->tree.capacity;
    int64_t *cand = malloc((size_t)(count > 0 ? count : 1) * sizeof *cand);
    if (cand == NULL)
        return SHM_ENOMEM;
    int64_t z = 0;
    for (int64_t i = 0; i < count; i++) {
        int64_t slot = shm_load_relaxed(&s->items.live[i]);
        if (slot < 0 || slot >= s->items.num_slots || slot >= s->tree.num_leaves) {
            free(cand);
            return SHM_ECORRUPT;
        }
        if (!(leaves[slot] > 0.0))
            cand[z++] = slot;
    }
    if (k > z) { /* more members weigh > 0 than the tree's draws found */
        free(cand);
        return SHM_ECORRUPT;
    }
    for (int64_t i = 0; i < k; i++) { /* the partial Fisher-Yates of shm_dense_draw_distinct */
        int64_t m = z - i;
        int64_t j = shm_scale_uniform(u[i], m);
        int64_t a = cand[j];
        cand[j] = cand[m - 1];
        cand[m - 1] = a;
        out[i] = a;
    }
    free(cand);
    return SHM_OK;
}

int shm_prioritized_victims(shm_prioritized *s, const double *u, int64_t n, int64_t *out) {
    if (n <= 0)
        return SHM_OK;
    int64_t count = shm_dense_count(&s->items);
    if (count < 0)
        return (int)count;
    if (n > count)
        return SHM_EINVAL;
    double small[256]; /* the common eviction is a few items: no allocation for it */
    double *saved = n <= 256 ? small : malloc((size_t)n * sizeof *saved);
    if (saved == NULL)
        return SHM_ENOMEM;
    double *leaves = s->tree.tree + s->tree.capacity;
    const double zero = 0.0;
    int rc = SHM_OK;
    int64_t picked = 0;
    while (picked < n && shm_sumtree_total(&s->tree) > 0.0) {
        int64_t leaf = shm_sumtree_draw(&s->tree, u[picked]);
        if (leaf < 0) {
            rc = (int)leaf;
            break;
        }
        /* weight on a slot not in the set (or beyond it: a caller's mismatched arrays) */
        if (leaf >= s->items.num_slots || !shm_dense_contains(&s->items, count, leaf)) {
            rc = SHM_ECORRUPT;
            break;
        }
        saved[picked] = leaves[leaf];
        out[picked++] = leaf;
        shm_sumtree_set(&s->tree, &leaf, 1, &zero, 1); /* a leaf in range: cannot fail */
    }
    /* Restore them in one batched set (the picks are distinct leaves; any order gives the same
     * bits: every node is recomputed from its children). */
    if (picked > 0)
        shm_sumtree_set(&s->tree, out, picked, saved, picked);
    if (saved != small)
        free(saved);
    if (rc == SHM_OK && picked < n)
        rc = zero_weight_picks(s, count, u + picked, n - picked, out + picked);
    return rc;
}

void shm_prioritized_clear(shm_prioritized *s) {
    shm_sumtree_clear(&s->tree);
    shm_dense_clear(&s->items);
}

int shm_prioritized_rebuild(shm_prioritized *s, const int64_t *slots, const double *priorities,
                            int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (slots[i] < 0 || slots[i] >= s->tree.num_leaves)
            return SHM_EINVAL;
    shm_sumtree_clear(&s->tree);
    for (int64_t i = 0; i < n; i++)
        s->tree.tree[s->tree.capacity + slots[i]] = shm_weight(priorities[i], s->exponent);
    shm_sumtree_recompute(&s->tree);
    return shm_dense_rebuild(&s->items, slots, n);
}
