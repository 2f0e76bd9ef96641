/* The trajectory writer's batch gather: selected steps of a column's history ring copied into
 * a batch's staging rows, one call per field per batch; the n-step adder's window sum (no
 * Python.h: testable alone).
 *
 * A column's history is a ring of ``rows`` steps of ``step_bytes`` each, in this process's
 * memory: step s lives in ring row s % rows. An item selects ``length`` consecutive steps from
 * its start step; item i of a batch goes to out[i] (``length`` * ``step_bytes`` bytes).
 */
#ifndef SHM_TRAJECTORY_H
#define SHM_TRAJECTORY_H

#include <stddef.h>
#include <stdint.h>

/* Copy, for each i < n, the steps starts[i] .. starts[i] + length - 1 (wrapping round the
 * ring) into out + i * length * step_bytes. Returns SHM_OK, or SHM_EINVAL (nothing copied)
 * when rows < 1, length < 1, length > rows or a start is negative. */
int shm_traj_gather(const uint8_t *ring, int64_t rows, size_t step_bytes, const int64_t *starts,
                    int64_t n, int64_t length, uint8_t *out);

/* The n-step adder's window: the ``len`` newest steps of a ring of ``cap`` rewards r_k and
 * environment discounts d_k, the oldest at ``head``. Returns R = sum_k w_k r_k and sets
 * *weight = w_len, where w_0 = 1 and w_{k+1} = w_k * (gamma * d_k): the return and the
 * bootstrap discount of the transition from the window's first step. */
double shm_nstep_window(const double *rewards, const double *discounts, int64_t cap,
                        int64_t head, int64_t len, double gamma, double *weight);

#endif
