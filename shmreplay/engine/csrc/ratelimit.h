/* Reverb's rate limiter over a table's shared counters and parameters (shmreplay/ratelimit.py
 * documents the rule; tests/reference/ratelimit.py is the reference model that
 * tests/test_engine_ratelimit.py holds this code to). Plain C, no Python.h.
 *
 * Everything is read from shared memory another process may write: any value gives an answer
 * or SHM_ECORRUPT (where Python's arithmetic raised: a NaN, an infinite floor), never a crash
 * or an overflow. The counters' arithmetic is exact (128-bit), as Python's integers were.
 */
#ifndef SHM_RATELIMIT_H
#define SHM_RATELIMIT_H

#include <stdint.h>

#include "shm_layout.h" /* SHM_PARAM_*: where each parameter lies */

/* Where a table's limiter reads: params[i * pstride] (float64) and ctrl[w * cstride] (int64,
 * the Ctrl words INSERTS, SAMPLES, DELETES); both borrowed, shared. */
typedef struct {
    const double *params;
    int64_t pstride;
    const int64_t *ctrl;
    int64_t cstride;
} shm_limiter;

/* Whether inserts can be held back at all (MAX_DIFF is not +inf; MinSize's never are). */
int shm_limiter_blocks_inserts(const shm_limiter *l);

/* How many of n (>= 0) inserts may go ahead, counting pending (>= 0) ones as already in:
 * max(0, min(n, max(trunc(min_size) - (inserts + pending - deletes),
 *                   floor((max_diff + samples) / spi - (inserts + pending) + 1e-9)))),
 * n when MAX_DIFF is +inf. SHM_ECORRUPT where Python raised (min_size or the floor not finite
 * when it is needed). */
int64_t shm_insert_allowance(const shm_limiter *l, int64_t n, int64_t pending);

/* How many of n (>= 0) samples may go ahead now: 0 while inserts - deletes < min_size, n when
 * MIN_DIFF is -inf, else max(0, min(n, floor(inserts * spi - samples - min_diff + 1e-9))).
 * SHM_ECORRUPT where Python raised (the floor not finite). */
int64_t shm_sample_allowance(const shm_limiter *l, int64_t n);

#endif
