/* The dense set of a table's items: live[0 .. count) holds the slots in no particular order,
 * pos[slot] a member's index in live. O(1) uniform draws and removals.
 *
 * The three arrays live in shared memory that every sampler of the table can write, and are
 * used under the table mutex only (no cross-process publication: plain loads and stores). Every
 * index or count read from them is read once (a relaxed atomic load, so the compiler cannot read
 * it again after the check) and range-checked before it addresses memory: garbage gives
 * SHM_ECORRUPT, never an access outside the arrays. No Python types here.
 */
#ifndef SHM_DENSE_H
#define SHM_DENSE_H

#include <stdint.h>

#include "sumtree.h" /* status codes */

typedef struct {
    int64_t *live;  /* num_slots int64 (shared) */
    int64_t *pos;   /* num_slots int64 (shared) */
    int64_t *count; /* one int64 (shared) */
    int64_t num_slots;
} shm_dense;

/* min(floor(u·m), m - 1) for u in [0, 1), m >= 1: how every uniform maps to an index. */
int64_t shm_scale_uniform(double u, int64_t m);

/* count, or SHM_ECORRUPT when it is not in [0, num_slots]. */
int64_t shm_dense_count(const shm_dense *d);

/* Append slots (new members, in order): live[count + i] = slots[i], pos of each set, count += n.
 * SHM_EINVAL for a slot out of range or more slots than room, SHM_ECORRUPT for a bad count;
 * nothing is changed then. */
int shm_dense_insert(shm_dense *d, const int64_t *slots, int64_t n);

/* Remove distinct members. The holes they leave below the new end (count - n) are filled, in the
 * order of slots, by the survivors of live[count - n .. count) in their order; live beyond the
 * new end keeps its old contents. SHM_ECORRUPT, changing nothing, when pos/live say a slot is not
 * a member (a slot given twice included), or count is out of range; SHM_EINVAL for a slot out of
 * [0, num_slots). */
int shm_dense_remove(shm_dense *d, const int64_t *slots, int64_t n);

/* out[i] = live[min(floor(u[i]·count), count - 1)], for u[i] in [0, 1). SHM_EINVAL when the set
 * is empty (and n > 0), SHM_ECORRUPT for a bad count or a live entry out of range. */
int shm_dense_draw(const shm_dense *d, const double *u, int64_t n, int64_t *out);

/* n distinct members by a partial Fisher-Yates on live itself: for i in 0..n-1, with
 * m = count - i, j = min(floor(u[i]·m), m - 1), swap live[j] and live[m-1] (pos updated);
 * out = live[count - n .. count) in array order. The set is unchanged, only reordered, so
 * removing the victims next is O(1) each. SHM_EINVAL when n > count, SHM_ECORRUPT for a bad count
 * or live entry. */
int shm_dense_draw_distinct(shm_dense *d, const double *u, int64_t n, int64_t *out);

/* Whether slot is a member (pos[slot] in range and live[pos[slot]] == slot); slot must be in
 * [0, num_slots) and count valid. */
int shm_dense_contains(const shm_dense *d, int64_t count, int64_t slot);

static inline void shm_dense_clear(shm_dense *d) { d->count[0] = 0; }

/* clear, then insert(slots). */
int shm_dense_rebuild(shm_dense *d, const int64_t *slots, int64_t n);

#endif
