/* The 16-ary tournament heap of MinHeap and MaxHeap: see heap.h and heap.py's docstring. */
#include "heap.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "shm_atomics.h"
#include "sumtree.h" /* shm_last_wins */

/* How many items (first(): rows) ahead of the one it works on a batch loop asks the memory for:
 * enough misses in flight to overlap them, few enough that they arrive just in time (measured at
 * a million slots: 4 to 32 differ by less than the machine's noise). */
#define PREFETCH_AHEAD 8

/* Batches up to this long keep their scratch arrays on the stack (the selectors' usual 256). */
#define STACK_BATCH 512

/* For the functions that only prefetch: inlined before gcc's interprocedural passes, which
 * otherwise find them free of side effects and delete their calls (gcc 12 at -O2). */
#define PREFETCHER static inline __attribute__((always_inline))

/* A clock beyond this is corrupt: it keeps clock + batch from overflowing. */
#define MAX_CLOCK ((int64_t)1 << 62)

#define ARITY (1 << SHM_HEAP_ARITY_BITS)

int64_t shm_heap_nodes(int64_t num_slots) {
    int64_t width = 1, nodes = 0;
    while (width < num_slots)
        width <<= 1;
    for (;;) {
        nodes += width;
        if (width == 1)
            return nodes;
        width = width >> SHM_HEAP_ARITY_BITS > 0 ? width >> SHM_HEAP_ARITY_BITS : 1;
    }
}

int shm_heap_init(shm_heap *h, shm_heap_node *node, int64_t nodes, int64_t *clock,
                  int64_t num_slots, double sign) {
    if (num_slots < 1 || num_slots > ((int64_t)1 << 60) || nodes != shm_heap_nodes(num_slots))
        return SHM_ORDER_EINVAL;
    memset(h, 0, sizeof *h);
    h->node = node;
    h->clock = clock;
    h->sign = sign;
    h->num_slots = num_slots;
    int64_t width = 1, offset = 0;
    while (width < num_slots)
        width <<= 1;
    for (int l = 0;; l++) {
        h->offset[l] = offset;
        h->width[l] = width;
        h->bits[l] = 0;
        if (l > 0) {
            int64_t ratio = h->width[l - 1] / width;
            while (((int64_t)1 << h->bits[l]) < ratio)
                h->bits[l]++;
        }
        offset += width;
        h->num_levels = l + 1;
        if (width == 1)
            return SHM_ORDER_OK;
        width = width >> SHM_HEAP_ARITY_BITS > 0 ? width >> SHM_HEAP_ARITY_BITS : 1;
    }
}

/* ---- recomputing inner nodes ----------------------------------------------------------------- */

/* b if row[b] beats row[a] ((key, touch) strictly lower), else a: the first of equals wins.
 * Written without branches (a select), since random keys would mispredict half of them. */
static inline int pick(const shm_heap_node *row, int a, int b) {
    double ka = row[a].key, kb = row[b].key;
    int64_t ta = row[a].touch, tb = row[b].touch;
    int b_wins = (kb < ka) | ((kb == ka) & (tb < ta));
    return b_wins ? b : a;
}

/* The winner of a full row of 16: a tournament of pairs (15 branch-free picks in four rounds
 * instead of a chain of 15), which keeps the first child on a tie since pick() does. *nan is
 * set when a key of the row is NaN (the tournament then means nothing). */
static inline int winner16(const shm_heap_node *row, int *nan) {
    int un = 0;
    for (int j = 0; j < ARITY; j += 2)
        un |= isunordered(row[j].key, row[j + 1].key);
    *nan = un;
    int w0 = pick(row, 0, 1), w1 = pick(row, 2, 3), w2 = pick(row, 4, 5), w3 = pick(row, 6, 7);
    int w4 = pick(row, 8, 9), w5 = pick(row, 10, 11), w6 = pick(row, 12, 13);
    int w7 = pick(row, 14, 15);
    w0 = pick(row, w0, w1), w2 = pick(row, w2, w3), w4 = pick(row, w4, w5);
    w6 = pick(row, w6, w7);
    w0 = pick(row, w0, w2), w4 = pick(row, w4, w6);
    return pick(row, w0, w4);
}

