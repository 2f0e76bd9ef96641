/* The random selectors: Uniform (a dense set) and Prioritized (a sum-tree of weights p^α and a
 * dense set of the items, for the all-zero fallback and eviction). Plain C over pointers into the
 * table's shared arrays, called under the table mutex; no Python types, so that the daemon's
 * commit round can call insert/remove/victims directly. Every function returns SHM_OK or a status
 * of sumtree.h.
 *
 * Uniforms: every draw takes one uniform double in [0, 1) from the caller, mapped to an index by
 * shm_scale_uniform (dense.h) or to a leaf by shm_sumtree_draw (sumtree.h).
 */
#ifndef SHM_RANDOM_SELECTORS_H
#define SHM_RANDOM_SELECTORS_H

#include <math.h>
#include <stdint.h>

#include "dense.h"
#include "sumtree.h"

/* The weight of priority p: p when exponent is 1, 0 when p <= 0 (even for exponent 0), else
 * pow(p, exponent). The one weight function: priority limits are computed with it too. */
static inline double shm_weight(double p, double exponent);

/* The largest priority whose weight fits w_max: DBL_MAX when every finite one does, else found
 * by bisection over the float64 bit patterns with shm_weight itself, so that exactly the
 * priorities <= the result have weight <= w_max. */
double shm_priority_limit(double exponent, double w_max);

typedef struct {
    shm_sumtree tree;  /* leaf slot = weight of slot (0 for a slot not in the table) */
    shm_dense items;   /* the items, whatever their weight */
    double exponent;
} shm_prioritized;

/* New items (the slots are not members) with their priorities. */
int shm_prioritized_insert(shm_prioritized *s, const int64_t *slots, const double *priorities,
                           int64_t n);

/* New priorities for members (a repeated slot: the last one wins). */
int shm_prioritized_update(shm_prioritized *s, const int64_t *slots, const double *priorities,
                           int64_t n);

/* Forget distinct members: the set first (SHM_ECORRUPT changes nothing), then their weights. */
int shm_prioritized_remove(shm_prioritized *s, const int64_t *slots, int64_t n);

/* n draws with replacement, one uniform each: slots[i] drawn with weight/total and prob[i] =
 * max(weight/total, DBL_MIN); when the total is not > 0 (every weight 0), uniformly from the set
 * (shm_dense_draw) with prob 1/count. The caller checks the set is not empty. */
int shm_prioritized_sample(const shm_prioritized *s, const double *u, int64_t n, int64_t *slots,
                           double *prob);

/* n distinct members (n <= count), weighted without replacement, u[i] for the i-th victim:
 * while the total is > 0, a sum-tree draw, whose leaf weight is then set to 0; the weights are
 * restored once the n are chosen (the tree ends bit for bit as it was). When fewer than n items
 * weigh > 0, the rest are uniform distinct picks among the zero-weight items, in live order, by
 * the partial Fisher-Yates of dense.h over a scratch list of them in live order, each pick appended
 * as it is made (a rare path: a scan). SHM_ECORRUPT when
 * a drawn leaf is not a member; SHM_EEMPTY when the total is infinite. */
int shm_prioritized_victims(shm_prioritized *s, const double *u, int64_t n, int64_t *out);

/* Forget every item. */
void shm_prioritized_clear(shm_prioritized *s);

/* The items present (insertion order) and their priorities: leaves from scratch, set anew. */
int shm_prioritized_rebuild(shm_prioritized *s, const int64_t *slots, const double *priorities,
                            int64_t n);

static inline double shm_weight(double p, double exponent) {
    if (exponent == 1.0)
        return p;
    return p > 0.0 ? pow(p, exponent) : 0.0;
}

#endif
