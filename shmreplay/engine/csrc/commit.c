/* The daemon's commit round (see commit.h). The reference model is tests/reference/commit.py;
 * tests/test_engine_commit.py holds this code to it. */
#define _GNU_SOURCE /* sem_clockwait; before any include */

#include "commit.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <time.h>

#include "shm_atomics.h"

static inline int64_t *chan_word(const shm_round *r, int64_t c, int w) {
    return r->chan + (c * SHM_CHAN_COUNT + w) * SHM_LINE;
}

static inline int64_t *ctrl_word(const shm_table *t, int w) { return t->ctrl + w * SHM_LINE; }

int64_t shm_round_wanting(const shm_round *r, int64_t *channel, int64_t *want, int64_t *have) {
    int64_t k = 0;
    for (int64_t c = 0; c < r->t->max_clients; c++) {
        if (!r->active[c])
            continue;
        /* WANT_LEASE: the writer's; a hint, read relaxed. */
        int64_t w = shm_load_relaxed(chan_word(r, c, SHM_CHAN_WANT_LEASE));
        if (w == 0)
            continue;
        channel[k] = c;
        want[k] = w;
        /* LEASE_HEAD: the writer's, released after it read the entries: acquire before the
         * daemon overwrites them. */
        int64_t head = shm_load_acquire(chan_word(r, c, SHM_CHAN_LEASE_HEAD));
        /* Hostile: subtracted as unsigned (wraps like numpy's int64), the caller checks it. */
        have[k] = (int64_t)((uint64_t)r->lease_tail[c] - (uint64_t)head);
        k++;
    }
    return k;
}

void shm_round_set_sleeping(shm_round *r, int64_t value) {
    /* DAEMON_SLEEPING: the daemon's (writers clear it before posting). */
    shm_store_relaxed(ctrl_word(r->t, SHM_CTRL_DAEMON_SLEEPING), value);
    shm_fence_seq_cst();
}

void shm_round_waiters(const shm_round *r, int64_t *wait_insert, int64_t *wait_sample) {
    int64_t wi = 0, ws = 0;
    shm_fence_seq_cst(); /* our LEASE_TAIL / PUB_HEAD stores before the waiters' flags */
    for (int64_t c = 0; c < r->t->max_clients; c++) {
        /* WAIT_INSERT, WAIT_SAMPLE: the channel's process's. */
        wi += shm_load_relaxed(chan_word(r, c, SHM_CHAN_WAIT_INSERT)) != 0;
        ws += shm_load_relaxed(chan_word(r, c, SHM_CHAN_WAIT_SAMPLE)) != 0;
    }
    *wait_insert = wi;
    *wait_sample = ws;
}

int shm_round_pending(const shm_round *r) {
    for (int64_t c = 0; c < r->t->max_clients; c++) {
        /* PUB_TAIL: the writer's; acquire, so that a later drain sees the entries it covers. */
        if (r->active[c] && shm_load_acquire(chan_word(r, c, SHM_CHAN_PUB_TAIL)) != r->pub_head[c])
            return 1;
    }
    return 0;
}

int shm_round_any_writer(const shm_round *r) {
    for (int64_t c = 0; c < r->t->max_clients; c++)
        /* WANT_LEASE: the writer's; a hint, read relaxed. */
        if (r->active[c] && shm_load_relaxed(chan_word(r, c, SHM_CHAN_WANT_LEASE)) > 0)
            return 1;
    return 0;
}

int shm_round_settle(shm_round *r, int64_t flag) {
    int out = 0;
    shm_round_set_sleeping(r, flag); /* store, seq_cst fence */
    /* SAMPLER_WAITING: a hint samplers set (under the mutex) before they wait. */
    int64_t sampler_waiting = shm_load_relaxed(ctrl_word(r->t, SHM_CTRL_SAMPLER_WAITING));
    int64_t wait_insert, wait_sample;
    shm_round_waiters(r, &wait_insert, &wait_sample);
    if (sampler_waiting != 0 || wait_insert > 0)
        out |= SHM_SETTLE_URGENT;
    if (shm_round_pending(r))
        out |= SHM_SETTLE_PENDING;
    return out;
}

/* The first position of run[0..n) whose slot appears again later, or -1 (the last write of a
 * slot's position wins in scratch, as TableCore._repeated did). Slots are in range. */
