/* The daemon's commit round: drain and check what writers published, commit its metadata,
 * lease free slots. Plain C over the segment's arrays (no Python.h): see commit.c.
 *
 * Everything read from the segment is hostile (any process of the group can write any byte):
 * indices and counts are range-checked before they address memory.
 */
#ifndef SHM_COMMIT_H
#define SHM_COMMIT_H

#include <pthread.h>
#include <semaphore.h>
#include <stdint.h>

#include "free_ring.h" /* shm_free_push_ring: the one rule of every push */
#include "ratelimit.h"
#include "rng.h"
#include "selector.h"
#include "shm_layout.h"
#include "shm_status.h"

/* Why a channel's publish run was refused (the binding turns it into check_published's text). */
enum {
    SHM_PUB_OK = 0,
    SHM_PUB_BEHIND,   /* a = tail, b = head */
    SHM_PUB_AHEAD,    /* a = tail, b = n, c = head, d = held */
    SHM_PUB_RANGE,    /* a = slot */
    SHM_PUB_FOREIGN,  /* a = slot, b = state, c = owner */
    SHM_PUB_TWICE,    /* a = slot */
    SHM_PUB_PRIORITY, /* a = slot, p = priority */
};

typedef struct {
    int64_t channel;
    int code;
    int64_t a, b, c, d;
    double p;
} shm_pub_error;

/* One table's arrays (borrowed, shared) and the daemon's private scratch. */
typedef struct {
    int64_t num_slots;
    int64_t max_clients;
    double max_priority;
    int64_t *ctrl; /* [Ctrl.COUNT][LINE] */
    uint64_t *key;
    uint8_t *state;
    double *priority;
    int32_t *times_sampled;
    int64_t *seq;
    int64_t *gen;
    int32_t *owner;
    int64_t *episode;
    int64_t *free_ring; /* [num_slots] */
    int64_t *last_episode; /* private: [max_clients], the episode each channel committed last */
    int32_t *scratch;      /* private: [num_slots], the duplicate check */
} shm_table;

/* The daemon's per-table round state: the channels' rings and its own copies of their ends. */
typedef struct {
    shm_table *t;
    int64_t *chan;         /* [max_clients][Chan.COUNT][LINE] */
    int64_t *lease_ring;   /* [max_clients][LEASE_CAPACITY] */
    int64_t *publish_ring; /* [max_clients][PUBLISH_CAPACITY] */
    uint8_t *active;       /* private: channels whose rings are read */
    int64_t *pub_head;     /* private: the daemon's copy of each PUB_HEAD */
    int64_t *lease_tail;   /* private: the daemon's copy of each LEASE_TAIL */
    int64_t *outstanding;  /* private: slots leased and not yet committed, per channel */
    int64_t *drained_tail; /* private: [max_clients], the tail drained this round, -1 none */
    int64_t *out_slots;    /* private: [max_clients * PUBLISH_CAPACITY] */
    double *out_prios;
} shm_round;

/* The active channels whose WANT_LEASE is not 0: channel, want and have (the daemon's lease
 * tail minus the acquired LEASE_HEAD: unchecked) into the three arrays (max_clients each).
 * Returns how many. */
int64_t shm_round_wanting(const shm_round *r, int64_t *channel, int64_t *want, int64_t *have);

/* The daemon's side of the sleeping-flag Dekker pair: store DAEMON_SLEEPING, then a seq_cst
 * fence, so that the PUB_TAIL loads of a following shm_round_pending cannot pass the store. */
void shm_round_set_sleeping(shm_round *r, int64_t value);

/* After the round's LEASE_TAIL/PUB_HEAD stores: a seq_cst fence, then count the channels whose
 * WAIT_INSERT (and WAIT_SAMPLE) is set (the waiters' side stores its flag, fences, re-checks). */
void shm_round_waiters(const shm_round *r, int64_t *wait_insert, int64_t *wait_sample);

/* Whether any active channel's PUB_TAIL moved past the daemon's head (acquire loads). */
int shm_round_pending(const shm_round *r);

/* Whether any active channel's WANT_LEASE is > 0 (a writer is writing). */
int shm_round_any_writer(const shm_round *r);

/* Before the daemon sleeps: shm_round_set_sleeping(flag), then SHM_SETTLE_URGENT when a
 * sampler waits (SAMPLER_WAITING) or a channel's WAIT_INSERT is set (after the fence of
 * shm_round_waiters), SHM_SETTLE_PENDING when shm_round_pending. */
