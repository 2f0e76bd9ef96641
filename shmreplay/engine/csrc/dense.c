/* The dense set (see dense.h). */
#include "dense.h"

#include "shm_atomics.h"

/* A word of the set's shared arrays read once: the value checked is the value used. Ordering
 * is not the point (the table mutex orders the set's users); a second read is. */
static inline int64_t read_once(const int64_t *p) { return shm_load_relaxed(p); }

/* min(floor(u·m), m - 1) for u in [0, 1) (u·m may round up to m); 0 for a u that is not. */
int64_t shm_scale_uniform(double u, int64_t m) {
    double x = u * (double)m;
    if (!(x >= 0.0))
        return 0;
    return x < (double)m ? (int64_t)x : m - 1;
}

#define scale shm_scale_uniform

int64_t shm_dense_count(const shm_dense *d) {
    int64_t count = read_once(d->count);
    if (count < 0 || count > d->num_slots)
        return SHM_ECORRUPT;
    return count;
}

int shm_dense_contains(const shm_dense *d, int64_t count, int64_t slot) {
    int64_t p = read_once(&d->pos[slot]);
    return p >= 0 && p < count && read_once(&d->live[p]) == slot;
}

int shm_dense_insert(shm_dense *d, const int64_t *slots, int64_t n) {
    int64_t count = shm_dense_count(d);
    if (count < 0)
        return (int)count;
    if (n < 0 || n > d->num_slots - count)
        return SHM_EINVAL;
    for (int64_t i = 0; i < n; i++)
        if (slots[i] < 0 || slots[i] >= d->num_slots)
            return SHM_EINVAL;
    for (int64_t i = 0; i < n; i++) {
        d->live[count + i] = slots[i];
        d->pos[slots[i]] = count + i;
    }
    d->count[0] = count + n;
    return SHM_OK;
}

int shm_dense_remove(shm_dense *d, const int64_t *slots, int64_t n) {
    if (n <= 0)
        return SHM_OK;
    int64_t count = shm_dense_count(d);
    if (count < 0)
        return (int)count;
    for (int64_t i = 0; i < n; i++)
        if (slots[i] < 0 || slots[i] >= d->num_slots)
            return SHM_EINVAL;
    if (n > count)
        return SHM_ECORRUPT;
    int64_t *live = d->live, *pos = d->pos;
    /* Check every slot is a member, marking each one's live entry (~slot, negative) so that a
     * slot given twice fails the check the second time; on failure the marks are undone. The
     * loops after the check read pos again: those reads are bounded too, as another process may
     * write the arrays at any time (it only spoils the set, which the table then rebuilds). */
    for (int64_t i = 0; i < n; i++) {
        int64_t s = slots[i];
        int64_t p = read_once(&pos[s]); /* the value checked is the value used */
        if (p < 0 || p >= count || read_once(&live[p]) != s) {
            for (int64_t k = 0; k < i; k++) {
                int64_t q = read_once(&pos[slots[k]]);
                if (q >= 0 && q < count)
                    live[q] = slots[k];
            }
            return SHM_ECORRUPT;
        }
        live[p] = ~s;
    }
    /* Committed. The marked entries in the tail are the removed ones; every other tail entry
     * moves, in order, into the next hole below the new end. */
    int64_t end = count - n, j = end;
    for (int64_t i = 0; i < n; i++) {
        int64_t p = read_once(&pos[slots[i]]);
        if (p < 0 || p >= end)
            continue;
        while (j < count && read_once(&live[j]) < 0) /* as many survivors as holes below end */
            j++;
        if (j >= count)
            break;
        int64_t mover = read_once(&live[j++]);
        if (mover < 0 || mover >= d->num_slots)
            continue;
        live[p] = mover;
        pos[mover] = p;
    }
    for (int64_t i = 0; i < n; i++) { /* the tail keeps its old contents, as before */
        int64_t p = read_once(&pos[slots[i]]);
        if (p >= end && p < count)
            live[p] = slots[i];
    }
    d->count[0] = end;
    return SHM_OK;
}

int shm_dense_draw(const shm_dense *d, const double *u, int64_t n, int64_t *out) {
    if (n <= 0)
        return SHM_OK;
    int64_t count = shm_dense_count(d);
    if (count < 0)
        return (int)count;
    if (count == 0)
        return SHM_EINVAL;
    for (int64_t i = 0; i < n; i++) {
        int64_t j = scale(u[i], count);
        int64_t s = read_once(&d->live[j]);
        if (s < 0 || s >= d->num_slots)
            return SHM_ECORRUPT;
        out[i] = s;
    }
    return SHM_OK;
}

int shm_dense_draw_distinct(shm_dense *d, const double *u, int64_t n, int64_t *out) {
    if (n <= 0)
        return SHM_OK;
    int64_t count = shm_dense_count(d);
    if (count < 0)
        return (int)count;
    if (n > count)
        return SHM_EINVAL;
    int64_t *live = d->live, *pos = d->pos;
    for (int64_t i = 0; i < n; i++) {
        int64_t m = count - i;
        int64_t j = scale(u[i], m);
        int64_t a = read_once(&live[j]), b = read_once(&live[m - 1]);
        if (a < 0 || a >= d->num_slots || b < 0 || b >= d->num_slots)
            return SHM_ECORRUPT;
        live[j] = b;
        pos[b] = j;
        live[m - 1] = a;
        pos[a] = m - 1;
        out[n - 1 - i] = a; /* live[m - 1] is final: later swaps stay below it */
    }
    return SHM_OK;
}

int shm_dense_rebuild(shm_dense *d, const int64_t *slots, int64_t n) {
    shm_dense_clear(d);
    return shm_dense_insert(d, slots, n);
}
