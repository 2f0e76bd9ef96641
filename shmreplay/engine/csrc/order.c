/* The insertion-order ring of Fifo and Lifo: see order.h. */
#include "order.h"

#include <stdlib.h>

/* Ends beyond this are corrupt: a real table inserts far fewer items in its life, and the bound
 * keeps tail + k and positions from overflowing. */
#define MAX_POSITION ((int64_t)1 << 62)

static inline int64_t ring_index(const shm_order *o, int64_t position) {
    int64_t i = position % o->len;
    return i < 0 ? i + o->len : i;
}

/* Read the ends; ECORRUPT unless 0 <= head <= tail <= head + len and tail is not absurd. */
static int read_ends(const shm_order *o, int64_t *head, int64_t *tail) {
    int64_t h = *o->head, t = *o->tail;
    if (h < 0 || t < h || t - h > o->len || t > MAX_POSITION)
        return SHM_ORDER_ECORRUPT;
    *head = h;
    *tail = t;
    return SHM_ORDER_OK;
}

/* Move the live entries to positions 0.. in order; ECORRUPT (nothing changed) when an entry is
 * neither a hole nor a slot. */
static int compact(shm_order *o, int64_t head, int64_t tail, int64_t *new_tail) {
    int64_t count = tail - head, live = 0;
    int64_t *tmp = malloc((size_t)(count > 0 ? count : 1) * sizeof *tmp);
    if (tmp == NULL)
        return SHM_ORDER_ENOMEM;
    /* A copy first: writing in place would overwrite unread entries when the run wraps. */
    for (int64_t p = head; p < tail; p++) {
        int64_t s = o->order[ring_index(o, p)];
        if (s == SHM_ORDER_HOLE)
            continue;
        if (s < 0 || s >= o->num_slots) {
            free(tmp);
            return SHM_ORDER_ECORRUPT;
        }
        tmp[live++] = s;
    }
    for (int64_t i = 0; i < live; i++) {
        o->order[i] = tmp[i];
        o->pos[tmp[i]] = i;
    }
    free(tmp);
    *o->head = 0;
    *o->tail = live;
    *new_tail = live;
    return SHM_ORDER_OK;
}

int shm_order_insert(shm_order *o, const int64_t *slots, int64_t k) {
    if (k < 0 || k > o->len)
        return SHM_ORDER_EINVAL;
    for (int64_t i = 0; i < k; i++)
        if (slots[i] < 0 || slots[i] >= o->num_slots)
            return SHM_ORDER_EINVAL;
    if (k == 0)
        return SHM_ORDER_OK;
    int64_t head, tail;
    int rc = read_ends(o, &head, &tail);
    if (rc != SHM_ORDER_OK)
        return rc;
    if (tail - head + k > o->len) {
        rc = compact(o, head, tail, &tail);
        if (rc != SHM_ORDER_OK)
            return rc;
        head = 0;
    }
    int64_t i = ring_index(o, tail);
    for (int64_t j = 0; j < k; j++) {
        o->order[i] = slots[j];
        o->pos[slots[j]] = tail + j;
        if (++i == o->len)
            i = 0;
    }
    *o->tail = tail + k;
    return SHM_ORDER_OK;
}

int shm_order_remove(shm_order *o, const int64_t *slots, int64_t k) {
    for (int64_t i = 0; i < k; i++)
        if (slots[i] < 0 || slots[i] >= o->num_slots)
            return SHM_ORDER_EINVAL;
    if (k == 0)
        return SHM_ORDER_OK;
    int64_t head, tail;
    int rc = read_ends(o, &head, &tail);
    if (rc != SHM_ORDER_OK)
        return rc;
    /* Check every slot before punching any hole, so that an error changes nothing. */
    for (int64_t i = 0; i < k; i++) {
        int64_t p = o->pos[slots[i]];
        if (p < head || p >= tail || o->order[ring_index(o, p)] != slots[i])
            return SHM_ORDER_ECORRUPT;
    }
    for (int64_t i = 0; i < k; i++)
        o->order[ring_index(o, o->pos[slots[i]])] = SHM_ORDER_HOLE;
    return SHM_ORDER_OK;
}

int shm_order_first_fifo(shm_order *o, int64_t n, int64_t *out, int64_t *got) {
    *got = 0;
    if (n < 0)
        return SHM_ORDER_EINVAL;
    int64_t head, tail;
    int rc = read_ends(o, &head, &tail);
    if (rc != SHM_ORDER_OK)
        return rc;
    int64_t m = 0, p = head;
    /* Leading holes: dropped for good, so that the next call starts at a live entry. */
    while (p < tail && o->order[ring_index(o, p)] == SHM_ORDER_HOLE)
        p++;
    if (n > 0 && p != head)
        *o->head = p;
    for (; p < tail && m < n; p++) {
        int64_t s = o->order[ring_index(o, p)];
        if (s == SHM_ORDER_HOLE)
            continue;
        if (s < 0 || s >= o->num_slots)
            return SHM_ORDER_ECORRUPT;
        out[m++] = s;
    }
    *got = m;
    return SHM_ORDER_OK;
}

int shm_order_first_lifo(shm_order *o, int64_t n, int64_t *out, int64_t *got) {
    *got = 0;
    if (n < 0)
        return SHM_ORDER_EINVAL;
    int64_t head, tail;
    int rc = read_ends(o, &head, &tail);
    if (rc != SHM_ORDER_OK)
        return rc;
    int64_t m = 0, p = tail;
    /* Trailing holes: dropped for good (the tail rewinds; no compaction needed for them). */
    while (p > head && o->order[ring_index(o, p - 1)] == SHM_ORDER_HOLE)
        p--;
    if (n > 0 && p != tail)
        *o->tail = p;
    for (; p > head && m < n; p--) {
        int64_t s = o->order[ring_index(o, p - 1)];
        if (s == SHM_ORDER_HOLE)
            continue;
        if (s < 0 || s >= o->num_slots)
            return SHM_ORDER_ECORRUPT;
        out[m++] = s;
    }
    *got = m;
    return SHM_ORDER_OK;
}

void shm_order_clear(shm_order *o) {
    *o->head = 0;
    *o->tail = 0;
}

int shm_order_rebuild(shm_order *o, const int64_t *slots, int64_t k) {
    shm_order_clear(o);
    return shm_order_insert(o, slots, k);
}
