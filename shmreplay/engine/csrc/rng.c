/* xoshiro256** seeded by splitmix64 (see rng.h). */
#include "rng.h"

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void shm_rng_seed(shm_rng *r, uint64_t seed) {
    /* splitmix64 never yields four zero words from one seed: the state is never all zero. */
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&seed);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t shm_rng_next(shm_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

void shm_rng_fill(shm_rng *r, double *out, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        out[i] = (double)(shm_rng_next(r) >> 11) * 0x1.0p-53;
}
