/* The learner's sample path and mutations (see sample.h for each function's contract). */
#include "sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "free_ring.h"
#include "random_selectors.h"
#include "shm_atomics.h"

/* -- a small open-addressing map from a 64-bit word to an entry, private to one call --------- */

/* Batches of up to STACK_ENTRIES / 2 draws use scratch on the stack (the common case: no
 * allocation on the sample path); larger ones allocate. */
#define STACK_ENTRIES 1024

typedef struct {
    uint64_t word;  /* the slot or key */
    int64_t index;  /* -1: empty; else the first (select) or last (update) position */
    int64_t before; /* select: times_sampled before the batch */
    int64_t draws;  /* select: draws so far in the batch */
    int64_t kept;   /* select: draws kept (times <= max_times_sampled) */
} entry;

typedef struct {
    entry *e;
    uint64_t mask;
    int shift;
    entry stack[STACK_ENTRIES];
} map;

static int map_init(map *m, int64_t n) {
    uint64_t cap = 16;
    int bits = 4;
    while (cap < 2 * (uint64_t)n) {
        cap <<= 1;
        bits++;
    }
    if (cap <= STACK_ENTRIES) {
        m->e = m->stack;
    } else {
        m->e = malloc(cap * sizeof(entry));
        if (m->e == NULL)
            return SHM_SAMPLE_ENOMEM;
    }
    m->mask = cap - 1;
    m->shift = 64 - bits;
    for (uint64_t i = 0; i < cap; i++)
        m->e[i].index = -1;
    return SHM_SAMPLE_OK;
}

static void map_free(map *m) {
    if (m->e != m->stack)
        free(m->e);
}

/* The entry of ``word``: found, or the empty one where it goes (index -1). Never full: the
 * capacity is at least twice the number of words inserted. */
static entry *map_find(const map *m, uint64_t word) {
    uint64_t h = (word * UINT64_C(0x9E3779B97F4A7C15)) >> m->shift;
    for (;;) {
        entry *e = &m->e[h];
        if (e->index < 0 || e->word == word)
            return e;
        h = (h + 1) & m->mask;
    }
}

/* -- selection bookkeeping ------------------------------------------------------------------ */

/* Draws whose metadata is fetched ahead of the one being booked: each draw reads four arrays at
 * a random slot, four cache misses in a large table; prefetching keeps them in flight. */
#define SELECT_AHEAD 8

/* always_inline: gcc deletes calls of a prefetch-only static inline function as free of side
 * effects (seen with gcc 12 at -O2). */
static inline __attribute__((always_inline)) void prefetch_meta(const shm_sample_table *t,
                                                                 int64_t s) {
    __builtin_prefetch(&t->times_sampled[s]);
    __builtin_prefetch(&t->key[s]);
    __builtin_prefetch(&t->priority[s]);
    __builtin_prefetch(&t->gen[s]);
}

int shm_sample_select(const shm_sample_table *t, int64_t size, int count_samples,
                      const int64_t *slots, const double *probability, int64_t k,
                      const shm_selection *sel,
                      int64_t *taken, int64_t *n_exhausted) {
    *taken = 0;
    *n_exhausted = 0;
    /* The sampler read its structures from shared memory: check every slot before any store,
     * so that an error leaves the table as it was (the caller rebuilds the selectors). */
    for (int64_t i = 0; i < k; i++)
        if (slots[i] < 0 || slots[i] >= t->num_slots)
            return SHM_SAMPLE_ECORRUPT;
    map m;
    if (map_init(&m, k) != SHM_SAMPLE_OK)
        return SHM_SAMPLE_ENOMEM;
    const int64_t mts = t->max_times_sampled;
    int64_t kept = 0, reached = 0, n_uniq = 0;
    /* The items in first-draw order reuse the exhausted output as scratch: it has k entries and
     * the exhausted items are a subsequence of them, written after this list is read. */
    int64_t *uniq = sel->exhausted;
    for (int64_t i = 0; i < k && i < SELECT_AHEAD; i++)
        prefetch_meta(t, slots[i]);
    for (int64_t i = 0; i < k; i++) {
        int64_t s = slots[i];
        if (i + SELECT_AHEAD < k)
            prefetch_meta(t, slots[i + SELECT_AHEAD]);
        entry *e = map_find(&m, (uint64_t)s);
        if (e->index < 0) {
            e->word = (uint64_t)s;
            e->index = i;
            e->before = t->times_sampled[s];
            e->draws = 0;
            e->kept = 0;
            uniq[n_uniq++] = s;
        }
        /* int64 arithmetic, stored as int32 as numpy's assignment does (times_sampled is int32;
         * a count read from shared memory may be anything). */
        int64_t times = e->before + e->draws + 1;
        e->draws++;
        if (mts > 0 && times > mts)
            continue; /* dropped: the item was exhausted by an earlier draw of the batch */
        e->kept++;
        sel->slots[kept] = s;
        sel->probability[kept] = probability[i];
        sel->times_sampled[kept] = (int32_t)times;
        sel->key[kept] = t->key[s];
        sel->priority[kept] = t->priority[s];
        /* gen: owned by the slot's last writer; READY slots are not written (they are leased
         * only when FREE), and the mutex orders us after the commit that made it READY. */
        sel->gen[kept] = shm_load_relaxed(&t->gen[s]);
        sel->table_size[kept] = size - reached;
        if (mts > 0 && (int32_t)times == mts)
            reached++;
        kept++;
    }
    int64_t newly = 0, ex = 0;
    for (int64_t u = 0; u < n_uniq; u++) {
        int64_t s = uniq[u];
        entry *e = map_find(&m, (uint64_t)s);
        int32_t now = (int32_t)(e->before + e->kept);
        t->times_sampled[s] = now;
        if (e->before == 0)
            newly++;
        if (mts > 0 && now >= mts)
            uniq[ex++] = s; /* ex <= u: overwrites only entries already read */
    }
    map_free(&m);
    /* The counters live in ctrl; every writer of them holds the mutex. */
    *t->unique_sampled += newly;
    *t->total_sampled += kept;
    if (count_samples)
        *t->samples += kept;
    *taken = kept;
    *n_exhausted = ex;
    return SHM_SAMPLE_OK;
}

