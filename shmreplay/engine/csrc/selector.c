/* The selector dispatch (see selector.h). */
#include "selector.h"

#include <math.h>

#include "dense.h"
#include "heap.h"
#include "order.h"
#include "random_selectors.h"
#include "shm_atomics.h"

int shm_selector_insert(const shm_selector *s, const int64_t *slots, const double *priorities,
                        int64_t n) {
    switch (s->kind) {
    case SHM_SEL_UNIFORM:
        return shm_dense_insert(s->impl, slots, n);
    case SHM_SEL_PRIORITIZED:
        return shm_prioritized_insert(s->impl, slots, priorities, n);
    case SHM_SEL_FIFO:
    case SHM_SEL_LIFO:
        return shm_order_insert(s->impl, slots, n);
    case SHM_SEL_HEAP:
        return shm_heap_insert(s->impl, slots, priorities, n);
    }
    return SHM_EINVAL;
}

int shm_selector_remove(const shm_selector *s, const int64_t *slots, int64_t n) {
    switch (s->kind) {
    case SHM_SEL_UNIFORM:
        return shm_dense_remove(s->impl, slots, n);
    case SHM_SEL_PRIORITIZED:
        return shm_prioritized_remove(s->impl, slots, n);
    case SHM_SEL_FIFO:
    case SHM_SEL_LIFO:
        return shm_order_remove(s->impl, slots, n);
    case SHM_SEL_HEAP:
        return shm_heap_remove(s->impl, slots, n);
    }
    return SHM_EINVAL;
}

int shm_selector_draws(const shm_selector *s) {
    return s->kind == SHM_SEL_UNIFORM || s->kind == SHM_SEL_PRIORITIZED;
}

int shm_selector_victims(const shm_selector *s, const double *u, int64_t n, int64_t *out,
                         int64_t *got) {
    int rc = SHM_EINVAL;
    *got = 0;
    switch (s->kind) {
    case SHM_SEL_UNIFORM:
        rc = shm_dense_draw_distinct(s->impl, u, n, out);
        break;
    case SHM_SEL_PRIORITIZED:
        rc = shm_prioritized_victims(s->impl, u, n, out);
        break;
    case SHM_SEL_FIFO:
        return shm_order_first_fifo(s->impl, n, out, got);
    case SHM_SEL_LIFO:
        return shm_order_first_lifo(s->impl, n, out, got);
    case SHM_SEL_HEAP:
        return shm_heap_first(s->impl, n, out, got);
    }
    if (rc == SHM_OK)
        *got = n;
    return rc;
}

/* A dense set's count against the table's size (Selector.check's DenseSet rule). The count is
 * read once: the set's own functions check its range again when they use it. */
static int check_dense(const shm_dense *d, int64_t size, shm_sel_problem *why) {
    int64_t count = shm_load_relaxed(d->count);
    if (count == size)
        return SHM_OK;
    why->what = SHM_SEL_BAD_COUNT, why->a = count, why->b = size;
    return SHM_ECORRUPT;
}

int shm_selector_check(const shm_selector *s, int64_t size, shm_sel_problem *why) {
    why->what = SHM_SEL_BAD_NONE;
    switch (s->kind) {
    case SHM_SEL_UNIFORM:
        return check_dense(s->impl, size, why);
    case SHM_SEL_PRIORITIZED: {
        const shm_prioritized *p = s->impl;
        double total = shm_sumtree_total(&p->tree);
        if (!(total >= 0.0 && total < INFINITY)) { /* NaN fails both */
            why->what = SHM_SEL_BAD_TOTAL, why->p = total;
            return SHM_ECORRUPT;
        }
        return check_dense(&p->items, size, why);
    }
    case SHM_SEL_FIFO:
    case SHM_SEL_LIFO: {
        const shm_order *o = s->impl;
        int64_t head = shm_load_relaxed(o->head), tail = shm_load_relaxed(o->tail);
        /* tail - head compared without overflow: both bounded first. */
        if (head < 0 || tail < head || tail - head < size || tail - head > o->len) {
            why->what = SHM_SEL_BAD_ENDS, why->a = head, why->b = tail, why->c = o->len;
            why->d = size;
            return SHM_ECORRUPT;
        }
        return SHM_OK;
    }
    case SHM_SEL_HEAP: {
        const shm_heap *h = s->impl;
        int64_t clock = shm_load_relaxed(h->clock);
        if (clock < 0 || clock > SHM_SEL_MAX_CLOCK) {
            why->what = SHM_SEL_BAD_CLOCK, why->a = clock;
            return SHM_ECORRUPT;
        }
        return SHM_OK;
    }
    }
    return SHM_EINVAL;
}
