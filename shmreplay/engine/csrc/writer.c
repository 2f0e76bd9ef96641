/* A client's insert path (see writer.h and docs/memory-ordering.md for who owns which word). */
#include "writer.h"

#include <stdlib.h>
#include <string.h>

#include "shm_atomics.h"

#define CHAN(w, word) (&(w)->chan[(word) * SHM_LINE])
#define CTRL(w, word) (&(w)->ctrl[(word) * SHM_LINE])

int shm_writer_take(shm_writer *w, int64_t n, int64_t *out, int64_t *k) {
    if (w->nspare > 0) {
        int64_t m = 0;
        while (m < n && w->nspare > 0)
            out[m++] = w->spare[--w->nspare];
        *k = m;
        return SHM_WRITER_OK;
    }
    int64_t head = w->lease_head;
    if (head == w->lease_tail) {
        /* A tail behind our head or more than a ring ahead is garbage: CORRUPT. */
        if (shm_writer_poll_lease(w) != SHM_WRITER_OK)
            return SHM_WRITER_CORRUPT;
        if (w->lease_tail == head)
            return SHM_WRITER_EMPTY;
    }
    int64_t avail = w->lease_tail - head;
    int64_t m = n < avail ? n : avail;
    for (int64_t i = 0; i < m; i++) {
        /* Plain reads: ordered after the acquire of LEASE_TAIL above (or an earlier one). */
        int64_t slot = w->lease[(uint64_t)(head + i) % SHM_LEASE_CAPACITY];
        if (slot < 0 || slot >= w->num_slots)
            return SHM_WRITER_CORRUPT; /* nothing consumed: the daemon's entry is garbage */
        out[i] = slot;
    }
    w->lease_head = head + m;
    /* LEASE_HEAD is ours: released after reading the entries, so the daemon (which acquires
     * it) never overwrites an entry we have not read yet. */
    shm_store_release(CHAN(w, SHM_CHAN_LEASE_HEAD), head + m);
    *k = m;
    return SHM_WRITER_OK;
}

int64_t shm_writer_begin(shm_writer *w, int64_t slot) {
    /* gen[slot] is ours while the slot is leased to us: a relaxed load reads our own store. */
    int64_t g = shm_load_relaxed(&w->gen[slot]);
    shm_store_relaxed(&w->gen[slot], g + 1); /* odd: being written */
    /* Orders the odd generation before the row stores: a sampler whose copy saw any new byte
     * sees gen moved after its acquire fence. */
    shm_fence_release();
    return g;
}

void shm_writer_end(shm_writer *w, int64_t slot, int64_t g, double priority, int64_t episode,
                    int32_t first, int32_t last) {
    w->priority[slot] = priority;
    w->episode[slot] = episode;
    w->steps[2 * slot] = first;
    w->steps[2 * slot + 1] = last;
    /* Even: complete. Released after the row, priority and episode, which the daemon reads
     * after acquiring PUB_TAIL (published later) and samplers read under the mutex. */
    shm_store_release(&w->gen[slot], g + 2);
}

int shm_writer_poll_committed(shm_writer *w) {
    /* PUB_HEAD is the daemon's: acquiring it orders our reuse of the entries it consumed. */
    int64_t head = shm_load_acquire(CHAN(w, SHM_CHAN_PUB_HEAD));
    if (head > w->pub_tail || w->pub_tail - head > SHM_PUBLISH_CAPACITY)
        return SHM_WRITER_CORRUPT;
    w->pub_head = head;
    return SHM_WRITER_OK;
}

int shm_writer_poll_lease(shm_writer *w) {
    /* LEASE_TAIL is the daemon's: acquiring it makes the entries it wrote before visible. */
    int64_t tail = shm_load_acquire(CHAN(w, SHM_CHAN_LEASE_TAIL));
    if (tail < w->lease_head || tail - w->lease_head > SHM_LEASE_CAPACITY)
        return SHM_WRITER_CORRUPT;
    w->lease_tail = tail;
    return SHM_WRITER_OK;
}