enum { SHM_SETTLE_URGENT = 1, SHM_SETTLE_PENDING = 2 };
int shm_round_settle(shm_round *r, int64_t flag);

/* Drain every active channel: acquire PUB_TAIL, check the run, copy its slots and priorities
 * once into out_slots/out_prios, channel after channel. Returns the items copied; refused runs
 * are written to errors[0..*nerrors) (capacity max_clients) and not copied. */
int64_t shm_round_drain(shm_round *r, shm_pub_error *errors, int64_t *nerrors);

/* After the drained items were committed: per drained channel, outstanding -= run, head =
 * tail, PUB_HEAD store-release. Returns how many channels. */
int64_t shm_round_finish(shm_round *r);

/* Commit the metadata of ``slots`` (distinct, in range) with ``prios``: keep those still
 * LEASED with an even generation (compacted in place, prios likewise), then priority, episodes
 * counted, seq, times_sampled, owner, state READY, counters. Returns how many were kept, or
 * SHM_ENOMEM. The selectors are the caller's (the seam: a later step inserts here). */
int64_t shm_commit_meta(shm_table *t, int64_t *slots, double *prios, int64_t n);

/* Take up to n free slots into out (fresh key tags, owner, LEASED). Returns how many, or
 * SHM_ECORRUPT when the free ring's ends or entries make no sense (nothing changed then:
 * rebuild the free ring and call again). */
int64_t shm_lease_pop(shm_table *t, int64_t channel, int64_t n, int64_t *out);

/* Lease up to n slots to channel c and publish them on its lease ring (LEASE_TAIL
 * store-release). Returns how many, or SHM_ECORRUPT as shm_lease_pop. */
int64_t shm_round_lease(shm_round *r, int64_t c, int64_t n);

/* ---- The whole commit: metadata, selectors, eviction (TableCore.commit) ---------------- */

/* The table's selectors and the daemon's PRNG, with scratch for one eviction. */
typedef struct {
    shm_selector sampler, remover;
    shm_rng *rng;
    int64_t max_size;
    int64_t *victims; /* private: [num_slots] */
    double *u;        /* private: [num_slots] */
} shm_commit_sel;

/* Where a full commit stopped (shm_commit_full, shm_commit_evict). */
enum {
    SHM_FULL_SIZE = 1,     /* a = size: outside 0..num_slots */
    SHM_FULL_FREE_ENDS,    /* a = head, b = tail, c = size: the free ring cannot fit */
    SHM_FULL_SAMPLER,      /* sel (check) or code (a selector call failed) */
    SHM_FULL_REMOVER,
    SHM_FULL_FREE_TAIL,    /* a = tail: negative when the victims were to be pushed */
};

typedef struct {
    int changed; /* 0: nothing was changed (repair, call again); 1: the metadata was committed
                  * (k items), the selectors failed: repair (it takes the new items), evict */
    int what;    /* SHM_FULL_* */
    int code;    /* the selector's status when a call failed, SHM_OK when its check did */
    int64_t a, b, c, k;
    shm_sel_problem sel;
} shm_full_error;

/* check_counts: the size and the free ring's ends against the table, then each selector's O(1)
 * check. SHM_OK or SHM_ECORRUPT (*e filled, changed 0). */
int shm_commit_check(const shm_table *t, const shm_commit_sel *cs, shm_full_error *e);

/* Evict what exceeds max_size: victims from the remover (uniforms from the PRNG when it draws,
 * one per victim), removed from the sampler then the remover, their states FREE, the counters
 * (UNIQUE_SAMPLED, SIZE, DELETES, TOTAL_EVICTED) and the free ring's tail. Returns how many, or
 * SHM_ECORRUPT (*e filled, changed 1: the victims are still READY; repair and call again). */
int64_t shm_commit_evict(shm_table *t, shm_commit_sel *cs, shm_full_error *e);

/* TableCore.commit in one call: shm_commit_check, shm_commit_meta, the sampler's then the
 * remover's insert of the kept items, shm_commit_evict. Returns how many were committed,
 * SHM_ENOMEM, or SHM_ECORRUPT with *e saying whether anything changed. */
int64_t shm_commit_full(shm_table *t, shm_commit_sel *cs, int64_t *slots, double *prios,
                        int64_t n, shm_full_error *e);