/* Node i of inner level l from its children, as the model's _Level.recompute: a copy of the
 * winner's record (lowest key, then lowest touch, then the first child); when a child's key is
 * NaN (corruption), the first NaN key with the first child's touch and slot, as numpy's min and
 * argmin give, so that the NaN reaches the root and first() reports it. */
static shm_heap_node recompute(shm_heap *h, int l, int64_t i) {
    const shm_heap_node *row = h->node + h->offset[l - 1] + (i << h->bits[l]);
    shm_heap_node *node = h->node + h->offset[l] + i;
    int arity = 1 << h->bits[l];
    int nan = 0, w = 0;
    if (arity == ARITY) {
        w = winner16(row, &nan);
    } else {
        for (int j = 0; j < arity; j++)
            nan |= isnan(row[j].key);
        for (int j = 1; j < arity; j++)
            w = pick(row, w, j);
    }
    shm_heap_node won = row[w];
    if (nan) {
        won = row[0]; /* NaN no more (another process wrote meanwhile): any child will do */
        for (int j = 0; j < arity; j++) {
            double key = row[j].key; /* read once: the value tested is the value stored */
            if (isnan(key)) {
                won.key = key;
                break;
            }
        }
    }
    *node = won;
    return won;
}

static void recompute_from(shm_heap *h, int first_level) {
    for (int l = first_level; l < h->num_levels; l++)
        for (int64_t i = 0; i < h->width[l]; i++)
            recompute(h, l, i);
}

/* ---- changing leaves: the path above each, as far as it changes ------------------------------ */

static inline int same_record(const shm_heap_node *a, const shm_heap_node *b) {
    return memcmp(a, b, sizeof *a) == 0; /* the bits: a key going from -0.0 to 0.0 changed */
}

/* (key, touch) of a strictly lower than b's; false when either key is NaN. */
static inline int lower(const shm_heap_node *a, const shm_heap_node *b) {
    return a->key < b->key || (a->key == b->key && a->touch < b->touch);
}

/* Node i of level l now holds now instead of was: bring its ancestors up to date, level by
 * level, as long as they change. Each parent is a copy of its children's winner (a consistent
 * tree, which is a function of its leaves), so a parent is settled by its own record most of the
 * time, without reading the row of children:
 * - the node now beats the parent's record: it is the winner, the parent becomes its copy;
 * - the node now loses to it and the parent's winner was another child (its record differs
 *   from was): the winner and the parent stay, and so does everything above;
 * - otherwise (the node was the winner and got worse, a tie, a NaN): the row is recomputed.
 * The outcome is the tree that recomputing every ancestor gives (the model's way); a tree
 * garbled by another process is repaired where a row is recomputed, and first() reports what
 * it meets (a NaN propagates up through recomputed rows as before). */
static void propagate(shm_heap *h, int l, int64_t i, shm_heap_node was, shm_heap_node now) {
    for (; l + 1 < h->num_levels; l++) {
        if (same_record(&now, &was))
            return;
        int64_t p = i >> h->bits[l + 1];
        shm_heap_node *parent = h->node + h->offset[l + 1] + p;
        shm_heap_node before = *parent;
        if (lower(&now, &before)) {
            *parent = now;
        } else if (lower(&before, &now) && !(before.key == was.key && before.touch == was.touch)) {
            return;
        } else {
            now = recompute(h, l + 1, p);
        }
        was = before;
        i = p;
    }
}

/* Start loading what changing leaf s reads and writes first: the leaf and its parent (a record
 * may straddle two lines). At a million slots both are cache misses, and asking for them a few
 * items ahead overlaps them. */
