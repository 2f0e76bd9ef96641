/* The learner's sample path and mutations: selection bookkeeping, row copies checked by the
 * slot generations (seqlock reader side), key lookups for update_priorities and delete.
 *
 * Plain C over the table's shared arrays (no Python.h): every function runs with the table's
 * mutex held except shm_sample_gather, which runs after it is released. Every slot index, key
 * and position is range-checked before it addresses memory: the segment is writable by every
 * process of the group (docs/reliability.md).
 */
#ifndef SHM_SAMPLE_H
#define SHM_SAMPLE_H

#include <stdint.h>

#include "ratelimit.h"
#include "selector.h"
#include "shm_layout.h"

#define SHM_SAMPLE_OK 0
#define SHM_SAMPLE_ECORRUPT (-1) /* a slot index outside 0..num_slots-1 */
#define SHM_SAMPLE_ENOMEM (-2)   /* scratch for a large batch could not be allocated */
#define SHM_SAMPLE_EINVAL (-3)   /* a caller's position outside its output */
#define SHM_SAMPLE_EDRAW (-4)    /* the sampler cannot draw here (see shm_sample_draw) */
#define SHM_SAMPLE_EEMPTY (-5)   /* the sampler holds no item */


/* The per-slot arrays and counters a selection reads and writes (views of the segment). */
typedef struct {
    int32_t *times_sampled;  /* meta.times_sampled */
    const uint64_t *key;     /* meta.key */
    double *priority;        /* meta.priority (written by update_priorities) */
    const int64_t *gen;      /* meta.gen: the writer's seqlock word */
    uint8_t *state;          /* meta.state (written by removals and releases) */
    int64_t *samples;        /* &ctrl[Ctrl.SAMPLES, 0]: the rate limiter's count */
    int64_t *total_sampled;  /* &ctrl[Ctrl.TOTAL_SAMPLED, 0] */
    int64_t *unique_sampled; /* &ctrl[Ctrl.UNIQUE_SAMPLED, 0] */
    int64_t *size;           /* &ctrl[Ctrl.SIZE, 0] */
    int64_t *deletes;        /* &ctrl[Ctrl.DELETES, 0]: the rate limiter's count */
    int32_t *owner;          /* meta.owner */
    int64_t *free;           /* the free ring: num_slots entries, positions taken % num_slots */
    int64_t *free_tail;      /* &ctrl[Ctrl.FREE_TAIL, 0] */
    int64_t num_slots;
    int64_t max_times_sampled; /* <= 0: unlimited */
} shm_sample_table;

/* The outputs of one selection, k entries each (k = number of draws), filled for the first
 * *taken of them. */
typedef struct {
    int64_t *slots; /* the kept draws, in draw order */
    double *probability;
    uint64_t *key;
    double *priority;
    int32_t *times_sampled;
    int64_t *gen;
    int64_t *table_size;
    int64_t *exhausted; /* items whose count reached max_times_sampled, in first-draw order */
} shm_selection;

/* The bookkeeping of the draws slots[0..k-1] (probability[i] each) that the sampler made, as
 * if they were drawn one at a time (mutex held):
 * - draw i of an item drawn r times before it in this batch, whose times_sampled was b before
 *   the batch, gets times = b + r + 1; with max_times_sampled m > 0 a draw with times > m is
 *   dropped (sel->slots and sel->probability get the kept draws, in draw order; the inputs
 *   are only read: a selector may hand out a view of its own arrays);
 * - each item's times_sampled becomes b + (its kept draws); an item that reaches m goes to
 *   sel->exhausted (in the order of its first draw in the batch); *n_exhausted of them;
 * - table_size of a kept draw is size minus the kept draws before it that reached m;
 * - UNIQUE_SAMPLED grows by the items with b == 0, TOTAL_SAMPLED by the kept draws, and SAMPLES
 *   too when count_samples;
 * - key, priority and gen of each kept draw's slot are snapshot (the slot is READY: its
 *   generation is stable while the mutex is held).
 * Every slot is checked before anything is written: SHM_SAMPLE_ECORRUPT changes nothing. */
int shm_sample_select(const shm_sample_table *t, int64_t size, int count_samples,
                      const int64_t *slots, const double *probability, int64_t k,
                      const shm_selection *sel,
                      int64_t *taken, int64_t *n_exhausted);

/* One field's rows: rows of row_bytes bytes, num_slots of them in the segment. */
typedef struct {
    const char *src;
    char *dst;
    int64_t row_bytes;
    int64_t dst_rows; /* rows in dst */
} shm_sample_field;

/* Copy rows slots[0..k-1] of every field to dst rows positions[0..k-1] (NULL: 0..k-1), then
 * the seqlock check: an acquire fence, and each slot's generation re-read; intact[i] = 1 when it
 * still equals gen_snapshot[i] (the copy saw no byte of a newer row: the writer makes gen odd
 * and fences before its row stores). *n_intact of them. No lock held: rows may be rewritten
 * during the copy, which is what the check detects. */
int shm_sample_gather(const shm_sample_field *fields, int nfields, const int64_t *gen,
                      int64_t num_slots, const int64_t *slots, const int64_t *positions,
                      int64_t k, const int64_t *gen_snapshot, uint8_t *intact, int64_t *n_intact);