static int64_t first_repeated(int32_t *scratch, const int64_t *run, int64_t n) {
    if (n < 2)
        return -1;
    for (int64_t i = 0; i < n; i++)
        scratch[run[i]] = (int32_t)i;
    for (int64_t i = 0; i < n; i++)
        if (scratch[run[i]] != (int32_t)i)
            return i;
    return -1;
}

/* Check channel c's run [head, tail) and copy it to out/prios; SHM_PUB_OK or why not. The ring
 * and the priorities are read once: what is checked is what gets committed. */
static int drain_one(shm_round *r, int64_t c, int64_t head, int64_t tail, int64_t *out,
                     double *prios, shm_pub_error *e) {
    shm_table *t = r->t;
    int64_t held = r->outstanding[c];
    if (tail < head) { /* compared before subtracting: a hostile tail must not overflow */
        e->a = tail, e->b = head;
        return SHM_PUB_BEHIND;
    }
    int64_t n = tail - head; /* head >= 0 (ours), tail >= head: no overflow */
    int64_t cap = held < SHM_PUBLISH_CAPACITY ? held : SHM_PUBLISH_CAPACITY;
    if (n > cap) {
        e->a = tail, e->b = n, e->c = head, e->d = held;
        return SHM_PUB_AHEAD;
    }
    const int64_t *ring = r->publish_ring + c * SHM_PUBLISH_CAPACITY;
    /* head is the daemon's own copy (>= 0), so the modulo is in range. */
    for (int64_t i = 0; i < n; i++)
        out[i] = ring[(head + i) % SHM_PUBLISH_CAPACITY];
    for (int64_t i = 0; i < n; i++) {
        if (out[i] < 0 || out[i] >= t->num_slots) {
            e->a = out[i];
            return SHM_PUB_RANGE;
        }
    }
    for (int64_t i = 0; i < n; i++) {
        int64_t s = out[i];
        if (t->owner[s] != c || t->state[s] != SHM_SLOT_LEASED) {
            e->a = s, e->b = t->state[s], e->c = t->owner[s];
            return SHM_PUB_FOREIGN;
        }
    }
    int64_t twice = first_repeated(t->scratch, out, n);
    if (twice >= 0) {
        e->a = out[twice];
        return SHM_PUB_TWICE;
    }
    for (int64_t i = 0; i < n; i++)
        prios[i] = t->priority[out[i]];
    for (int64_t i = 0; i < n; i++) {
        /* NaN fails both comparisons. */
        if (!(prios[i] >= 0.0 && prios[i] <= t->max_priority)) {
            e->a = out[i], e->p = prios[i];
            return SHM_PUB_PRIORITY;
        }
    }
    return SHM_PUB_OK;
}

int64_t shm_round_drain(shm_round *r, shm_pub_error *errors, int64_t *nerrors) {
    int64_t total = 0;
    *nerrors = 0;
    for (int64_t c = 0; c < r->t->max_clients; c++) {
        r->drained_tail[c] = -1;
        if (!r->active[c])
            continue;
        /* PUB_TAIL: the writer's, store-released after the ring entries and the rows. */
        int64_t tail = shm_load_acquire(chan_word(r, c, SHM_CHAN_PUB_TAIL));
        int64_t head = r->pub_head[c];
        if (tail == head)
            continue;
        shm_pub_error *e = &errors[*nerrors];
        int code = drain_one(r, c, head, tail, r->out_slots + total, r->out_prios + total, e);
        if (code != SHM_PUB_OK) {
            e->channel = c;
            e->code = code;
            (*nerrors)++;
            continue;
        }
        r->drained_tail[c] = tail;
        total += tail - head;
    }
    return total;
}

int64_t shm_round_finish(shm_round *r) {
    int64_t done = 0;
    for (int64_t c = 0; c < r->t->max_clients; c++) {
        int64_t tail = r->drained_tail[c];
        if (tail < 0)
            continue;
        r->outstanding[c] -= tail - r->pub_head[c];
        r->pub_head[c] = tail;
        /* PUB_HEAD: the daemon's; released after the commit, for the writer's flush() and its
         * reuse of ring entries. */
        shm_store_release(chan_word(r, c, SHM_CHAN_PUB_HEAD), tail);
        r->drained_tail[c] = -1;
        done++;
    }
    return done;
}

typedef struct {
    int64_t channel, id, pos;
} episode_entry;

