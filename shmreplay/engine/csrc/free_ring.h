/* The free-slot ring's one rule, for every push (the daemon's eviction in commit.c, a sampler's
 * release in sample.c; TableCore._free_push follows it in Python): the ring has num_slots
 * entries, FREE_TAIL counts every push ever made, and entry i lives at i % num_slots.
 *
 * FREE_TAIL is read from shared memory: any value. A tail outside 0..INT64_MAX - num_slots is
 * corrupt (a negative one would need Python's % to find a position, a huge one would overflow
 * after the push): the pusher checks it BEFORE it changes any slot's state, and refuses with
 * SHM_ECORRUPT, so that the caller's repair rebuilds the ring from the slots' states. Mutex held.
 */
#ifndef SHM_FREE_RING_H
#define SHM_FREE_RING_H

#include <stdint.h>

#include "shm_status.h"

static inline int shm_free_tail_fits(int64_t num_slots, int64_t tail) {
    return tail >= 0 && tail <= INT64_MAX - num_slots;
}

/* Push slots[0..n) (each in 0..num_slots-1: the caller's check; n <= num_slots) at *free_tail,
 * then store the tail + n: the entries first, the tail after (the lease, under the mutex, reads
 * up to the tail). SHM_ECORRUPT, with nothing written, for a tail that does not fit. */
static inline int shm_free_push_ring(int64_t *free_ring, int64_t num_slots, int64_t *free_tail,
                                     const int64_t *slots, int64_t n) {
    int64_t tail = *free_tail;
    if (n < 0 || n > num_slots || !shm_free_tail_fits(num_slots, tail))
        return SHM_ECORRUPT;
    if (n == 0)
        return SHM_OK;
    int64_t pos = tail % num_slots; /* tail >= 0: one division, not one per slot */
    for (int64_t i = 0; i < n; i++) {
        free_ring[pos] = slots[i];
        pos = pos + 1 == num_slots ? 0 : pos + 1;
    }
    *free_tail = tail + n;
    return SHM_OK;
}

#endif