PREFETCHER void prefetch_path(const shm_heap *h, int64_t s) {
    const char *leaf = (const char *)(h->node + s);
    __builtin_prefetch(leaf, 1, 3);
    __builtin_prefetch(leaf + sizeof(shm_heap_node) - 1, 1, 3);
    if (h->num_levels > 1) {
        const char *parent = (const char *)(h->node + h->offset[1] + (s >> h->bits[1]));
        __builtin_prefetch(parent, 1, 3);
        __builtin_prefetch(parent + sizeof(shm_heap_node) - 1, 1, 3);
    }
}

/* Start loading the row of children of node i of level l, read a few rows or items later. */
PREFETCHER void prefetch_row(const shm_heap *h, int l, int64_t i) {
    const char *row = (const char *)(h->node + h->offset[l - 1] + (i << h->bits[l]));
    size_t bytes = sizeof(shm_heap_node) << h->bits[l];
    for (size_t b = 0; b < bytes; b += 64)
        __builtin_prefetch(row + b, 0, 3);
    __builtin_prefetch(row + bytes - 1, 0, 3); /* the last line of a row not aligned to lines */
}

/* Start loading the row of leaf s's siblings when the parent names s as its winner: removing
 * or worsening the winner makes its walk read that row (once in 16 items at random). Asked for
 * after the parent (prefetch_path) has had time to arrive; a guess (an earlier item of the batch
 * may change the parent), which only the prefetch depends on. */
PREFETCHER void prefetch_row_if_winner(const shm_heap *h, int64_t s) {
    if (h->num_levels > 1) {
        int64_t p = s >> h->bits[1];
        if (h->node[h->offset[1] + p].slot == s)
            prefetch_row(h, 1, p);
    }
}

enum change { INSERT, UPDATE, REMOVE };

/* Write the leaves of slots[0..k) one by one (INSERT: key, touch t0 + 1 + i and slot; UPDATE:
 * key and touch; REMOVE: key +inf and slot -1), each followed by its path. */
static void change_leaves(shm_heap *h, const int64_t *slots, const double *priorities, int64_t k,
                          int64_t t0, enum change what) {
    for (int64_t i = 0; i < k && i < PREFETCH_AHEAD; i++)
        prefetch_path(h, slots[i]);
    for (int64_t i = 0; i < k; i++) {
        if (i + PREFETCH_AHEAD < k)
            prefetch_path(h, slots[i + PREFETCH_AHEAD]);
        if (what != INSERT && i + PREFETCH_AHEAD / 2 < k)
            prefetch_row_if_winner(h, slots[i + PREFETCH_AHEAD / 2]);
        int64_t s = slots[i];
        shm_heap_node *leaf = h->node + s;
        shm_heap_node was = *leaf, now = was;
        if (what == REMOVE) {
            now.key = INFINITY;
            now.slot = SHM_HEAP_EMPTY;
        } else {
            now.key = h->sign * priorities[i];
            now.touch = t0 + 1 + i;
            if (what == INSERT)
                now.slot = s;
        }
        *leaf = now; /* then compared from the register: no load of what was just stored */
        propagate(h, 0, s, was, now);
    }
}

/* ---- insert, update, remove ------------------------------------------------------------------ */

static int check_slots(const shm_heap *h, const int64_t *slots, int64_t k) {
    for (int64_t i = 0; i < k; i++)
        if (slots[i] < 0 || slots[i] >= h->num_slots)
            return SHM_ORDER_EINVAL;
    return SHM_ORDER_OK;
}

/* Keys and fresh touches for slots (and their slot numbers for INSERT), in batch order, with
 * their paths; ECORRUPT for an absurd clock. */
static int set_keys(shm_heap *h, const int64_t *slots, const double *priorities, int64_t k,
                    enum change what) {
    int64_t t0 = shm_load_relaxed(h->clock);
    if (t0 < 0 || t0 > MAX_CLOCK - k)
        return SHM_ORDER_ECORRUPT;
    change_leaves(h, slots, priorities, k, t0, what);
    /* The touches before the clock: a process dying in between leaves touches above the clock,
     * which rebuild recognises as unknown. The fence keeps the compiler from storing the clock
     * first; the table mutex (acquired by whoever repairs) orders both for the next holder. */
    atomic_signal_fence(memory_order_release);
    shm_store_relaxed(h->clock, t0 + k);
    return SHM_ORDER_OK;
}