static int by_channel_id(const void *pa, const void *pb) {
    const episode_entry *a = pa, *b = pb;
    if (a->channel != b->channel)
        return a->channel < b->channel ? -1 : 1;
    if (a->id != b->id)
        return a->id < b->id ? -1 : 1;
    return (a->pos > b->pos) - (a->pos < b->pos);
}

/* Episodes new to the table among slots (TableCore._count_episodes): per owning channel, the
 * distinct non-zero episode ids other than the one it committed last; its last becomes the id
 * of its last slot in order. Owners outside 0..max_clients-1 are not counted. */
static int count_episodes(shm_table *t, const int64_t *slots, int64_t n) {
    /* One pass, each episode and owner read once: another process may write them meanwhile,
     * and a second read could find more non-zero ids than a first pass counted. */
    episode_entry *e = NULL;
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t id = t->episode[slots[i]];
        int64_t c = t->owner[slots[i]];
        if (id == 0 || c < 0 || c >= t->max_clients)
            continue;
        if (e == NULL && (e = malloc((size_t)(n - i) * sizeof *e)) == NULL)
            return SHM_ENOMEM;
        e[m++] = (episode_entry){c, id, i}; /* m <= n - (first i): within the block */
    }
    if (m == 0)
        return SHM_OK;
    qsort(e, (size_t)m, sizeof *e, by_channel_id);
    int64_t fresh = 0;
    for (int64_t i = 0; i < m;) {
        int64_t c = e[i].channel, last = t->last_episode[c], last_pos = -1, last_id = 0;
        for (; i < m && e[i].channel == c; i++) {
            if ((i == 0 || e[i - 1].channel != c || e[i - 1].id != e[i].id) && e[i].id != last)
                fresh++;
            if (e[i].pos > last_pos)
                last_pos = e[i].pos, last_id = e[i].id;
        }
        t->last_episode[c] = last_id;
    }
    free(e);
    ctrl_word(t, SHM_CTRL_EPISODES)[0] += fresh;
    return SHM_OK;
}

int64_t shm_commit_meta(shm_table *t, int64_t *slots, double *prios, int64_t n) {
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t s = slots[i];
        /* gen: the writer's, made even (store-release) before it published; read after the
         * acquire of PUB_TAIL. */
        if (t->state[s] == SHM_SLOT_LEASED && shm_load_relaxed(&t->gen[s]) % 2 == 0) {
            slots[k] = s;
            prios[k] = prios[i];
            k++;
        }
    }
    if (k == 0)
        return 0;
    /* A slot listed twice (another process changed an owner between two channels' checks, or
     * a caller's list) is committed once, its last listing: stamp each kept slot with its
     * position in the private scratch, keep the positions that still hold their stamp. */
    for (int64_t i = 0; i < k; i++)
        t->scratch[slots[i]] = (int32_t)i;
    int64_t distinct = 0;
    for (int64_t i = 0; i < k; i++) {
        if (t->scratch[slots[i]] == (int32_t)i) {
            slots[distinct] = slots[i];
            prios[distinct] = prios[i];
            distinct++;
        }
    }
    k = distinct;
    for (int64_t i = 0; i < k; i++)
        t->priority[slots[i]] = prios[i];
    if (count_episodes(t, slots, k) < 0)
        return SHM_ENOMEM;
    int64_t seq0 = ctrl_word(t, SHM_CTRL_SEQ)[0];
    for (int64_t i = 0; i < k; i++) {
        int64_t s = slots[i];
        t->seq[s] = seq0 + i;
        t->times_sampled[s] = 0;
        t->owner[s] = -1;
        t->state[s] = SHM_SLOT_READY;
    }
    ctrl_word(t, SHM_CTRL_SEQ)[0] = seq0 + k;
    /* The slots' state first, the counters after: repair() trusts the states. */
    ctrl_word(t, SHM_CTRL_INSERTS)[0] += k;
    ctrl_word(t, SHM_CTRL_TOTAL_INSERTED)[0] += k;
    ctrl_word(t, SHM_CTRL_SIZE)[0] += k;
    ctrl_word(t, SHM_CTRL_COMMITS)[0] += 1;
    return k;
}