/* -- row copies with the seqlock check ------------------------------------------------------- */

/* Rows copied ahead of the one being copied (see shm_sample_gather). */
#define GATHER_AHEAD 16

/* memcpy of one row; the common scalar sizes inline (a call per 1- to 8-byte row costs more
 * than the copy). */
static inline void copy_row(char *dst, const char *src, size_t n) {
    switch (n) {
    case 1:
        *dst = *src;
        return;
    case 4:
        memcpy(dst, src, 4);
        return;
    case 8:
        memcpy(dst, src, 8);
        return;
    default:
        memcpy(dst, src, n);
    }
}

int shm_sample_gather(const shm_sample_field *fields, int nfields, const int64_t *gen,
                      int64_t num_slots, const int64_t *slots, const int64_t *positions,
                      int64_t k, const int64_t *gen_snapshot, uint8_t *intact,
                      int64_t *n_intact) {
    *n_intact = 0;
    for (int64_t i = 0; i < k; i++) {
        if (slots[i] < 0 || slots[i] >= num_slots)
            return SHM_SAMPLE_ECORRUPT;
        int64_t p = positions == NULL ? i : positions[i];
        for (int f = 0; f < nfields; f++)
            if (p < 0 || p >= fields[f].dst_rows)
                return SHM_SAMPLE_EINVAL;
    }
    for (int f = 0; f < nfields; f++) {
        const shm_sample_field *fl = &fields[f];
        const size_t rb = (size_t)fl->row_bytes;
        /* Rows are scattered over a table far larger than the caches: each one is a miss.
         * Prefetching GATHER_AHEAD rows ahead keeps that many misses in flight instead of the
         * few the CPU finds by itself behind a call to memcpy. */
        for (int64_t i = 0; i < k && i < GATHER_AHEAD; i++)
            __builtin_prefetch(fl->src + (size_t)slots[i] * rb);
        for (int64_t i = 0; i < k; i++) {
            int64_t p = positions == NULL ? i : positions[i];
            if (i + GATHER_AHEAD < k)
                __builtin_prefetch(fl->src + (size_t)slots[i + GATHER_AHEAD] * rb);
            /* A row being rewritten by a writer who leased the recycled slot races with this
             * copy: the generation check below detects it and the caller discards the row. */
            copy_row(fl->dst + (size_t)p * rb, fl->src + (size_t)slots[i] * rb, rb);
        }
    }
    /* Seqlock reader: the acquire fence orders the copies above before the generation loads
     * below; it pairs with the writer's release fence after it made gen odd (writer.c), so a
     * copy that saw any byte of a new row sees gen moved. gen is owned by the slot's writer. */
    shm_fence_acquire();
    int64_t good = 0;
    for (int64_t i = 0; i < k; i++) {
        int ok = shm_load_relaxed(&gen[slots[i]]) == gen_snapshot[i];
        intact[i] = (uint8_t)ok;
        good += ok;
    }
    *n_intact = good;
    return SHM_SAMPLE_OK;
}

