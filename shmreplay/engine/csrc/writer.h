/* A client's insert path: take leased slots, write rows under the slot seqlock, publish.
 *
 * The contract with the daemon is /work/briefs12/protocol.md (docs/memory-ordering.md): the
 * daemon fills this channel's lease ring and store-releases LEASE_TAIL; the writer consumes it
 * and store-releases LEASE_HEAD; the writer fills the publish ring and store-releases PUB_TAIL;
 * the daemon commits and store-releases PUB_HEAD. Every index read from shared memory is range
 * checked before it addresses memory: any process of the group can write any byte.
 */
#ifndef SHM_WRITER_H
#define SHM_WRITER_H

#include <stddef.h>
#include <stdint.h>

#include "shm_layout.h"

/* Results. */
enum {
    SHM_WRITER_OK = 0,
    SHM_WRITER_EMPTY = 1,   /* no leased slot: the caller waits for the daemon, then retries */
    SHM_WRITER_FULL = 2,    /* the publish ring has no room: wait for the daemon's commits */
    SHM_WRITER_CORRUPT = -1 /* shared memory holds an impossible ring position or slot */
};

typedef struct {
    char *base;     /* row 0 of the field's data array */
    size_t rowsize; /* bytes of one row (itemsize * product of the field's shape) */
} shm_writer_column;

typedef struct {
    int64_t *chan;    /* the channel's control lines: word w at chan[w * SHM_LINE] */
    int64_t *ctrl;    /* the table's control lines: word w at ctrl[w * SHM_LINE] */
    int64_t *lease;   /* the channel's lease ring (SHM_LEASE_CAPACITY entries) */
    int64_t *publish; /* the channel's publish ring (SHM_PUBLISH_CAPACITY entries) */
    int64_t *gen;     /* meta.gen */
    double *priority; /* meta.priority */
    int64_t *episode; /* meta.episode */
    int32_t *steps;   /* meta.episode_steps, 2 per slot */
    uint64_t *key;    /* meta.key */
    int64_t num_slots;
    /* Local copies of the ring positions (this writer owns LEASE_HEAD and PUB_TAIL). */
    int64_t lease_head, lease_tail, pub_head, pub_tail;
    int ncols;
    shm_writer_column *cols;
    /* Slots of abandoned reservations: still leased to us, taken before the lease ring. */
    int64_t *spare;
    int64_t nspare, spare_cap;
} shm_writer;

/* Seqlock end of an abandoned slot (generation g + 2, released) kept for the next take; -1 when
 * out of memory (the slot is then lost to this writer until the daemon reclaims the channel). */
int shm_writer_abandon(shm_writer *w, int64_t slot, int64_t g);

/* Frees what shm_writer_abandon allocated. */
void shm_writer_free(shm_writer *w);

/* Up to n (>= 1) leased slots into out[] (abandoned ones first, the last abandoned first);
 * *k gets how many (>= 1 on OK). EMPTY when none are leased (LEASE_TAIL re-read), CORRUPT for
 * a tail out of range or a slot index outside the table (nothing is consumed then). */
int shm_writer_take(shm_writer *w, int64_t n, int64_t *out, int64_t *k);

/* Seqlock begin of a slot this writer holds leased: makes its generation odd and orders that
 * before the row stores that follow. Returns the generation it found. */
int64_t shm_writer_begin(shm_writer *w, int64_t slot);

/* Seqlock end: priority and episode, then the even generation g + 2 (store-release). */
void shm_writer_end(shm_writer *w, int64_t slot, int64_t g, double priority, int64_t episode,
                    int32_t first, int32_t last);

/* Room for k (<= PUBLISH_CAPACITY) more entries in the publish ring (PUB_HEAD re-read if
 * needed): OK, FULL, or CORRUPT for a head behind the capacity or ahead of our tail. */
int shm_writer_room(shm_writer *w, int64_t k);

/* Append k slots to the publish ring and store-release PUB_TAIL; the caller checked room. */
void shm_writer_publish(shm_writer *w, const int64_t *slots, int64_t k);

/* PUB_HEAD acquired into w->pub_head: OK, or CORRUPT (a head ahead of our tail or more than
 * the ring behind it). */
int shm_writer_poll_committed(shm_writer *w);

/* LEASE_TAIL acquired into w->lease_tail: OK, or CORRUPT (behind our head, or beyond a ring). */
int shm_writer_poll_lease(shm_writer *w);

/* The checks of Table._check for an open table, on the words themselves: no shutdown, the
 * daemon we attached to (daemon_pid), our channel still ours (its PID is ``pid``, this
 * process: a forked child fails), the table not quarantined. 1 when all hold. */
int shm_writer_table_open(const shm_writer *w, int64_t daemon_pid, int64_t pid);

/* 1 when at most SHM_LEASE_LOW_WATER leased slots are left: the cached lease tail first, and
 * LEASE_TAIL re-read (acquire) before saying so. A garbage tail counts as low (and is left for
 * shm_writer_take to report). */
int shm_writer_lease_low(shm_writer *w);

/* After publishing: seq_cst fence, then the wake rule. Returns 1 when the caller must post the
 * daemon's semaphore (and DAEMON_SLEEPING was cleared to AWAKE), else 0. ``force`` always. */
int shm_writer_wake(shm_writer *w, int force);

/* One whole insert: room in the publish ring, a leased slot, the seqlocked row (field i copied
 * from values[i], cols[i].rowsize bytes), publication, wake rule. *key gets the item's key,
 * *wake the wake rule's answer. EMPTY/FULL/CORRUPT before anything is taken or written. */
int shm_writer_insert(shm_writer *w, const void *const *values, double priority,
                      int64_t episode, int32_t first, int32_t last, uint64_t *key, int *wake);

/* Rows [0, k) of a batch into slots[0..k): column i's rows from srcs[i] (contiguous, rowsize
 * bytes each), priorities[j], episodes[3j..3j+2] (id, first, last; steps already checked to
 * fit int32), keys into keys_out[j]. Slots come from shm_writer_take (range-checked). */
void shm_writer_write_batch(shm_writer *w, const int64_t *slots, int64_t k,
                            const char *const *srcs, const double *priorities,
                            const int64_t *episodes, uint64_t *keys_out);

/* Items [start, n) of a batch (column i's item j at srcs[i] + j * rowsize), chunk by chunk:
 * room in the publish ring for a chunk (up to half the ring), up to that many leased slots,
 * the seqlocked rows (write_batch's row writer), their publication, the wake rule.
 * Priorities: item j's is priorities[j], or ``priority`` for all when priorities is NULL;
 * episodes: item j's (id, first, last) at episodes[3j..3j+2] (steps already checked to fit
 * int32), all 0 when NULL. Keys go to keys_out[j]. Stops after a chunk whose wake rule says to
 * post the daemon (*wake = 1: the caller posts, then calls again), when no slot is leased or
 * the ring has no room (the caller waits), or at n. Returns the new start, or CORRUPT
 * (nothing of the failing chunk taken). ``scratch`` holds SHM_PUBLISH_CAPACITY / 2 slots. */
int64_t shm_writer_insert_batch(shm_writer *w, const char *const *srcs, int64_t n,
                                int64_t start, const double *priorities, double priority,
                                const int64_t *episodes, uint64_t *keys_out, int *wake,
                                int64_t *scratch);

#endif