int64_t shm_lease_pop(shm_table *t, int64_t channel, int64_t n, int64_t *out) {
    int64_t head = ctrl_word(t, SHM_CTRL_FREE_HEAD)[0];
    int64_t tail = ctrl_word(t, SHM_CTRL_FREE_TAIL)[0];
    if (head < 0 || tail < head || tail - head > t->num_slots)
        return SHM_ECORRUPT;
    int64_t k = tail - head < n ? tail - head : n;
    if (k <= 0)
        return 0;
    int64_t pos = head % t->num_slots; /* head >= 0; one division, not one per slot */
    for (int64_t i = 0; i < k; i++, pos = pos + 1 == t->num_slots ? 0 : pos + 1) {
        int64_t s = t->free_ring[pos];
        if (s < 0 || s >= t->num_slots || t->state[s] != SHM_SLOT_FREE)
            return SHM_ECORRUPT;
        out[i] = s;
    }
    if (first_repeated(t->scratch, out, k) >= 0)
        return SHM_ECORRUPT;
    ctrl_word(t, SHM_CTRL_FREE_HEAD)[0] = head + k;
    for (int64_t i = 0; i < k; i++) {
        int64_t s = out[i];
        uint64_t tag = (t->key[s] >> 32) + 1;
        t->key[s] = (tag << 32) | (uint64_t)s;
        t->owner[s] = (int32_t)channel;
        t->state[s] = SHM_SLOT_LEASED;
    }
    return k;
}

int64_t shm_round_lease(shm_round *r, int64_t c, int64_t n) {
    int64_t slots[SHM_LEASE_CAPACITY];
    if (n > SHM_LEASE_CAPACITY)
        n = SHM_LEASE_CAPACITY;
    int64_t k = shm_lease_pop(r->t, c, n, slots);
    if (k <= 0)
        return k;
    int64_t tail = r->lease_tail[c];
    int64_t *ring = r->lease_ring + c * SHM_LEASE_CAPACITY;
    for (int64_t i = 0; i < k; i++)
        ring[(tail + i) % SHM_LEASE_CAPACITY] = slots[i];
    r->lease_tail[c] = tail + k;
    r->outstanding[c] += k;
    /* LEASE_TAIL: the daemon's; released after the ring entries and the slots' keys. */
    shm_store_release(chan_word(r, c, SHM_CHAN_LEASE_TAIL), tail + k);
    return k;
}

/* ---- The free ring -------------------------------------------------------------------- */

/* FREE_TAIL (any value: shared memory) can take a push of up to num_slots without overflow. */
static int free_tail_valid(const shm_table *t, int64_t tail) {
    return shm_free_tail_fits(t->num_slots, tail);
}

int shm_free_push(shm_table *t, const int64_t *slots, int64_t n) {
    return shm_free_push_ring(t->free_ring, t->num_slots, ctrl_word(t, SHM_CTRL_FREE_TAIL), slots,
                              n);
}

/* ---- The whole commit ------------------------------------------------------------------ */

int shm_commit_check(const shm_table *t, const shm_commit_sel *cs, shm_full_error *e) {
    /* SIZE, FREE_HEAD, FREE_TAIL: ctrl words, written under the mutex; any value. */
    int64_t size = ctrl_word((shm_table *)t, SHM_CTRL_SIZE)[0];
    int64_t head = ctrl_word((shm_table *)t, SHM_CTRL_FREE_HEAD)[0];
    int64_t tail = ctrl_word((shm_table *)t, SHM_CTRL_FREE_TAIL)[0];
    e->changed = 0;
    e->code = SHM_OK;
    if (size < 0 || size > t->num_slots) {
        e->what = SHM_FULL_SIZE, e->a = size;
        return SHM_ECORRUPT;
    }
    /* head >= 0 and tail >= head bound tail - head: no overflow. */
    if (head < 0 || tail < head || tail - head > t->num_slots - size) {
        e->what = SHM_FULL_FREE_ENDS, e->a = head, e->b = tail, e->c = size;
        return SHM_ECORRUPT;
    }
    if (shm_selector_check(&cs->sampler, size, &e->sel) != SHM_OK) {
        e->what = SHM_FULL_SAMPLER;
        return SHM_ECORRUPT;
    }
    if (shm_selector_check(&cs->remover, size, &e->sel) != SHM_OK) {
        e->what = SHM_FULL_REMOVER;
        return SHM_ECORRUPT;
    }
    return SHM_OK;
}

static int64_t selector_failed(shm_full_error *e, int what, int code) {
    e->changed = 1;
    e->what = what;
    e->code = code;
    return SHM_ECORRUPT;
}