int shm_heap_insert(shm_heap *h, const int64_t *slots, const double *priorities, int64_t k) {
    if (k < 0 || check_slots(h, slots, k) != SHM_ORDER_OK)
        return SHM_ORDER_EINVAL;
    if (k == 0)
        return SHM_ORDER_OK;
    return set_keys(h, slots, priorities, k, INSERT);
}

int shm_heap_update(shm_heap *h, const int64_t *slots, const double *priorities, int64_t k) {
    if (k < 0 || check_slots(h, slots, k) != SHM_ORDER_OK)
        return SHM_ORDER_EINVAL;
    if (k == 0)
        return SHM_ORDER_OK;
    /* The last occurrence of each slot, in call order. */
    int64_t stack_kept[STACK_BATCH];
    double stack_prios[STACK_BATCH];
    uint8_t stack_keep[STACK_BATCH];
    int64_t *kept = stack_kept;
    double *prios = stack_prios;
    uint8_t *keep = stack_keep;
    if (k > STACK_BATCH) {
        kept = malloc((size_t)k * sizeof *kept);
        prios = malloc((size_t)k * sizeof *prios);
        keep = malloc((size_t)k);
        if (kept == NULL || prios == NULL || keep == NULL) {
            free(kept);
            free(prios);
            free(keep);
            return SHM_ORDER_ENOMEM;
        }
    }
    int rc = SHM_ORDER_ENOMEM;
    if (shm_last_wins(slots, k, keep) >= 0) {
        int64_t m = 0;
        for (int64_t i = 0; i < k; i++)
            if (keep[i]) {
                kept[m] = slots[i];
                prios[m++] = priorities[i];
            }
        rc = set_keys(h, kept, prios, m, UPDATE);
    }
    if (kept != stack_kept) {
        free(kept);
        free(prios);
        free(keep);
    }
    return rc;
}

int shm_heap_remove(shm_heap *h, const int64_t *slots, int64_t k) {
    if (k < 0 || check_slots(h, slots, k) != SHM_ORDER_OK)
        return SHM_ORDER_EINVAL;
    change_leaves(h, slots, NULL, k, 0, REMOVE);
    return SHM_ORDER_OK;
}

void shm_heap_clear(shm_heap *h) {
    int64_t nodes = h->offset[h->num_levels - 1] + 1;
    /* Touches 0, so that stale touches cannot pass for plausible ones later. */
    for (int64_t i = 0; i < nodes; i++)
        h->node[i] = (shm_heap_node){INFINITY, 0, SHM_HEAP_EMPTY};
    shm_store_relaxed(h->clock, 0);
}

int shm_heap_rebuild(shm_heap *h, const int64_t *slots, const double *priorities, int64_t k) {
    if (k < 0 || check_slots(h, slots, k) != SHM_ORDER_OK)
        return SHM_ORDER_EINVAL;
    int64_t clock = shm_load_relaxed(h->clock);
    if (clock < 0 || clock > MAX_CLOCK - k)
        clock = 0; /* corrupt: every touch counts as unknown */
    int64_t next = clock;
    for (int64_t i = 0; i < k; i++) {
        int64_t t = h->node[slots[i]].touch;
        if (t < 1 || t > clock)
            h->node[slots[i]].touch = ++next;
    }
    shm_store_relaxed(h->clock, next);
    for (int64_t i = 0; i < h->width[0]; i++) {
        h->node[i].key = INFINITY;
        h->node[i].slot = SHM_HEAP_EMPTY;
    }
    for (int64_t i = 0; i < k; i++) {
        h->node[slots[i]].key = h->sign * priorities[i];
        h->node[slots[i]].slot = slots[i];
    }
    recompute_from(h, 1);
    return SHM_ORDER_OK;
}

