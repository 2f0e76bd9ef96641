/* The daemon's commit round (see commit.h). The reference model is tests/reference/commit.py;
 * tests/test_engine_commit.py holds this code to it. */
#include "commit.h"

#include <math.h>
#include <stdlib.h>

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
    for (int64_t i = 0; i < k; i++) {
        int64_t s = t->free_ring[(head + i) % t->num_slots];
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
    if (tail < 0 || tail > INT64_MAX - t->num_slots) { /* the pushes below must not overflow */
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
    for (int64_t i = 0; i < got; i++)
        t->free_ring[(tail + i) % t->num_slots] = v[i];
    ctrl_word(t, SHM_CTRL_FREE_TAIL)[0] = tail + got;
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
