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

#include "shm_layout.h"

#define SHM_SAMPLE_OK 0
#define SHM_SAMPLE_ECORRUPT (-1) /* a slot index outside 0..num_slots-1 */
#define SHM_SAMPLE_ENOMEM (-2)   /* scratch for a large batch could not be allocated */
#define SHM_SAMPLE_EINVAL (-3)   /* a caller's position outside its output */


/* The per-slot arrays and counters a selection reads and writes (views of the segment). */
typedef struct {
    int32_t *times_sampled;  /* meta.times_sampled */
    const uint64_t *key;     /* meta.key */
    const double *priority;  /* meta.priority */
    const int64_t *gen;      /* meta.gen: the writer's seqlock word */
    const uint8_t *state;    /* meta.state */
    double *priority_w;      /* meta.priority, written by update_priorities */
    int64_t *samples;        /* &ctrl[Ctrl.SAMPLES, 0]: the rate limiter's count */
    int64_t *total_sampled;  /* &ctrl[Ctrl.TOTAL_SAMPLED, 0] */
    int64_t *unique_sampled; /* &ctrl[Ctrl.UNIQUE_SAMPLED, 0] */
    int64_t *size;           /* &ctrl[Ctrl.SIZE, 0] */
    int64_t *deletes;        /* &ctrl[Ctrl.DELETES, 0]: the rate limiter's count */
    uint8_t *state_w;        /* meta.state, written by removals */
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
 * FREE_TAIL (position % num_slots, as rings.ring_put), which then grows by their number,
 * *freed. Every slot is checked first: SHM_SAMPLE_ECORRUPT changes nothing. */
int shm_sample_release(const shm_sample_table *t, const int64_t *slots, int64_t n,
                       int32_t channel, int64_t *freed);

#endif