/* ---- first(n): a pruned descent with a bounded heap ------------------------------------------ */

typedef struct {
    double key;
    int64_t touch;
    int64_t idx; /* node index within its level */
} entry;

static inline int worse(const entry *a, const entry *b) {
    if (a->key != b->key)
        return a->key > b->key;
    if (a->touch != b->touch)
        return a->touch > b->touch;
    return a->idx > b->idx;
}

/* Sorting and selection of entries, best first: an introsort (quicksort whose partitions are
 * Hoare's around a median of three moved to the front, insertion sort for short runs, heapsort
 * when the recursion grows deep: the keys come from memory anyone can write, and a crafted
 * sequence must not make this quadratic). */

static inline void swap_entries(entry *a, entry *b) {
    entry t = *a;
    *a = *b;
    *b = t;
}

/* A max-heap on worse(): heapsort leaves the array best first. */
static void sift_down(entry *a, int64_t i, int64_t m) {
    entry x = a[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= m)
            break;
        if (c + 1 < m && worse(&a[c + 1], &a[c]))
            c++;
        if (!worse(&a[c], &x))
            break;
        a[i] = a[c];
        i = c;
    }
    a[i] = x;
}

static void heap_sort(entry *a, int64_t n) {
    for (int64_t i = n / 2 - 1; i >= 0; i--)
        sift_down(a, i, n);
    for (int64_t end = n - 1; end > 0; end--) {
        swap_entries(&a[0], &a[end]);
        sift_down(a, 0, end);
    }
}

static void insertion_sort(entry *a, int64_t n) {
    for (int64_t i = 1; i < n; i++) {
        entry x = a[i];
        int64_t j = i;
        while (j > 0 && worse(&a[j - 1], &x)) {
            a[j] = a[j - 1];
            j--;
        }
        a[j] = x;
    }
}

/* Split a[0..n) (n >= 2) into a[0..j] and a[j+1..n), no entry of the first worse than one of
 * the second; returns j + 1, in 1..n-1. */
static int64_t partition(entry *a, int64_t n) {
    int64_t mid = n / 2;
    /* a[0] <= a[mid] <= a[n-1], then the median to a[0]: Hoare's scheme around a[0] returns
     * two non-empty parts. */
    if (worse(&a[0], &a[mid]))
        swap_entries(&a[0], &a[mid]);
    if (worse(&a[mid], &a[n - 1]))
        swap_entries(&a[mid], &a[n - 1]);
    if (worse(&a[0], &a[mid]))
        swap_entries(&a[0], &a[mid]);
    swap_entries(&a[0], &a[mid]);
    entry p = a[0];
    int64_t i = -1, j = n;
    for (;;) {
        do
            i++;
        while (worse(&p, &a[i]));
        do
            j--;
        while (worse(&a[j], &p));
        if (i >= j)
            return j + 1;
        swap_entries(&a[i], &a[j]);
    }
}

static void intro_sort(entry *a, int64_t n, int depth) {
    while (n > 16) {
        if (depth-- == 0) {
            heap_sort(a, n);
            return;
        }
        int64_t left = partition(a, n);
        intro_sort(a, left, depth);
        a += left;
        n -= left;
    }
    insertion_sort(a, n);
}

/* Reorder a[0..n) so that a[0..k) are its k best entries (in no order). */
static void intro_select(entry *a, int64_t n, int64_t k, int depth) {
    while (n > 16) {
        if (depth-- == 0) {
            heap_sort(a, n);
            return;
        }
        int64_t left = partition(a, n);
        if (k <= left) {
            n = left;
        } else {
            a += left;
            k -= left;
            n -= left;
        }
    }
    insertion_sort(a, n);
}

static int depth_limit(int64_t n) {
    int d = 0;
    while (n > 1) {
        n >>= 1;
        d++;
    }
    return 2 * d + 2;
}

