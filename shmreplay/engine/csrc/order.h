/* The insertion-order ring of Fifo and Lifo (shmreplay/selectors/fifo.py documents it).
 *
 * order[len] holds slots (or SHM_ORDER_HOLE) at ever-growing absolute positions (position % len),
 * pos[slot] a present slot's position, *head and *tail the absolute ends. Removal punches a hole;
 * an insert that would not fit compacts the live entries to positions 0.. first.
 *
 * Everything here is read and written under the table mutex; the arrays live in memory every
 * process of the group can write, so every slot and position read from them is range-checked:
 * SHM_ORDER_ECORRUPT, never an access outside the arrays. No Python types here.
 */
#ifndef SHM_ORDER_H
#define SHM_ORDER_H

#include <stdint.h>

/* Status codes of the ordered concern (the same values as the random concern's SHM_*). */
#include "shm_status.h"

/* The order ring's and the heap's statuses are the engine's (shm_status.h). */
enum {
    SHM_ORDER_OK = SHM_OK,
    SHM_ORDER_EINVAL = SHM_EINVAL,
    SHM_ORDER_ECORRUPT = SHM_ECORRUPT,
    SHM_ORDER_ENOMEM = SHM_ENOMEM,
};

#define SHM_ORDER_HOLE (-1)

typedef struct {
    int64_t *order;    /* len int64 (shared) */
    int64_t len;       /* 2 * num_slots */
    int64_t *pos;      /* num_slots int64 (shared) */
    int64_t num_slots;
    int64_t *head;     /* absolute position of the first entry (shared) */
    int64_t *tail;     /* absolute position after the last entry (shared) */
} shm_order;

/* Append slots[0..k) in order (compacting first when they would not fit). EINVAL for a slot
 * outside [0, num_slots) or k > len, ECORRUPT (nothing changed) for bad ends or entries, or for
 * more live entries than leave room for k. */
int shm_order_insert(shm_order *o, const int64_t *slots, int64_t k);

/* Punch the holes of present, distinct slots. ECORRUPT (nothing changed) when pos/order say a
 * slot is not where it should be; ENOMEM when a batch longer than 512 finds no scratch memory. */
int shm_order_remove(shm_order *o, const int64_t *slots, int64_t k);

/* The first n live entries from the head (Fifo: oldest first) into out; *got receives their
 * number (fewer when the ring holds fewer). Leading holes are dropped for good (head moves to the
 * first live entry). ECORRUPT for bad ends or a live entry outside [0, num_slots). */
int shm_order_first_fifo(shm_order *o, int64_t n, int64_t *out, int64_t *got);

/* The same from the tail (Lifo: newest first), dropping the trailing holes for good. */
int shm_order_first_lifo(shm_order *o, int64_t n, int64_t *out, int64_t *got);

/* Forget every item (head = tail = 0). */
void shm_order_clear(shm_order *o);

/* clear, then insert slots (the items present, in insertion order). */
int shm_order_rebuild(shm_order *o, const int64_t *slots, int64_t k);

#endif