/* -- mutations -------------------------------------------------------------------------------- */

static int present(const shm_sample_table *t, uint64_t key, int64_t *slot) {
    uint64_t s = key & UINT64_C(0xFFFFFFFF);
    if (s >= (uint64_t)t->num_slots)
        return 0;
    *slot = (int64_t)s;
    return t->key[s] == key && t->state[s] == SHM_SLOT_READY;
}

int shm_sample_update(const shm_sample_table *t, const uint64_t *keys, const double *priorities,
                      int64_t n, int64_t *slots_out, double *priorities_out, int64_t *n_present,
                      int64_t *n_missing) {
    *n_present = 0;
    *n_missing = 0;
    map m;
    if (map_init(&m, n) != SHM_SAMPLE_OK)
        return SHM_SAMPLE_ENOMEM;
    for (int64_t i = 0; i < n; i++) {
        entry *e = map_find(&m, keys[i]);
        e->word = keys[i];
        e->index = i; /* the last occurrence wins */
    }
    int64_t found = 0, distinct = 0;
    for (int64_t i = 0; i < n; i++) {
        if (map_find(&m, keys[i])->index != i)
            continue;
        distinct++;
        int64_t s;
        if (!present(t, keys[i], &s))
            continue;
        t->priority[s] = priorities[i];
        slots_out[found] = s;
        priorities_out[found] = priorities[i];
        found++;
    }
    map_free(&m);
    *n_present = found;
    *n_missing = distinct - found;
    return SHM_SAMPLE_OK;
}

static int cmp_int64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

int shm_sample_present(const shm_sample_table *t, const uint64_t *keys, int64_t n,
                       int64_t *slots_out, int64_t *n_present) {
    int64_t found = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t s;
        if (present(t, keys[i], &s))
            slots_out[found++] = s;
    }
    qsort(slots_out, (size_t)found, sizeof(int64_t), cmp_int64);
    int64_t u = 0;
    for (int64_t i = 0; i < found; i++)
        if (u == 0 || slots_out[u - 1] != slots_out[i])
            slots_out[u++] = slots_out[i];
    *n_present = u;
    return SHM_SAMPLE_OK;
}

int shm_sample_removed(const shm_sample_table *t, const int64_t *slots, int64_t n,
                       int32_t releasing_owner) {
    for (int64_t i = 0; i < n; i++)
        if (slots[i] < 0 || slots[i] >= t->num_slots)
            return SHM_SAMPLE_ECORRUPT;
    int64_t sampled = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t s = slots[i];
        if (releasing_owner >= 0) {
            t->owner[s] = releasing_owner;
            t->state[s] = SHM_SLOT_RELEASING;
        } else {
            t->state[s] = SHM_SLOT_FREE;
        }
        sampled += t->times_sampled[s] != 0;
    }
    /* The counters live in ctrl; every writer of them holds the mutex. */
    *t->unique_sampled -= sampled;
    *t->size -= n;
    *t->deletes += n;
    return SHM_SAMPLE_OK;
}

int shm_sample_release(const shm_sample_table *t, const int64_t *slots, int64_t n,
                       int32_t channel, int64_t *freed) {
    *freed = 0;
    for (int64_t i = 0; i < n; i++)
        if (slots[i] < 0 || slots[i] >= t->num_slots)
            return SHM_SAMPLE_ECORRUPT;
    /* free_ring.h's rule, checked before any state changes: a FREE_TAIL that does not fit is
     * refused, and the caller's repair rebuilds the ring from the states. */
    const int64_t size = t->num_slots, tail = *t->free_tail;
    if (!shm_free_tail_fits(size, tail))
        return SHM_SAMPLE_ECORRUPT;
    int64_t pos = tail % size, m = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t s = slots[i];
        if (t->state[s] != SHM_SLOT_RELEASING || t->owner[s] != channel)
            continue; /* not ours any more (a repair or a reset took it back), or listed twice */
        t->state[s] = SHM_SLOT_FREE;
        t->owner[s] = -1;
        t->free[pos] = s; /* as shm_free_push_ring writes, without a second pass */
        pos = pos + 1 == size ? 0 : pos + 1;
        m++;
    }
    /* The ring's tail after its entries (m <= size: each freed slot was RELEASING once). */
    *t->free_tail = tail + m;
    *freed = m;
    return SHM_SAMPLE_OK;
}


/* -- the whole draw under the lock ---------------------------------------------------------- */

