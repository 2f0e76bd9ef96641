/* Reverb's rate limiter (see ratelimit.h). The floating-point steps are Python's, in its order
 * (C11 in ISO mode does not contract a*b+c into an FMA: -std=c11 implies -ffp-contract=off), so
 * the answers are bit-for-bit those of tests/reference/ratelimit.py. */
#include "ratelimit.h"

#include <math.h>

#include "shm_atomics.h"
#include "shm_layout.h"
#include "shm_status.h"

typedef __int128 wide; /* counters plus pending, minus deletes: exact, as Python's ints */

static inline double param(const shm_limiter *l, int i) {
    /* Parameter lines: written under the mutex by a reconfiguration; any value. */
    return l->params[i * l->pstride];
}

static inline int64_t counter(const shm_limiter *l, int w) {
    /* INSERTS, SAMPLES, DELETES: written under the mutex by the daemon and the samplers. */
    return shm_load_relaxed(l->ctrl + w * l->cstride);
}

/* x clamped into 0..n (n >= 0). */
static inline int64_t clamp_wide(wide x, int64_t n) { return x <= 0 ? 0 : x >= n ? n : (int64_t)x; }

/* floor(x) clamped into 0..n; x is finite (checked by the caller). */
static inline int64_t clamp_floor(double x, int64_t n) {
    double f = floor(x);
    if (f <= 0.0)
        return 0;
    if (f >= 0x1p63) /* beyond int64: above every n */
        return n;
    int64_t i = (int64_t)f; /* exact: f is an integer below 2**63 */
    return i < n ? i : n;
}

int shm_limiter_blocks_inserts(const shm_limiter *l) {
    return param(l, SHM_PARAM_MAX_DIFF) != INFINITY;
}

int64_t shm_insert_allowance(const shm_limiter *l, int64_t n, int64_t pending) {
    double spi = param(l, SHM_PARAM_SAMPLES_PER_INSERT);
    double min_size = param(l, SHM_PARAM_MIN_SIZE_TO_SAMPLE);
    double max_diff = param(l, SHM_PARAM_MAX_DIFF);
    if (max_diff == INFINITY)
        return n;
    wide inserts = (wide)counter(l, SHM_CTRL_INSERTS) + pending;
    int64_t deletes = counter(l, SHM_CTRL_DELETES), samples = counter(l, SHM_CTRL_SAMPLES);
    if (!isfinite(min_size)) /* int(inf) and int(nan) raise */
        return SHM_ECORRUPT;
    /* trunc(min_size) beyond +-2**100 is ordered like the true value against every other term
     * (each below 2**66 in magnitude), and the result is clamped into 0..n. */
    double m = trunc(min_size);
    m = m > 0x1p100 ? 0x1p100 : m < -0x1p100 ? -0x1p100 : m;
    wide below_min = (wide)m - (inserts - deletes);
    double x = (max_diff + (double)samples) / spi - (double)inserts + 1e-9;
    if (!isfinite(x)) /* math.floor of inf or nan raises */
        return SHM_ECORRUPT;
    /* clamp(max(a, b)) = max(clamp(a), clamp(b)): clamping is monotone. */
    int64_t a = clamp_wide(below_min, n), b = clamp_floor(x, n);
    return a > b ? a : b;
}

int64_t shm_sample_allowance(const shm_limiter *l, int64_t n) {
    wide inserts = counter(l, SHM_CTRL_INSERTS), deletes = counter(l, SHM_CTRL_DELETES);
    /* numpy compares the int with the float64 as float64. */
    if ((double)(inserts - deletes) < param(l, SHM_PARAM_MIN_SIZE_TO_SAMPLE))
        return 0;
    double min_diff = param(l, SHM_PARAM_MIN_DIFF);
    if (min_diff == -INFINITY)
        return n;
    double cursor = (double)inserts * param(l, SHM_PARAM_SAMPLES_PER_INSERT) -
                    (double)counter(l, SHM_CTRL_SAMPLES);
    double x = cursor - min_diff + 1e-9;
    if (!isfinite(x))
        return SHM_ECORRUPT;
    return clamp_floor(x, n);
}