int shm_heap_first(const shm_heap *h, int64_t n, int64_t *out, int64_t *got) {
    *got = 0;
    if (n < 0)
        return SHM_ORDER_EINVAL;
    int top = h->num_levels - 1;
    int64_t root = h->offset[top];
    if (n == 0)
        return SHM_ORDER_OK;
    double root_key = h->node[root].key; /* read once: the value tested is the value used */
    if (isnan(root_key))
        return SHM_ORDER_ECORRUPT;
    if (!(root_key < INFINITY))
        return SHM_ORDER_OK; /* empty */
    if (n == 1) {            /* the root's winner (heap.py returns its slot) */
        int64_t s = shm_load_relaxed(&h->node[root].slot);
        if (s < 0 || s >= h->num_slots)
            return SHM_ORDER_ECORRUPT;
        out[0] = s;
        *got = 1;
        return SHM_ORDER_OK;
    }
    /* The n best items lie below the n best nodes of every level: keep those, level by level
     * (gather the children of the kept nodes, select the n best of them). With n nodes kept,
     * their winners are n items no worse than the worst kept node, T: the n best children are
     * no worse than T either, and the children beyond T (most of them) are skipped as they are
     * read. */
    int64_t cap = n < h->width[0] ? n : h->width[0];
    int64_t room = 4 * cap + 64;
    entry *kept = malloc((size_t)cap * sizeof *kept);
    entry *cand = malloc((size_t)room * sizeof *cand);
    if (kept == NULL || cand == NULL) {
        free(kept);
        free(cand);
        return SHM_ORDER_ENOMEM;
    }
    int rc = SHM_ORDER_OK;
    int64_t m = 1;
    kept[0] = (entry){root_key, h->node[root].touch, 0};
    for (int l = top; l > 0 && rc == SHM_ORDER_OK; l--) {
        int64_t nc = 0, base = h->offset[l - 1];
        int arity = 1 << h->bits[l];
        int bounded = m == cap;
        entry t = kept[0];
        if (bounded)
            for (int64_t j = 1; j < m; j++)
                if (worse(&kept[j], &t))
                    t = kept[j];
        for (int64_t j = 0; j < m && rc == SHM_ORDER_OK; j++) {
            if (j + PREFETCH_AHEAD < m)
                prefetch_row(h, l, kept[j + PREFETCH_AHEAD].idx);
            int64_t first = kept[j].idx << h->bits[l];
            const shm_heap_node *row = h->node + base + first;
            for (int c = 0; c < arity; c++) {
                double key = row[c].key;
                if (isnan(key)) {
                    rc = SHM_ORDER_ECORRUPT;
                    break;
                }
                if (!(key < INFINITY) || (bounded && key > t.key))
                    continue; /* an empty subtree, or one beyond T: its touch is not read */
                entry e = {key, row[c].touch, first + c};
                if (bounded && key == t.key && e.touch > t.touch)
                    continue; /* (idx is another level's: not compared) */
                if (nc == room) {
                    int64_t bigger = 2 * room;
                    entry *grown = realloc(cand, (size_t)bigger * sizeof *cand);
                    if (grown == NULL) {
                        rc = SHM_ORDER_ENOMEM;
                        break;
                    }
                    cand = grown;
                    room = bigger;
                }
                cand[nc++] = e;
            }
        }
        if (rc != SHM_ORDER_OK)
            break;
        if (nc > cap) {
            intro_select(cand, nc, cap, depth_limit(nc));
            nc = cap;
        }
        memcpy(kept, cand, (size_t)nc * sizeof *kept);
        m = nc;
    }
    if (rc == SHM_ORDER_OK) {
        intro_sort(kept, m, depth_limit(m));
        for (int64_t j = 0; j < m; j++) {
            int64_t s = kept[j].idx;
            if (s >= h->num_slots || shm_load_relaxed(&h->node[s].slot) != s) {
                rc = SHM_ORDER_ECORRUPT;
                break;
            }
            out[j] = s;
        }
        if (rc == SHM_ORDER_OK)
            *got = m;
    }
    free(kept);
    free(cand);
    return rc;
}