int64_t shm_commit_evict(shm_table *t, shm_commit_sel *cs, shm_full_error *e) {
    int64_t size = ctrl_word(t, SHM_CTRL_SIZE)[0];
    /* size was checked in 0..num_slots (and the sets count it) before the inserts, but it is
     * read again from shared memory: checked before the subtraction (no overflow), and the
     * excess bounded, so that the scratch of num_slots items always holds it. */
    if (size < 0 || size > t->num_slots)
        return selector_failed(e, SHM_FULL_REMOVER, SHM_ECORRUPT);
    int64_t excess = size - cs->max_size;
    if (excess <= 0)
        return 0;
    if (excess > t->num_slots)
        return selector_failed(e, SHM_FULL_REMOVER, SHM_ECORRUPT);
    int64_t got = 0;
    if (shm_selector_draws(&cs->remover))
        shm_rng_fill(cs->rng, cs->u, excess);
    int rc = shm_selector_victims(&cs->remover, cs->u, excess, cs->victims, &got);
    if (rc != SHM_OK)
        return selector_failed(e, SHM_FULL_REMOVER, rc);
    if (got == 0)
        return 0;
    const int64_t *v = cs->victims;
    /* The victims come from the remover's arrays: their range is checked by the selector
     * (dense, order and heap return only slots in 0..num_slots-1); checked again, cheaply,
     * because they address the metadata below. */
    for (int64_t i = 0; i < got; i++)
        if (v[i] < 0 || v[i] >= t->num_slots)
            return selector_failed(e, SHM_FULL_REMOVER, SHM_ECORRUPT);
    if ((rc = shm_selector_remove(&cs->sampler, v, got)) != SHM_OK)
        return selector_failed(e, SHM_FULL_SAMPLER, rc);
    if ((rc = shm_selector_remove(&cs->remover, v, got)) != SHM_OK)
        return selector_failed(e, SHM_FULL_REMOVER, rc);
    int64_t tail = ctrl_word(t, SHM_CTRL_FREE_TAIL)[0];
    if (!free_tail_valid(t, tail)) { /* checked before the states change: see shm_free_push */
        e->changed = 1, e->what = SHM_FULL_FREE_TAIL, e->code = SHM_OK, e->a = tail;
        return SHM_ECORRUPT;
    }
    /* TableCore._remove: the slots' state first, the counters after (repair() trusts the
     * states and the deletes). */
    int64_t sampled = 0;
    for (int64_t i = 0; i < got; i++) {
        t->state[v[i]] = SHM_SLOT_FREE;
        sampled += t->times_sampled[v[i]] != 0;
    }
    ctrl_word(t, SHM_CTRL_UNIQUE_SAMPLED)[0] -= sampled;
    ctrl_word(t, SHM_CTRL_SIZE)[0] -= got;
    ctrl_word(t, SHM_CTRL_DELETES)[0] += got;
    shm_free_push(t, v, got); /* the tail was checked above; nobody else wrote it since */
    ctrl_word(t, SHM_CTRL_TOTAL_EVICTED)[0] += got;
    return got;
}

int64_t shm_commit_full(shm_table *t, shm_commit_sel *cs, int64_t *slots, double *prios,
                        int64_t n, shm_full_error *e) {
    if (shm_commit_check(t, cs, e) != SHM_OK)
        return SHM_ECORRUPT;
    int64_t k = shm_commit_meta(t, slots, prios, n);
    if (k <= 0)
        return k;
    e->k = k;
    int rc = shm_selector_insert(&cs->sampler, slots, prios, k);
    if (rc != SHM_OK)
        return selector_failed(e, SHM_FULL_SAMPLER, rc);
    if ((rc = shm_selector_insert(&cs->remover, slots, prios, k)) != SHM_OK)
        return selector_failed(e, SHM_FULL_REMOVER, rc);
    int64_t ev = shm_commit_evict(t, cs, e);
    return ev < 0 ? ev : k;
}

/* ---- The daemon's loop ------------------------------------------------------------------ */

double shm_monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Event.post: wake up to ``waiters`` sleepers, without piling up posts nobody will take. */
static void post_waiters(sem_t *sem, int64_t waiters) {
    int value = 0;
    if (sem == NULL || waiters <= 0 || sem_getvalue(sem, &value) != 0)
        return;
    for (int64_t i = value > 0 ? value : 0; i < waiters; i++)
        sem_post(sem);
}

enum { REFILL_PYTHON = -1, REFILL_DEAD_OWNER = -2 };