int shm_writer_room(shm_writer *w, int64_t k) {
    if (w->pub_tail + k - w->pub_head <= SHM_PUBLISH_CAPACITY)
        return SHM_WRITER_OK;
    if (shm_writer_poll_committed(w) != SHM_WRITER_OK)
        return SHM_WRITER_CORRUPT;
    return w->pub_tail + k - w->pub_head <= SHM_PUBLISH_CAPACITY ? SHM_WRITER_OK
                                                                         : SHM_WRITER_FULL;
}

void shm_writer_publish(shm_writer *w, const int64_t *slots, int64_t k) {
    int64_t tail = w->pub_tail;
    for (int64_t i = 0; i < k; i++)
        w->publish[(uint64_t)(tail + i) % SHM_PUBLISH_CAPACITY] = slots[i];
    w->pub_tail = tail + k;
    /* PUB_TAIL is ours: released after the entries and (earlier) the rows' even generations. */
    shm_store_release(CHAN(w, SHM_CHAN_PUB_TAIL), tail + k);
}

int shm_writer_table_open(const shm_writer *w, int64_t daemon_pid, int64_t pid) {
    /* Hints read relaxed (the daemon's words, and the channel's PID the daemon clears when it
     * cuts us off): a stale read only delays the refusal by one insert, as in Python. */
    const int64_t *ctrl = w->ctrl;
    return shm_load_relaxed(&ctrl[SHM_CTRL_SHUTDOWN * SHM_LINE]) == 0 &&
           shm_load_relaxed(&ctrl[SHM_CTRL_DAEMON_PID * SHM_LINE]) == daemon_pid &&
           shm_load_relaxed(&ctrl[SHM_CTRL_TABLE_STATE * SHM_LINE]) == 0 &&
           shm_load_relaxed(&w->chan[SHM_CHAN_PID * SHM_LINE]) == pid;
}

int shm_writer_lease_low(shm_writer *w) {
    if (w->lease_tail - w->lease_head > SHM_LEASE_LOW_WATER)
        return 0;
    /* The cached tail is only refreshed when the ring runs empty: the daemon has most likely
     * refilled it since. Re-read LEASE_TAIL (acquire, as take does) before calling it low, or
     * the last LOW_WATER items of every cached window would each post the napping daemon. A
     * garbage tail leaves the cache as it was (take reports it) and counts as low. */
    if (shm_writer_poll_lease(w) != SHM_WRITER_OK)
        return 1;
    return w->lease_tail - w->lease_head <= SHM_LEASE_LOW_WATER;
}

int shm_writer_wake(shm_writer *w, int force) {
    /* Dekker with the daemon: we stored PUB_TAIL, it stores DAEMON_SLEEPING; each fences, then
     * loads the other's word, so at least one of us sees the other's store. */
    shm_fence_seq_cst();
    int64_t *sleeping_word = CTRL(w, SHM_CTRL_DAEMON_SLEEPING); /* the daemon's (we clear it) */
    int64_t sleeping = shm_load_relaxed(sleeping_word);
    if (force || sleeping == SHM_SLEEP_IDLE ||
        (sleeping != SHM_SLEEP_AWAKE &&
         (shm_writer_lease_low(w) ||
          /* SAMPLER_WAITING is a sampler's hint: it waits for what we just published */
          shm_load_relaxed(CTRL(w, SHM_CTRL_SAMPLER_WAITING)) != 0))) {
        shm_store_relaxed(sleeping_word, SHM_SLEEP_AWAKE);
        return 1;
    }
    return 0;
}

int shm_writer_insert(shm_writer *w, const void *const *values, double priority,
                      int64_t episode, int32_t first, int32_t last, uint64_t *key, int *wake) {
    int rc = shm_writer_room(w, 1);
    if (rc != SHM_WRITER_OK)
        return rc;
    int64_t slot;
    int64_t k;
    rc = shm_writer_take(w, 1, &slot, &k);
    if (rc != SHM_WRITER_OK)
        return rc;
    int64_t g = shm_writer_begin(w, slot);
    for (int i = 0; i < w->ncols; i++)
        memcpy(w->cols[i].base + (size_t)slot * w->cols[i].rowsize, values[i],
               w->cols[i].rowsize);
    shm_writer_end(w, slot, g, priority, episode, first, last);
    *key = w->key[slot]; /* set by the daemon when it leased the slot */
    shm_writer_publish(w, &slot, 1);
    *wake = shm_writer_wake(w, 0);
    return SHM_WRITER_OK;
}

