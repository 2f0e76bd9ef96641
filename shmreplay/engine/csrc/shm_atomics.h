/* Cross-process publication in shared memory, with one named operation per barrier.
 *
 * Every word another process reads to learn that something is ready (a ring's tail or head, a
 * slot's generation, a flag) is stored with shm_store_release() after the data it publishes and
 * read with shm_load_acquire() before that data is read, as liburing does for io_uring's rings:
 * on x86-64 these compile to plain moves (plus a compiler barrier), on aarch64 to stlr/ldar.
 * The shared words are int64 in numpy arrays, 8-byte aligned (the layout aligns arrays to 64):
 * _Atomic int64_t has the same size and alignment as int64_t with gcc and clang, so the cast
 * below reads and writes the very bytes numpy sees.
 *
 * Who owns which word and in which order they are written: docs/memory-ordering.md.
 */
#ifndef SHM_ATOMICS_H
#define SHM_ATOMICS_H

#include <stdatomic.h>
#include <stdint.h>

_Static_assert(sizeof(_Atomic int64_t) == sizeof(int64_t), "atomic int64 must be plain-sized");
_Static_assert(_Alignof(_Atomic int64_t) == _Alignof(int64_t), "atomic int64 must be aligned");

#define SHM_ATOMIC64(p) ((_Atomic int64_t *)(p))

/* Publish: everything written before this store is visible to whoever load-acquires it. */
static inline void shm_store_release(int64_t *p, int64_t v) {
    atomic_store_explicit(SHM_ATOMIC64(p), v, memory_order_release);
}

/* Consume: everything written before the matching store-release is visible after this load. */
static inline int64_t shm_load_acquire(const int64_t *p) {
    return atomic_load_explicit(SHM_ATOMIC64((int64_t *)p), memory_order_acquire);
}

/* A word read or written for itself, with no ordering of other memory (counters, hints). */
static inline int64_t shm_load_relaxed(const int64_t *p) {
    return atomic_load_explicit(SHM_ATOMIC64((int64_t *)p), memory_order_relaxed);
}

static inline void shm_store_relaxed(int64_t *p, int64_t v) {
    atomic_store_explicit(SHM_ATOMIC64(p), v, memory_order_relaxed);
}

/* Store-then-load across processes (I publish, then look whether you sleep; you announce you
 * sleep, then look whether I published): both sides need a full fence between the two, or
 * each may miss the other's store (Dekker). */
static inline void shm_fence_seq_cst(void) { atomic_thread_fence(memory_order_seq_cst); }

/* Seqlock halves: a writer's release fence after making a generation odd orders it before the
 * data stores; a reader's acquire fence after copying orders the copy before its re-read. */
static inline void shm_fence_release(void) { atomic_thread_fence(memory_order_release); }
static inline void shm_fence_acquire(void) { atomic_thread_fence(memory_order_acquire); }

#endif