/* Daemon._refill: lease free slots to the writers that want some. Returns how many were
 * leased (*leased too), or REFILL_PYTHON when Python must do it (a writer wrote nonsense, the
 * counts need a repair, the lock is busy, the limiter's numbers make no sense) with the lock
 * released, or REFILL_DEAD_OWNER with the lock held (its previous owner died). */
static int64_t loop_refill(shm_loop_table *lt, int64_t *leased) {
    shm_round *r = lt->r;
    shm_table *t = r->t;
    const int64_t m = t->max_clients;
    int64_t *ch = lt->scratch, *want = ch + m, *have = want + m, *give = have + m;
    *leased = 0;
    lt->starved = 0;
    int limited = shm_limiter_blocks_inserts(&lt->lim);
    int64_t k = shm_round_wanting(r, ch, want, have); /* active channels only */
    if (k == 0)
        return 0;
    for (int64_t i = 0; i < k; i++) /* the writers move their lease heads: checked */
        if (want[i] < 0 || have[i] < 0 || have[i] > SHM_LEASE_CAPACITY)
            return REFILL_PYTHON; /* _refill cuts them off */
    int64_t pending = 0;
    for (int64_t c = 0; c < m; c++)
        pending += r->outstanding[c]; /* ours: each in 0..LEASE_CAPACITY + PUBLISH_CAPACITY */
    if (limited) {
        /* A hint, without the lock: counters move towards more budget only through a sample,
         * a delete or a reset, each of which posts us (see starved). */
        int64_t a = shm_insert_allowance(&lt->lim, 1, pending);
        if (a < 0)
            return REFILL_PYTHON;
        if (a == 0) {
            lt->starved = 1;
            return 0;
        }
    }
    int64_t share = lt->headroom / (2 * k);
    share = share < 1 ? 1 : share > SHM_LEASE_CAPACITY ? SHM_LEASE_CAPACITY : share;
    if (!limited) { /* keep every writer's lease ring filled, refilling at half */
        int any = 0;
        for (int64_t i = 0; i < k; i++)
            any |= (give[i] = have[i] <= share / 2 ? share - have[i] : 0) > 0;
        if (!any)
            return 0;
    }
    /* Writers served first get the limiter's budget (or the last free slots) first: rotate
     * who that is. */
    int64_t shift = 0;
    if (k > 1)
        shift = (int64_t)(++lt->rotation % (uint64_t)k);
    int rc = pthread_mutex_trylock(lt->mutex);
    if (rc == EOWNERDEAD)
        return REFILL_DEAD_OWNER;
    if (rc != 0)
        return REFILL_PYTHON; /* Python waits for it, with its stall warnings */
    if (shm_commit_check(t, lt->cs, lt->err) != SHM_OK) {
        pthread_mutex_unlock(lt->mutex);
        return REFILL_PYTHON; /* check_counts repairs */
    }
    int64_t budget, need = 0;
    if (limited) {
        /* What each writer asked for (Table._wait_for_lease), and more ahead of need only out
         * of a wide budget: at most a quarter of what the limiter allows now is shared out
         * ahead, so that a writer going idle cannot hoard it. */
        int64_t free = shm_insert_allowance(&lt->lim, SHM_LEASE_CAPACITY * k, pending);
        if (free < 0)
            goto python;
        int64_t ahead = free / (4 * k);
        ahead = ahead < share ? ahead : share;
        for (int64_t i = 0; i < k; i++) {
            int64_t w = want[i] < SHM_LEASE_CAPACITY ? want[i] : SHM_LEASE_CAPACITY;
            int64_t g = (w > ahead ? w : ahead) - have[i];
            give[i] = g < 0 ? 0 : g > SHM_LEASE_CAPACITY ? SHM_LEASE_CAPACITY : g;
        }
    }
    for (int64_t i = 0; i < k; i++)
        need += give[i];
    if ((budget = shm_insert_allowance(&lt->lim, need, pending)) < 0)
        goto python;
    lt->starved = limited && budget <= 0 && need > 0;
    for (int64_t j = 0; j < k; j++) {
        int64_t i = (j + shift) % k;
        int64_t n = give[i] < budget ? give[i] : budget;
        if (n <= 0)
            continue;
        int64_t got = shm_round_lease(r, ch[i], n); /* LEASE_TAIL store-release inside */
        if (got < 0)
            goto python; /* the free ring lists a slot that is not one, or not free, or twice */
        if (got == 0)
            break;
        budget -= got;
        *leased += got;
    }
    pthread_mutex_unlock(lt->mutex);
    lt->holding = 0;
    for (int64_t i = 0; i < k; i++)
        lt->holding += have[i] + give[i]; /* at most: what a short budget gave is less */
    return *leased;
python:
    pthread_mutex_unlock(lt->mutex);
    return REFILL_PYTHON;
}

