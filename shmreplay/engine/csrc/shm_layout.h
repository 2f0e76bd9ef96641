/* The fixed part of a table segment's layout: ring capacities and the index of every control
 * word. This header is the one definition: shmreplay/engine/layout.py takes these values from the
 * compiled module (module.c exports each one), so C and Python cannot drift apart. The arrays'
 * offsets are computed once, in layout.compute_layout, and C receives them as the buffers of the
 * arrays it works on.
 *
 * Every control word is an int64 at the start of its own 64-byte line: word w of a block of
 * lines is at index w * SHM_LINE.
 */
#ifndef SHM_LAYOUT_H
#define SHM_LAYOUT_H

#define SHM_LINE 8 /* int64 words per 64-byte line */

/* A writer holds at most SHM_LEASE_CAPACITY leased slots; the publish ring is larger than the
 * lease ring so that a writer never waits for room to publish what it was leased. */
#define SHM_LEASE_CAPACITY 2048
#define SHM_PUBLISH_CAPACITY 4096
/* A writer with this many leased slots left or fewer wakes a napping daemon to refill them. */
#define SHM_LEASE_LOW_WATER 32

/* The table's control lines (layout.Ctrl). */
enum {
    SHM_CTRL_INSERTS = 0,
    SHM_CTRL_SAMPLES = 1,
    SHM_CTRL_DELETES = 2,
    SHM_CTRL_SIZE = 3,
    SHM_CTRL_SEQ = 4,
    SHM_CTRL_FREE_HEAD = 5,
    SHM_CTRL_FREE_TAIL = 6,
    SHM_CTRL_SHUTDOWN = 7,
    SHM_CTRL_DAEMON_PID = 8,
    SHM_CTRL_DAEMON_SLEEPING = 9,
    SHM_CTRL_TOTAL_INSERTED = 10,
    SHM_CTRL_TOTAL_SAMPLED = 11,
    SHM_CTRL_REPAIRS = 12,
    SHM_CTRL_RESETS = 13,
    SHM_CTRL_UNIQUE_SAMPLED = 14,
    SHM_CTRL_COMMITS = 15,
    SHM_CTRL_READY = 16,
    SHM_CTRL_TOTAL_EVICTED = 17,
    SHM_CTRL_SAMPLER_WAITING = 18,
    SHM_CTRL_EPISODES = 19,
    SHM_CTRL_DAEMON_START = 20,
    SHM_CTRL_TABLE_STATE = 21,
    SHM_CTRL_COUNT = 24,
};

/* A writer channel's control lines (layout.Chan). */
enum {
    SHM_CHAN_PID = 0,
    SHM_CHAN_LEASE_HEAD = 1,
    SHM_CHAN_LEASE_TAIL = 2,
    SHM_CHAN_PUB_HEAD = 3,
    SHM_CHAN_PUB_TAIL = 4,
    SHM_CHAN_WANT_LEASE = 5,
    SHM_CHAN_WAIT_SAMPLE = 6,
    SHM_CHAN_WAIT_INSERT = 7,
    SHM_CHAN_COUNT = 8,
};

/* meta.state of a slot (layout.SlotState). */
enum { SHM_SLOT_FREE = 0, SHM_SLOT_LEASED = 1, SHM_SLOT_READY = 2, SHM_SLOT_RELEASING = 3 };

/* ctrl[SHM_CTRL_DAEMON_SLEEPING] (layout.Sleep). */
enum { SHM_SLEEP_AWAKE = 0, SHM_SLEEP_NAP = 1, SHM_SLEEP_IDLE = 2 };

/* ctrl[SHM_CTRL_TABLE_STATE] (layout.TableState). */
enum { SHM_TABLE_OK = 0, SHM_TABLE_QUARANTINED = 1 };

/* The rate limiter's float64 parameter lines (layout.Param), changeable at run time. */
enum {
    SHM_PARAM_SAMPLES_PER_INSERT = 0,
    SHM_PARAM_MIN_SIZE_TO_SAMPLE = 1,
    SHM_PARAM_MIN_DIFF = 2,
    SHM_PARAM_MAX_DIFF = 3,
    SHM_PARAM_KIND = 4, /* index in config.RATE_LIMITER_KINDS */
    SHM_PARAM_COUNT = 8,
};

#endif
