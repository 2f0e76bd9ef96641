/* The insertion-order ring of Fifo and Lifo: see order.h. */
#include "order.h"

#include <stdlib.h>

#include "shm_atomics.h"

/* Batches up to this long keep their scratch on the stack (the selectors' usual 256). */
#define STACK_BATCH 512

/* Ends beyond this are corrupt: a real table inserts far fewer items in its life, and the bound
 * keeps tail + k and positions from overflowing. */
#define MAX_POSITION ((int64_t)1 << 62)

static inline int64_t ring_index(const shm_order *o, int64_t position) {
    int64_t i = position % o->len;
    return i < 0 ? i + o->len : i;
}

/* Every word of the ring is read once (shm_load_relaxed) into a local that is checked and then
 * used: another process may write them at any time, and a plain load may be repeated by the
 * compiler, which would use a value that was never checked. */
static inline int64_t entry_at(const shm_order *o, int64_t position) {
    return shm_load_relaxed(&o->order[ring_index(o, position)]);
}

/* Read the ends; ECORRUPT unless 0 <= head <= tail <= head + len and tail is not absurd. */
static int read_ends(const shm_order *o, int64_t *head, int64_t *tail) {
    int64_t h = shm_load_relaxed(o->head), t = shm_load_relaxed(o->tail);
    if (h < 0 || t < h || t - h > o->len || t > MAX_POSITION)
        return SHM_ORDER_ECORRUPT;
    *head = h;
    *tail = t;
    return SHM_ORDER_OK;
}

/* Move the live entries to positions 0.. in order; ECORRUPT (nothing changed) when an entry is
 * neither a hole nor a slot, or when room more entries would not fit after them (live slots
 * repeated: a consistent ring holds at most num_slots, half its length). */
static int compact(shm_order *o, int64_t head, int64_t tail, int64_t room, int64_t *new_tail) {
    int64_t count = tail - head, live = 0;
    int64_t *tmp = malloc((size_t)(count > 0 ? count : 1) * sizeof *tmp);
    if (tmp == NULL)
        return SHM_ORDER_ENOMEM;
    /* A copy first: writing in place would overwrite unread entries when the run wraps. */
    for (int64_t p = head; p < tail; p++) {
        int64_t s = entry_at(o, p);
        if (s == SHM_ORDER_HOLE)
            continue;
        if (s < 0 || s >= o->num_slots) {
            free(tmp);
            return SHM_ORDER_ECORRUPT;
        }
        tmp[live++] = s;
    }
    if (live + room > o->len) {
        free(tmp);
        return SHM_ORDER_ECORRUPT;
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
        rc = compact(o, head, tail, k, &tail);
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
    /* Check every slot before punching any hole, so that an error changes nothing; the ring
     * indices checked are the ones punched (pos is read once). */
    int64_t stack_at[STACK_BATCH];
    int64_t *at = k <= STACK_BATCH ? stack_at : malloc((size_t)k * sizeof *at);
    if (at == NULL)
        return SHM_ORDER_ENOMEM;
    rc = SHM_ORDER_OK;
    for (int64_t i = 0; i < k && rc == SHM_ORDER_OK; i++) {
        int64_t p = shm_load_relaxed(&o->pos[slots[i]]);
        if (p < head || p >= tail || entry_at(o, p) != slots[i])
            rc = SHM_ORDER_ECORRUPT;
        at[i] = ring_index(o, p);
    }
    if (rc == SHM_ORDER_OK)
        for (int64_t i = 0; i < k; i++)
            o->order[at[i]] = SHM_ORDER_HOLE;
    if (at != stack_at)
        free(at);
    return rc;
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
    while (p < tail && entry_at(o, p) == SHM_ORDER_HOLE)
        p++;
    if (n > 0 && p != head)
        *o->head = p;
    for (; p < tail && m < n; p++) {
        int64_t s = entry_at(o, p);
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
    while (p > head && entry_at(o, p - 1) == SHM_ORDER_HOLE)
        p--;
    if (n > 0 && p != tail)
        *o->tail = p;
    for (; p > head && m < n; p--) {
        int64_t s = entry_at(o, p - 1);
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