/* After a round: wake the samplers waiting for items and the writers waiting for leases or
 * for their commit (the waiters' side stores its flag, fences, re-checks: shm_round_waiters
 * fences first). */
static void loop_wake(shm_loop_table *lt, int64_t committed, int64_t drained, int64_t leased) {
    shm_round *r = lt->r;
    int64_t wait_insert, wait_sample;
    shm_round_waiters(r, &wait_insert, &wait_sample);
    if (committed > 0 && wait_sample > 0) /* a waiting sampler is on the critical path */
        post_waiters(lt->sample, wait_sample);
    int64_t *hint = ctrl_word(r->t, SHM_CTRL_SAMPLER_WAITING);
    if (shm_load_relaxed(hint) != 0) {
        /* Clear the hint, then re-check: a sampler sets its flag before the hint. */
        shm_store_relaxed(hint, 0);
        shm_round_waiters(r, &wait_insert, &wait_sample);
        if (wait_sample > 0)
            shm_store_relaxed(hint, 1);
    }
    if ((drained > 0 || leased > 0) && wait_insert > 0)
        post_waiters(lt->insert, wait_insert);
}

/* One table's round (Daemon._commit_and_lease). 0: done (*worked set when it did anything);
 * 1: Python's turn, *x filled. */
static int loop_round(shm_loop_table *lt, shm_loop_exit *x, int *worked) {
    shm_round *r = lt->r;
    int64_t nerr = 0, committed = 0, leased = 0;
    int64_t n = shm_round_drain(r, lt->errors, &nerr);
    x->n = n, x->nerr = nerr;
    if (nerr > 0) {
        x->hand = SHM_HAND_REFUSED;
        return 1;
    }
    if (n > 0) {
        /* The table's mutex, tried once: a holder (a sampler) makes Python wait for it. */
        int rc = pthread_mutex_trylock(lt->mutex);
        if (rc != 0) {
            x->hand = rc == EOWNERDEAD ? SHM_HAND_DEAD_OWNER : SHM_HAND_BUSY;
            return 1;
        }
        committed = shm_commit_full(r->t, lt->cs, r->out_slots, r->out_prios, n, lt->err);
        pthread_mutex_unlock(lt->mutex);
        if (committed < 0) {
            /* SHM_ECORRUPT having changed nothing, or SHM_ENOMEM: Python commits (repairs). */
            x->hand = committed == SHM_ECORRUPT && lt->err->changed ? SHM_HAND_SELECTOR
                                                                    : SHM_HAND_BUSY;
            return 1;
        }
        shm_round_finish(r); /* PUB_HEAD store-release per drained channel */
    }
    int64_t got = loop_refill(lt, &leased);
    loop_wake(lt, committed, n, leased);
    if (got == REFILL_PYTHON || got == REFILL_DEAD_OWNER) {
        x->hand = got == REFILL_PYTHON ? SHM_HAND_REFILL : SHM_HAND_DEAD_OWNER;
        x->n = 0, x->nerr = 0; /* committed and finished: nothing drained is pending */
        return 1;
    }
    *worked |= n > 0 || leased > 0;
    lt->leased += leased;
    return 0;
}

/* The lease pace: while writers consume their leases fast, nap no longer than it takes them to
 * use half of what they hold, so that the next round refills them before they run low (a
 * writer that runs low posts us and waits for the wake-up: ~0.1 ms on a virtual machine, the
 * time it takes to use up a lease ring at 10M items/s). From each table's slots leased since
 * the previous pace over the time since then: nap = min(holding / 2 / rate) over the tables,
 * bounded by min_nap_s and nap_s. A trickle (the paced workload) leaves it at nap_s. */
