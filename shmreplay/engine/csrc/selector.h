/* One dispatch over the selectors' C structs, so that the daemon's commit round inserts, removes
 * and evicts through the table's sampler and remover without Python. Each kind's own functions
 * do the work (dense.h, random_selectors.h, order.h, heap.h); this file only picks one.
 *
 * Uniforms: only the random kinds take them (shm_selector_draws): Uniform victims are the partial
 * Fisher-Yates of shm_dense_draw_distinct with u[i] for the i-th victim, Prioritized ones
 * shm_prioritized_victims; Fifo, Lifo and the heaps take none (their victims are their first
 * items in their order). No Python types here.
 */
#ifndef SHM_SELECTOR_H
#define SHM_SELECTOR_H

#include <stdint.h>

#include "shm_status.h"

enum {
    SHM_SEL_UNIFORM = 1, /* impl: shm_dense */
    SHM_SEL_PRIORITIZED, /* impl: shm_prioritized */
    SHM_SEL_FIFO,        /* impl: shm_order, read from the head */
    SHM_SEL_LIFO,        /* impl: shm_order, read from the tail */
    SHM_SEL_HEAP,        /* impl: shm_heap (MinHeap or MaxHeap: its sign) */
};

typedef struct {
    int kind;
    void *impl; /* the kind's struct, owned by its Python object (kept alive by the holder) */
} shm_selector;

/* What shm_selector_check found wrong (SHM_SEL_BAD_*), with the values it read. */
enum {
    SHM_SEL_BAD_NONE = 0,
    SHM_SEL_BAD_COUNT,  /* a = the set's count, b = the table's size */
    SHM_SEL_BAD_TOTAL,  /* p = the sum-tree total */
    SHM_SEL_BAD_ENDS,   /* a = head, b = tail, c = ring length, d = size */
    SHM_SEL_BAD_CLOCK,  /* a = clock */
};

typedef struct {
    int what;
    int64_t a, b, c, d;
    double p;
} shm_sel_problem;

/* The heap's largest plausible clock (heap.py's MAX_CLOCK). */
#define SHM_SEL_MAX_CLOCK ((int64_t)1 << 62)

/* New items in insertion order with their (checked) priorities. */
int shm_selector_insert(const shm_selector *s, const int64_t *slots, const double *priorities,
                        int64_t n);

/* Forget distinct present items. */
int shm_selector_remove(const shm_selector *s, const int64_t *slots, int64_t n);

/* Whether victims take uniforms (one per victim). */
int shm_selector_draws(const shm_selector *s);

/* n distinct items to evict (n <= the items present) into out, u[i] for the i-th when the kind
 * draws; *got how many (the ordered kinds return fewer when their structure holds fewer). */
int shm_selector_victims(const shm_selector *s, const double *u, int64_t n, int64_t *out,
                         int64_t *got);

/* The O(1) checks of Selector.check for a table of size items: SHM_OK, or SHM_ECORRUPT with
 * *why filled. */
int shm_selector_check(const shm_selector *s, int64_t size, shm_sel_problem *why);

#endif
