/* The 16-ary tournament heap of MinHeap and MaxHeap (shmreplay/selectors/heap.py documents it).
 *
 * One array of 24-byte node records, (key float64, touch int64, slot int64), holds the levels
 * end to end, leaves first, root last: leaf s is slot s (key sign*priority or +inf when empty,
 * its touch, s or -1), an inner node a copy of the record of the winner among its children
 * (lowest key, then lowest touch, then the first child; a NaN key among them makes the node's
 * key NaN). A node's key, touch and slot share a cache line (or two adjacent ones), and a row of
 * 16 siblings is 384 bytes, six whole lines: recomputing a node reads one contiguous row.
 * clock[0] is the last touch handed out.
 *
 * Everything here runs under the table mutex. The nodes live in memory every process of the
 * group can write: node indices are computed, never read from them, and a slot or clock read
 * from them is read once and range-checked before it is used (SHM_ORDER_ECORRUPT). No Python
 * types here.
 */
#ifndef SHM_HEAP_H
#define SHM_HEAP_H

#include <stdint.h>

#include "order.h" /* the status codes */

#define SHM_HEAP_EMPTY (-1)
#define SHM_HEAP_ARITY_BITS 4
#define SHM_HEAP_MAX_LEVELS 20 /* 2^63 leaves need 17 */

/* A node as numpy sees it: row i of an int64 array of shape (nodes, 3), column 0 read as
 * float64 (heap.py's ``nodes``). */
typedef struct {
    double key;    /* sign * priority of the winner; +inf: an empty subtree */
    int64_t touch; /* the winner's touch */
    int64_t slot;  /* the winner's slot, or SHM_HEAP_EMPTY */
} shm_heap_node;

_Static_assert(sizeof(shm_heap_node) == 3 * sizeof(int64_t), "a node is three 8-byte words");

typedef struct {
    shm_heap_node *node; /* nodes records (shared) */
    int64_t *clock;      /* clock[0] (shared) */
    double sign;         /* +1 MinHeap, -1 MaxHeap */
    int64_t num_slots;
    int num_levels; /* leaves are level 0, the root level num_levels - 1 */
    int64_t offset[SHM_HEAP_MAX_LEVELS];
    int64_t width[SHM_HEAP_MAX_LEVELS];
    int bits[SHM_HEAP_MAX_LEVELS]; /* node i of level l has children i << bits[l] .. on l - 1 */
} shm_heap;

/* Total nodes of the tree over num_slots slots (the records in the array). */
int64_t shm_heap_nodes(int64_t num_slots);

/* Fill h over the records; EINVAL when nodes is not shm_heap_nodes(num_slots). */
int shm_heap_init(shm_heap *h, shm_heap_node *node, int64_t nodes, int64_t *clock,
                  int64_t num_slots, double sign);

/* Insert slots[0..k) with priorities (touches in batch order; a repeated slot: the last wins). */
int shm_heap_insert(shm_heap *h, const int64_t *slots, const double *priorities, int64_t k);

/* New priorities for present slots: repeated slots keep their last occurrence only, and the kept
 * ones are touched in the order of those occurrences (shm_last_wins). */
int shm_heap_update(shm_heap *h, const int64_t *slots, const double *priorities, int64_t k);

/* Forget slots (key +inf, slot -1; touches stay). */
int shm_heap_remove(shm_heap *h, const int64_t *slots, int64_t k);

/* The n best items, best first ((key, touch) lowest first; leaf index last), into out; *got
 * their number (fewer when the heap holds fewer): a pruned descent that keeps the n best nodes
 * of each level (introselect over the children that can still matter), then sorts them. n == 1
 * returns the root's slot. ECORRUPT for a NaN key met on the way, or a returned slot out of range
 * or whose leaf does not name it. O(16·n·levels), scratch memory O(n). */
int shm_heap_first(const shm_heap *h, int64_t n, int64_t *out, int64_t *got);

/* Forget every item: keys +inf, slots -1, touches 0, clock 0. */
void shm_heap_clear(shm_heap *h);

/* Rebuild from the items present (in insertion order): plausible touches (1 <= touch <= clock)
 * are kept, the others get fresh ones in that order; a clock outside [0, 2^62] counts as 0. */
int shm_heap_rebuild(shm_heap *h, const int64_t *slots, const double *priorities, int64_t k);

#endif
