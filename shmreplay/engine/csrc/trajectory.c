/* The trajectory writer's batch gather and the n-step adder's window sum (trajectory.h). */
#include "trajectory.h"

#include <string.h>

#include "shm_status.h"

int shm_traj_gather(const uint8_t *ring, int64_t rows, size_t step_bytes, const int64_t *starts,
                    int64_t n, int64_t length, uint8_t *out) {
    if (rows < 1 || length < 1 || length > rows || n < 0)
        return SHM_EINVAL;
    /* Check every start before copying: a refused call leaves ``out`` untouched. */
    for (int64_t i = 0; i < n; i++) {
        if (starts[i] < 0)
            return SHM_EINVAL;
    }
    size_t item_bytes = (size_t)length * step_bytes;
    for (int64_t i = 0; i < n; i++) {
        int64_t r0 = starts[i] % rows;
        uint8_t *dst = out + (size_t)i * item_bytes;
        /* At most two slice copies: up to the ring's end, then from its start (a wrap). */
        int64_t first = rows - r0 < length ? rows - r0 : length;
        memcpy(dst, ring + (size_t)r0 * step_bytes, (size_t)first * step_bytes);
        if (first < length)
            memcpy(dst + (size_t)first * step_bytes, ring, (size_t)(length - first) * step_bytes);
    }
    return SHM_OK;
}

double shm_nstep_window(const double *rewards, const double *discounts, int64_t cap,
                        int64_t head, int64_t len, double gamma, double *weight) {
    /* Forward, as the adder always summed it: the same operations in the same order give the
     * same bits. w_k (the weight of r_k) = prod_{j<k} gamma * d_j. */
    double ret = 0.0, w = 1.0;
    for (int64_t k = 0; k < len; k++) {
        int64_t at = (head + k) % cap;
        ret += w * rewards[at];
        w *= gamma * discounts[at];
    }
    *weight = w;
    return ret;
}