/* update_priorities (mutex held): of keys[0..n-1] (duplicates: the last wins, in call order of
 * those last occurrences), the present ones (slot = key & 0xffffffff in range, key[slot] equal,
 * state READY) get priority[slot] = priorities[i]; their slots and priorities are written to
 * slots_out/priorities_out (in that order), *n_present of them; *n_missing = distinct keys not
 * present. Priorities were checked by the caller. */
int shm_sample_update(const shm_sample_table *t, const uint64_t *keys, const double *priorities,
                      int64_t n, int64_t *slots_out, double *priorities_out, int64_t *n_present,
                      int64_t *n_missing);

/* delete (mutex held): the distinct slots of the present keys, ascending, in slots_out;
 * *n_present of them. */
int shm_sample_present(const shm_sample_table *t, const uint64_t *keys, int64_t n,
                       int64_t *slots_out, int64_t *n_present);

/* The bookkeeping of removing distinct READY items slots[0..n-1] (mutex held; the caller
 * removed them from the selectors): their state becomes FREE, or RELEASING with owner
 * releasing_owner when releasing_owner >= 0 (a sampler still copies them); then UNIQUE_SAMPLED
 * drops by those sampled at least once, SIZE by n, DELETES grows by n (states first, counters
 * after: repair() trusts the states). The caller pushes FREE slots on the free ring. Every slot
 * is checked first: SHM_SAMPLE_ECORRUPT changes nothing. */
int shm_sample_removed(const shm_sample_table *t, const int64_t *slots, int64_t n,
                       int32_t releasing_owner);

/* After a sampler copied the items its draw exhausted (mutex held): those of slots[0..n-1]
 * still RELEASING for ``channel`` become FREE (owner -1) and are pushed on the free ring at
 * FREE_TAIL by free_ring.h's rule, which then grows by their number, *freed. Every slot and
 * FREE_TAIL are checked first: SHM_SAMPLE_ECORRUPT changes nothing. */
int shm_sample_release(const shm_sample_table *t, const int64_t *slots, int64_t n,
                       int32_t channel, int64_t *freed);

/* -- the whole draw under the lock (shm_sample_locked) ----------------------------------------- */

/* The limiter check is ratelimit.h's shm_sample_allowance over the table's counters and
 * parameter lines (read on every call: set_rate_limiter changes them at run time). */

/* A source of uniform doubles in [0, 1): numpy's bitgen_t (its next_double), so that a draw
 * here takes the very numbers rng.random(n) would. */
typedef struct {
    void *state;
    double (*next_double)(void *state);
} shm_uniforms;

/* The sampler's draw of n items with replacement, as the Python selectors draw them: for a
 * Prioritized or Uniform selector, SHM_SAMPLE_EEMPTY when its set is empty (no uniform taken),
 * else n uniforms into u (as rng.random(n)), then shm_prioritized_sample, or shm_dense_draw
 * with probability 1/count. SHM_SAMPLE_EDRAW for the other kinds (the deterministic ones draw
 * in Python) and for a structure that contradicts itself (the Python path repairs it). */
int shm_sample_draw(const shm_selector *s, const shm_uniforms *rng, double *u, int64_t n,
                    int64_t *slots, double *prob);

/* A channel's control lines (chan.ctrl: max_clients x SHM_CHAN_COUNT lines). */
typedef struct {
    int64_t *chan;
    int64_t max_clients;
    int64_t *sampler_waiting; /* &ctrl[Ctrl.SAMPLER_WAITING, 0] */
} shm_sample_waiters;

/* Scratch of one call, n entries each (the caller's, reused across calls). */
typedef struct {
    double *u;          /* the uniforms */
    int64_t *drawn;     /* the sampler's draws */
    double *drawn_prob; /* and their probabilities */
} shm_sample_scratch;

/* What shm_sample_locked did. */
enum {
    SHM_SAMPLED = 0,        /* n draws made and booked: *taken kept (<= n), *n_exhausted */
    SHM_SAMPLE_BLOCKED,     /* the limiter or an empty table: WAIT_SAMPLE and SAMPLER_WAITING set */
    SHM_SAMPLE_SLOW,        /* nothing booked: a partial allowance, a deterministic sampler, a
                             * structure to repair: the caller takes the Python path */
    SHM_SAMPLE_UNREMOVED,   /* booked, but the exhausted items are still in the selectors (one
                             * refused to remove them): the caller removes them (and repairs) */
};

/* The sample path's work under the table mutex (held by the caller), for ``channel`` (range
 * checked by the caller): WAIT_SAMPLE = 0; the limiter's allowance for n; the sampler's draw
 * (shm_sample_draw); the bookkeeping (shm_sample_select, counted); the items that reached
 * max_times_sampled removed from the sampler and the remover and made RELEASING for the channel
 * (shm_sample_removed). Returns one of the values above. */
int shm_sample_locked(const shm_sample_table *t, const shm_limiter *lim,
                      const shm_sample_waiters *w, const shm_selector *sampler,
                      const shm_selector *remover, const shm_uniforms *rng, int64_t n,
                      int64_t channel, const shm_sample_scratch *sc, const shm_selection *sel,
                      int64_t *taken, int64_t *n_exhausted);

/* Whether samples may have unblocked writers: the limiter can block inserts (max_diff is not
 * +inf) and a channel's WAIT_INSERT is set (TableCore._wake_blocked_writers). */
int shm_sample_wakes_writers(const shm_limiter *lim, const shm_sample_waiters *w);

#endif
