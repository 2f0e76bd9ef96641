/* The daemon's own PRNG: xoshiro256** (Blackman and Vigna), its state filled from a 64-bit seed
 * by splitmix64. Uniform doubles in [0, 1) from the top 53 bits of each output:
 * (x >> 11) * 2^-53. The caller seeds it (from os.urandom); tests replay the same uniforms with
 * an Rng of the same seed. State private to one process: no shared memory here. */
#ifndef SHM_RNG_H
#define SHM_RNG_H

#include <stdint.h>

typedef struct {
    uint64_t s[4];
} shm_rng;

void shm_rng_seed(shm_rng *r, uint64_t seed);

uint64_t shm_rng_next(shm_rng *r);

/* out[0..n) uniform in [0, 1), one output each, in order. */
void shm_rng_fill(shm_rng *r, double *out, int64_t n);

#endif