int shm_sample_draw(const shm_selector *s, const shm_uniforms *rng, double *u, int64_t n,
                    int64_t *slots, double *prob) {
    const shm_dense *items;
    if (s->kind == SHM_SEL_PRIORITIZED)
        items = &((const shm_prioritized *)s->impl)->items;
    else if (s->kind == SHM_SEL_UNIFORM)
        items = s->impl;
    else
        return SHM_SAMPLE_EDRAW;
    int64_t count = shm_dense_count(items);
    if (count < 0)
        return SHM_SAMPLE_EDRAW;
    if (count == 0)
        return SHM_SAMPLE_EEMPTY;
    for (int64_t i = 0; i < n; i++)
        u[i] = rng->next_double(rng->state);
    if (s->kind == SHM_SEL_PRIORITIZED) {
        if (shm_prioritized_sample(s->impl, u, n, slots, prob) != SHM_OK)
            return SHM_SAMPLE_EDRAW;
        return SHM_SAMPLE_OK;
    }
    if (shm_dense_draw(items, u, n, slots) != SHM_OK)
        return SHM_SAMPLE_EDRAW;
    const double p = 1.0 / (double)count;
    for (int64_t i = 0; i < n; i++)
        prob[i] = p;
    return SHM_SAMPLE_OK;
}

static int64_t *chan_word(const shm_sample_waiters *w, int64_t c, int word) {
    return w->chan + (c * SHM_CHAN_COUNT + word) * SHM_LINE;
}

int shm_sample_locked(const shm_sample_table *t, const shm_limiter *lim,
                      const shm_sample_waiters *w, const shm_selector *sampler,
                      const shm_selector *remover, const shm_uniforms *rng, int64_t n,
                      int64_t channel, const shm_sample_scratch *sc, const shm_selection *sel,
                      int64_t *taken, int64_t *n_exhausted) {
    *taken = 0;
    *n_exhausted = 0;
    /* WAIT_SAMPLE and SAMPLER_WAITING: hints this channel's sampler writes under the mutex;
     * the daemon reads them after a seq_cst fence (commit.c), so relaxed stores. */
    shm_store_relaxed(chan_word(w, channel, SHM_CHAN_WAIT_SAMPLE), 0);
    const int64_t size = *t->size;
    const int64_t allowed = shm_sample_allowance(lim, n);
    if (allowed < 0 || (allowed > 0 && allowed < n && size > 0))
        return SHM_SAMPLE_SLOW; /* the Python path takes what the limiter allows */
    int rc = SHM_SAMPLE_EEMPTY;
    if (allowed > 0 && size > 0)
        rc = shm_sample_draw(sampler, rng, sc->u, n, sc->drawn, sc->drawn_prob);
    if (rc == SHM_SAMPLE_EEMPTY) {
        /* Registered before the caller unlocks: the daemon's next commit wakes us. */
        shm_store_relaxed(chan_word(w, channel, SHM_CHAN_WAIT_SAMPLE), 1);
        shm_store_relaxed(w->sampler_waiting, 1);
        return SHM_SAMPLE_BLOCKED;
    }
    if (rc != SHM_SAMPLE_OK)
        return SHM_SAMPLE_SLOW;
    rc = shm_sample_select(t, size, 1, sc->drawn, sc->drawn_prob, n, sel, taken, n_exhausted);
    if (rc != SHM_SAMPLE_OK)
        return SHM_SAMPLE_SLOW; /* nothing written: the Python path draws again, repairs */
    const int64_t ex = *n_exhausted;
    if (ex == 0)
        return SHM_SAMPLED;
    /* max_times_sampled: the exhausted items leave both selectors, then the table, their
     * slots RELEASING for this channel until its copy is done (TableCore._remove). */
    if (shm_selector_remove(sampler, sel->exhausted, ex) != SHM_OK ||
        shm_selector_remove(remover, sel->exhausted, ex) != SHM_OK)
        return SHM_SAMPLE_UNREMOVED;
    if (shm_sample_removed(t, sel->exhausted, ex, (int32_t)channel) != SHM_SAMPLE_OK)
        return SHM_SAMPLE_UNREMOVED;
    return SHM_SAMPLED;
}

int shm_sample_wakes_writers(const shm_limiter *lim, const shm_sample_waiters *w) {
    if (!shm_limiter_blocks_inserts(lim))
        return 0;
    for (int64_t c = 0; c < w->max_clients; c++)
        if (shm_load_relaxed(chan_word(w, c, SHM_CHAN_WAIT_INSERT)) != 0)
            return 1;
    return 0;
}