/* shm_free_push_ring on table t's ring. */
int shm_free_push(shm_table *t, const int64_t *slots, int64_t n);

/* ---- The daemon's loop: rounds, leases, wake-ups and naps in one call ----------------- */

/* One table as the loop serves it (all borrowed; the binding owns them). */
typedef struct {
    shm_round *r;
    shm_commit_sel *cs;
    shm_full_error *err;   /* the last full commit's failure (CommitTable's) */
    shm_pub_error *errors; /* [max_clients]: refused runs (CommitRound's) */
    pthread_mutex_t *mutex;
    shm_limiter lim;
    int64_t headroom;      /* spec.headroom: how many leased slots the writers share */
    sem_t *sample, *insert; /* the table's events: waiting samplers, waiting writers */
    int64_t *scratch;      /* private: [4 * max_clients], the refill's channel/want/have/give */
    int broken;            /* quarantined: not served */
    int starved;           /* the limiter left nothing to lease to writers that want some */
    uint64_t rotation;     /* which wanting writer is served first next time */
    int64_t leased;        /* leased by this table's rounds since the last loop_pace */
    int64_t holding;       /* after the last refill: slots the wanting writers hold in all */
} shm_loop_table;

/* Why shm_loop_serve returned. */
enum {
    SHM_LOOP_DEADLINE = 0, /* the deadline passed (Python's timers: liveness, checkpoints) */
    SHM_LOOP_ATTENTION,    /* *attention was set (a stop, a departed or new client) */
    SHM_LOOP_INTERRUPTED,  /* a signal interrupted the wait (its handler runs in Python) */
    SHM_LOOP_TABLE,        /* table x->table needs Python: x->hand says what for */
};

/* What a table hands to Python (the daemon's _commit_and_lease, with commit_round's result):
 * nothing committed and the run state is as after CommitRound.drain (x->n items drained into
 * out_slots, x->nerr refused runs in errors) for REFUSED and BUSY; the lock is held (its
 * previous owner died) for DEAD_OWNER (x->n drained, or 0 when it was met while leasing); the
 * metadata committed, a selector failed (the lock released) for SELECTOR; for REFILL what was
 * published is committed and its waiters posted, and the leases need Python (a writer to cut
 * off, counts to repair, a busy lock). */
enum { SHM_HAND_REFUSED = 1, SHM_HAND_BUSY, SHM_HAND_DEAD_OWNER, SHM_HAND_SELECTOR, SHM_HAND_REFILL };

typedef struct {
    int code, hand;
    int64_t table, n, nerr;
} shm_loop_exit;

typedef struct {
    shm_loop_table *tables;
    int64_t ntables;
    sem_t *wake;               /* the daemon's event: writers and samplers post it */
    const int64_t *attention;  /* Python sets it (relaxed) and posts wake: return to Python */
    double nap_s;              /* writers active: the longest nap (the commit latency bound) */
    double idle_s;             /* writers quiet: the longest sleep (the next publish posts) */
    double active_window_s;    /* writers quiet this long: sleep, do not nap */
    double min_nap_s;          /* the shortest nap the lease pace may ask for */
    double last_work;          /* CLOCK_MONOTONIC seconds of the last round that did work */
    double last_pace;          /* CLOCK_MONOTONIC seconds of the last loop_pace */
    double pace_nap_s;         /* the nap the writers' lease pace asks for (see loop_pace) */
    int64_t rounds, naps;      /* statistics: rounds served, timed waits */
} shm_loop;

/* The shortest nap the lease pace asks for, as a fraction of nap_s (2 ms: 50 us, about the
 * CPU a wake-up costs: the loop spends at most about half its time waking up). */
#define SHM_LOOP_MIN_NAP_FRACTION 0.025

/* CLOCK_MONOTONIC in seconds (time.monotonic()'s clock). */
double shm_monotonic(void);

/* The daemon's loop (Daemon.serve_forever's steady state) until the CLOCK_MONOTONIC deadline
 * or something needs Python: per table, drain and commit (one trylock, as commit_round), the
 * refill of the writers' leases (the limiter's budget, headroom, rotation: Daemon._refill),
 * the waiters' posts; then settle and a timed wait on wake (Daemon._sleep). Blocks (call it
 * without the GIL). Fills *x and returns x->code. */
int shm_loop_serve(shm_loop *L, double deadline, shm_loop_exit *x);

#endif