/* Items [at, at + k) of a batch into slots[0..k) under the seqlock: generations odd, the rows,
 * priorities (priorities[at + j], or ``priority`` for all when NULL), episodes (zeros when
 * NULL), keys_out[at + j], generations even. The one row writer of both batch paths. */
static void write_rows(shm_writer *w, const int64_t *slots, int64_t k, int64_t at,
                       const char *const *srcs, const double *priorities, double priority,
                       const int64_t *episodes, uint64_t *keys_out) {
    for (int64_t j = 0; j < k; j++) /* ours while leased: relaxed */
        shm_store_relaxed(&w->gen[slots[j]], shm_load_relaxed(&w->gen[slots[j]]) + 1);
    shm_fence_release(); /* every odd generation before any row store (seqlock) */
    for (int i = 0; i < w->ncols; i++) {
        size_t size = w->cols[i].rowsize;
        char *base = w->cols[i].base;
        const char *src = srcs[i] + (size_t)at * size;
        for (int64_t j = 0; j < k; j++)
            memcpy(base + (size_t)slots[j] * size, src + (size_t)j * size, size);
    }
    for (int64_t j = 0; j < k; j++) {
        int64_t s = slots[j];
        w->priority[s] = priorities != NULL ? priorities[at + j] : priority;
        if (episodes != NULL) {
            const int64_t *e = episodes + 3 * (at + j);
            w->episode[s] = e[0];
            w->steps[2 * s] = (int32_t)e[1];
            w->steps[2 * s + 1] = (int32_t)e[2];
        } else {
            w->episode[s] = 0;
            w->steps[2 * s] = 0;
            w->steps[2 * s + 1] = 0;
        }
        keys_out[at + j] = w->key[s];
    }
    for (int64_t j = 0; j < k; j++) /* even: complete, released after the rows */
        shm_store_release(&w->gen[slots[j]], shm_load_relaxed(&w->gen[slots[j]]) + 1);
}

void shm_writer_write_batch(shm_writer *w, const int64_t *slots, int64_t k,
                            const char *const *srcs, const double *priorities,
                            const int64_t *episodes, uint64_t *keys_out) {
    write_rows(w, slots, k, 0, srcs, priorities, 0.0, episodes, keys_out);
}

int shm_writer_abandon(shm_writer *w, int64_t slot, int64_t g) {
    shm_store_release(&w->gen[slot], g + 2); /* even: nothing half-written stays visible */
    if (w->nspare == w->spare_cap) {
        int64_t cap = w->spare_cap ? 2 * w->spare_cap : 16;
        int64_t *grown = realloc(w->spare, (size_t)cap * sizeof(int64_t));
        if (grown == NULL)
            return -1;
        w->spare = grown;
        w->spare_cap = cap;
    }
    w->spare[w->nspare++] = slot;
    return 0;
}

void shm_writer_free(shm_writer *w) {
    free(w->spare);
    w->spare = NULL;
    w->nspare = w->spare_cap = 0;
}

int64_t shm_writer_insert_batch(shm_writer *w, const char *const *srcs, int64_t n,
                                int64_t start, const double *priorities, double priority,
                                const int64_t *episodes, uint64_t *keys_out, int *wake,
                                int64_t *scratch) {
    *wake = 0;
    int64_t done = start;
    while (done < n) {
        int64_t want = n - done;
        if (want > SHM_PUBLISH_CAPACITY / 2)
            want = SHM_PUBLISH_CAPACITY / 2;
        int rc = shm_writer_room(w, want);
        if (rc == SHM_WRITER_CORRUPT)
            return SHM_WRITER_CORRUPT;
        if (rc == SHM_WRITER_FULL)
            break;
        int64_t k;
        rc = shm_writer_take(w, want, scratch, &k);
        if (rc == SHM_WRITER_CORRUPT)
            return SHM_WRITER_CORRUPT;
        if (rc == SHM_WRITER_EMPTY)
            break;
        write_rows(w, scratch, k, done, srcs, priorities, priority, episodes, keys_out);
        shm_writer_publish(w, scratch, k);
        done += k;
        if (shm_writer_wake(w, 0)) {
            *wake = 1;
            break;
        }
    }
    return done;
}