static void loop_pace(shm_loop *L, double now) {
    double nap = L->nap_s, dt = now - L->last_pace;
    L->last_pace = now;
    for (int64_t i = 0; i < L->ntables; i++) {
        shm_loop_table *lt = &L->tables[i];
        if (lt->leased > 0 && dt > 0.0) {
            double t = 0.5 * (double)lt->holding * dt / (double)lt->leased;
            nap = t < nap ? t : nap;
        }
        lt->leased = 0;
    }
    L->pace_nap_s = nap > L->min_nap_s ? nap : L->min_nap_s;
}

/* A timed wait on the semaphore until posted or ``timeout`` seconds pass: 0, or EINTR. */
static int loop_wait(sem_t *sem, double timeout) {
    if (timeout <= 0.0)
        return sem_trywait(sem) == 0 || errno != EINTR ? 0 : EINTR;
    struct timespec at;
    clock_gettime(CLOCK_MONOTONIC, &at);
    double whole = floor(timeout);
    at.tv_sec += (time_t)whole;
    at.tv_nsec += (long)((timeout - whole) * 1e9);
    if (at.tv_nsec >= 1000000000L)
        at.tv_sec += 1, at.tv_nsec -= 1000000000L;
    while (sem_clockwait(sem, CLOCK_MONOTONIC, &at) != 0) {
        if (errno == EINTR)
            return EINTR;
        if (errno != EAGAIN) /* ETIMEDOUT (or EINVAL: treated as a timeout) */
            return 0;
    }
    return 0;
}

/* Daemon._sleep: nap while writers are busy (they need not wake us per item); sleep until
 * posted once they have been quiet for the active window. The daemon's half of the Dekker
 * pair with a publishing writer: raise the flag (store, seq_cst fence), then look at every
 * PUB_TAIL; a writer stores its PUB_TAIL, fences, then looks at the flag. Returns 0 or EINTR. */
static int loop_sleep(shm_loop *L, int active, double deadline) {
    int writers = 0, state = 0, rc = 0;
    for (int64_t i = 0; active && !writers && i < L->ntables; i++) {
        shm_loop_table *lt = &L->tables[i];
        writers = !lt->broken && !lt->starved && shm_round_any_writer(lt->r);
    }
    int64_t flag = writers ? SHM_SLEEP_NAP : SHM_SLEEP_IDLE;
    for (int64_t i = 0; i < L->ntables; i++)
        if (!L->tables[i].broken)
            state |= shm_round_settle(L->tables[i].r, flag);
    /* The commit policy. Writers active and nobody waiting on us: nap, even if items were
     * published meanwhile (committed at the nap's end: a round per nap, not per item). A
     * writer low on leases, a flush or a waiting sampler posts us and ends the nap at once.
     * Otherwise re-check after raising the flag: a writer that published before seeing it did
     * not post. */
    int urgent = !writers || (state & SHM_SETTLE_URGENT);
    if (!urgent || !(state & SHM_SETTLE_PENDING)) {
        double timeout = writers ? L->pace_nap_s : L->idle_s, left = deadline - shm_monotonic();
        L->naps++;
        rc = loop_wait(L->wake, timeout < left ? timeout : left);
    }
    for (int64_t i = 0; i < L->ntables; i++)
        if (!L->tables[i].broken) /* DAEMON_SLEEPING: the daemon's */
            shm_store_relaxed(ctrl_word(L->tables[i].r->t, SHM_CTRL_DAEMON_SLEEPING),
                              SHM_SLEEP_AWAKE);
    return rc;
}

int shm_loop_serve(shm_loop *L, double deadline, shm_loop_exit *x) {
    x->hand = 0, x->table = -1, x->n = 0, x->nerr = 0;
    for (;;) {
        int worked = 0;
        for (int64_t i = 0; i < L->ntables; i++) {
            if (L->tables[i].broken)
                continue;
            if (loop_round(&L->tables[i], x, &worked)) {
                L->last_work = shm_monotonic(); /* Python's round works for it */
                x->table = i;
                return x->code = SHM_LOOP_TABLE;
            }
        }
        L->rounds++;
        double now = shm_monotonic();
        if (worked)
            L->last_work = now;
        /* attention: Python's, set before it posts wake. */
        if (shm_load_relaxed(L->attention) != 0)
            return x->code = SHM_LOOP_ATTENTION;
        if (now >= deadline)
            return x->code = SHM_LOOP_DEADLINE;
        loop_pace(L, now);
        if (loop_sleep(L, now - L->last_work < L->active_window_s, deadline) == EINTR)
            return x->code = SHM_LOOP_INTERRUPTED;
    }
}
