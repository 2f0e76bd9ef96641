/* The 16-ary tournament heap of MinHeap and MaxHeap: see heap.h and heap.py's docstring. */
#include "heap.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* How many rows ahead of the one it computes a batch loop asks the memory for: enough misses
 * in flight to overlap them, few enough that the queues do not drop them. */
#define PREFETCH_AHEAD 16

/* A clock beyond this is corrupt: it keeps clock + batch from overflowing. */
#define MAX_CLOCK ((int64_t)1 << 62)

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

int shm_heap_init(shm_heap *h, double *key, int64_t *touch, int64_t *slot, int64_t nodes,
                  int64_t *clock, int64_t num_slots, double sign) {
    if (num_slots < 1 || num_slots > ((int64_t)1 << 60) || nodes != shm_heap_nodes(num_slots))
        return SHM_ORDER_EINVAL;
    memset(h, 0, sizeof *h);
    h->key = key;
    h->touch = touch;
    h->slot = slot;
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

/* Node i of inner level l from its children, as heap.py's _Level.recompute: the key is the
 * lowest child key (NaN if a child's is: corruption, as numpy's min), the winner the first
 * child holding it with the lowest touch (the first child when the key is NaN, as numpy's
 * argmin). Touches are read only for children holding the best key: at a million slots the
 * touch row is one more cache miss, and ties are rare. (The model differs only for a touch of
 * INT64_MAX, which it uses as a marker.) */
static inline void recompute(shm_heap *h, int l, int64_t i) {
    int64_t first = h->offset[l - 1] + (i << h->bits[l]);
    int arity = 1 << h->bits[l];
    const double *ck = h->key + first;
    const int64_t *ct = h->touch + first;
    double best = ck[0];
    int nan = 0;
    for (int j = 1; j < arity; j++) {
        best = ck[j] < best ? ck[j] : best;
        nan |= isnan(ck[j]);
    }
    int w = 0;
    if (nan || isnan(ck[0])) {
        for (int j = 0; j < arity; j++)
            if (isnan(ck[j])) {
                best = ck[j];
                break;
            }
    } else {
        int64_t wt = INT64_MAX;
        w = -1;
        for (int j = 0; j < arity; j++)
            if (ck[j] == best && (w < 0 || ct[j] < wt)) {
                wt = ct[j];
                w = j;
            }
    }
    int64_t node = h->offset[l] + i;
    h->key[node] = best;
    h->touch[node] = ct[w];
    h->slot[node] = h->slot[first + w];
}

/* Start loading node i's row of children and its own entries: a batch of scattered rows is
 * mostly cache misses at a million slots, and issuing them all first overlaps them. */
static inline void prefetch_row(const shm_heap *h, int l, int64_t i) {
    int64_t first = h->offset[l - 1] + (i << h->bits[l]);
    __builtin_prefetch(h->key + first, 0, 1);
    if (h->bits[l] == SHM_HEAP_ARITY_BITS) /* 16 keys: two cache lines */
        __builtin_prefetch(h->key + first + 8, 0, 1);
    __builtin_prefetch(h->key + h->offset[l] + i, 1, 1);
    __builtin_prefetch(h->touch + h->offset[l] + i, 1, 1);
    __builtin_prefetch(h->slot + h->offset[l] + i, 1, 1);
}

/* recompute() for distinct nodes[0..m) of level l, in three passes over the batch so that
 * their cache misses overlap: the key rows (prefetched by the caller), then the touch and slot
 * of each winner candidate, then the winners. win[] is scratch for m entries. */
static void recompute_batch(shm_heap *h, int l, const int64_t *nodes, int64_t m, int *win) {
    int arity = 1 << h->bits[l];
    for (int64_t n = 0; n < m && n < PREFETCH_AHEAD; n++)
        prefetch_row(h, l, nodes[n]);
    for (int64_t n = 0; n < m; n++) {
        if (n + PREFETCH_AHEAD < m)
            prefetch_row(h, l, nodes[n + PREFETCH_AHEAD]);
        int64_t first = h->offset[l - 1] + (nodes[n] << h->bits[l]);
        const double *ck = h->key + first;
        double best = ck[0];
        int nan = isnan(ck[0]);
        for (int j = 1; j < arity; j++) {
            best = ck[j] < best ? ck[j] : best;
            nan |= isnan(ck[j]);
        }
        int w = -1, ties = 0;
        for (int j = 0; j < arity; j++)
            if (ck[j] == best) {
                ties++;
                if (w < 0)
                    w = j;
            }
        /* -1: recompute() decides (a NaN, or a tie that touches break). */
        win[n] = nan || ties != 1 ? -1 : w;
        if (win[n] >= 0) {
            __builtin_prefetch(h->touch + first + w, 0, 1);
            __builtin_prefetch(h->slot + first + w, 0, 1);
        }
    }
    for (int64_t n = 0; n < m; n++) {
        if (win[n] < 0) {
            recompute(h, l, nodes[n]);
            continue;
        }
        int64_t first = h->offset[l - 1] + (nodes[n] << h->bits[l]) + win[n];
        int64_t node = h->offset[l] + nodes[n];
        h->key[node] = h->key[first];
        h->touch[node] = h->touch[first];
        h->slot[node] = h->slot[first];
    }
}

static void recompute_from(shm_heap *h, int first_level) {
    for (int l = first_level; l < h->num_levels; l++)
        for (int64_t i = 0; i < h->width[l]; i++)
            recompute(h, l, i);
}

/* A set of int64 >= 0 for deduplication (open addressing, -1 = free). */
typedef struct {
    int64_t *cells;
    int64_t mask;
    int shift;
} idset;

static int idset_init(idset *s, int64_t n) {
    int64_t cap = 16;
    int logcap = 4;
    while (cap < 2 * n) {
        cap <<= 1;
        logcap++;
    }
    s->cells = malloc((size_t)cap * sizeof *s->cells);
    if (s->cells == NULL)
        return SHM_ORDER_ENOMEM;
    s->mask = cap - 1;
    s->shift = 64 - logcap;
    memset(s->cells, 0xff, (size_t)cap * sizeof *s->cells);
    return SHM_ORDER_OK;
}

static void idset_reset(idset *s) {
    memset(s->cells, 0xff, (size_t)(s->mask + 1) * sizeof *s->cells);
}

/* 1 if x was added, 0 if it was there. */
static inline int idset_add(idset *s, int64_t x) {
    int64_t i = (int64_t)(((uint64_t)x * 0x9E3779B97F4A7C15ull) >> s->shift);
    while (s->cells[i] != -1) {
        if (s->cells[i] == x)
            return 0;
        i = (i + 1) & s->mask;
    }
    s->cells[i] = x;
    return 1;
}

/* Recompute the ancestors of leaves[0..k), each once per level; a level no wider than
 * SHM_HEAP_WHOLE_LEVEL_FACTOR * k is recomputed whole, with every level above it (heap.py's
 * rule, with the same k, so that both give the same arrays). */
static int refresh(shm_heap *h, const int64_t *leaves, int64_t k) {
    if (k == 0 || h->num_levels == 1)
        return SHM_ORDER_OK;
    if (h->width[1] <= SHM_HEAP_WHOLE_LEVEL_FACTOR * k) {
        recompute_from(h, 1);
        return SHM_ORDER_OK;
    }
    int64_t *nodes = malloc((size_t)k * sizeof *nodes);
    int *win = malloc((size_t)k * sizeof *win);
    idset seen;
    if (nodes == NULL || win == NULL || idset_init(&seen, k) != SHM_ORDER_OK) {
        free(nodes);
        free(win);
        return SHM_ORDER_ENOMEM;
    }
    const int64_t *below = leaves;
    int64_t m = k;
    for (int l = 1; l < h->num_levels; l++) {
        if (h->width[l] <= SHM_HEAP_WHOLE_LEVEL_FACTOR * k) {
            recompute_from(h, l);
            break;
        }
        int64_t distinct = 0;
        for (int64_t j = 0; j < m; j++) {
            int64_t parent = below[j] >> h->bits[l];
            if (idset_add(&seen, parent)) {
                nodes[distinct++] = parent; /* in place: j >= distinct, read before written */
            }
        }
        recompute_batch(h, l, nodes, distinct, win);
        idset_reset(&seen);
        below = nodes;
        m = distinct;
    }
    free(nodes);
    free(win);
    free(seen.cells);
    return SHM_ORDER_OK;
}

static int check_slots(const shm_heap *h, const int64_t *slots, int64_t k) {
    for (int64_t i = 0; i < k; i++)
        if (slots[i] < 0 || slots[i] >= h->num_slots)
            return SHM_ORDER_EINVAL;
    return SHM_ORDER_OK;
}

/* Keys and fresh touches for slots, in batch order; ECORRUPT for an absurd clock. */
static int set_keys(shm_heap *h, const int64_t *slots, const double *priorities, int64_t k,
                    int set_slot) {
    int64_t t0 = h->clock[0];
    if (t0 < 0 || t0 > MAX_CLOCK - k)
        return SHM_ORDER_ECORRUPT;
    for (int64_t i = 0; i < k; i++) {
        __builtin_prefetch(h->key + slots[i], 1, 1);
        __builtin_prefetch(h->touch + slots[i], 1, 1);
        if (set_slot)
            __builtin_prefetch(h->slot + slots[i], 1, 1);
    }
    for (int64_t i = 0; i < k; i++) {
        int64_t s = slots[i];
        h->key[s] = h->sign * priorities[i];
        h->touch[s] = t0 + 1 + i;
        if (set_slot)
            h->slot[s] = s;
    }
    /* The touches before the clock: a process dying in between leaves touches above the clock,
     * which rebuild recognises as unknown. The fence keeps the compiler from storing the clock
     * first; the table mutex (acquired by whoever repairs) orders both for the next holder. */
    atomic_signal_fence(memory_order_release);
    h->clock[0] = t0 + k;
    return SHM_ORDER_OK;
}

int shm_heap_insert(shm_heap *h, const int64_t *slots, const double *priorities, int64_t k) {
    if (k < 0 || check_slots(h, slots, k) != SHM_ORDER_OK)
        return SHM_ORDER_EINVAL;
    if (k == 0)
        return SHM_ORDER_OK;
    int rc = set_keys(h, slots, priorities, k, 1);
    return rc != SHM_ORDER_OK ? rc : refresh(h, slots, k);
}

int shm_heap_update(shm_heap *h, const int64_t *slots, const double *priorities, int64_t k) {
    if (k < 0 || check_slots(h, slots, k) != SHM_ORDER_OK)
        return SHM_ORDER_EINVAL;
    if (k == 0)
        return SHM_ORDER_OK;
    /* last_wins: keep the last occurrence of each slot, in call order. */
    int64_t *kept = malloc((size_t)k * sizeof *kept);
    double *prios = malloc((size_t)k * sizeof *prios);
    char *keep = malloc((size_t)k);
    idset seen = {0};
    if (kept == NULL || prios == NULL || keep == NULL || idset_init(&seen, k) != SHM_ORDER_OK) {
        free(kept);
        free(prios);
        free(keep);
        return SHM_ORDER_ENOMEM;
    }
    for (int64_t i = k - 1; i >= 0; i--)
        keep[i] = (char)idset_add(&seen, slots[i]);
    int64_t m = 0;
    for (int64_t i = 0; i < k; i++)
        if (keep[i]) {
            kept[m] = slots[i];
            prios[m++] = priorities[i];
        }
    int rc = set_keys(h, kept, prios, m, 0);
    if (rc == SHM_ORDER_OK)
        rc = refresh(h, kept, m);
    free(kept);
    free(prios);
    free(keep);
    free(seen.cells);
    return rc;
}

int shm_heap_remove(shm_heap *h, const int64_t *slots, int64_t k) {
    if (k < 0 || check_slots(h, slots, k) != SHM_ORDER_OK)
        return SHM_ORDER_EINVAL;
    for (int64_t i = 0; i < k; i++) {
        __builtin_prefetch(h->key + slots[i], 1, 1);
        __builtin_prefetch(h->slot + slots[i], 1, 1);
    }
    for (int64_t i = 0; i < k; i++) {
        h->key[slots[i]] = INFINITY;
        h->slot[slots[i]] = SHM_HEAP_EMPTY;
    }
    return refresh(h, slots, k);
}

void shm_heap_clear(shm_heap *h) {
    int64_t nodes = h->offset[h->num_levels - 1] + 1;
    for (int64_t i = 0; i < nodes; i++) {
        h->key[i] = INFINITY;
        h->slot[i] = SHM_HEAP_EMPTY;
    }
    /* Touches 0, so that stale touches cannot pass for plausible ones later. */
    memset(h->touch, 0, (size_t)nodes * sizeof *h->touch);
    h->clock[0] = 0;
}

int shm_heap_rebuild(shm_heap *h, const int64_t *slots, const double *priorities, int64_t k) {
    if (k < 0 || check_slots(h, slots, k) != SHM_ORDER_OK)
        return SHM_ORDER_EINVAL;
    int64_t clock = h->clock[0];
    if (clock < 0 || clock > MAX_CLOCK - k)
        clock = 0; /* corrupt: every touch counts as unknown */
    int64_t next = clock;
    for (int64_t i = 0; i < k; i++) {
        int64_t t = h->touch[slots[i]];
        if (t < 1 || t > clock)
            h->touch[slots[i]] = ++next;
    }
    h->clock[0] = next;
    for (int64_t i = 0; i < h->width[0]; i++) {
        h->key[i] = INFINITY;
        h->slot[i] = SHM_HEAP_EMPTY;
    }
    for (int64_t i = 0; i < k; i++) {
        h->key[slots[i]] = h->sign * priorities[i];
        h->slot[slots[i]] = slots[i];
    }
    recompute_from(h, 1);
    return SHM_ORDER_OK;
}

/* ---- first(n): a pruned descent with a bounded heap ----------------------------------------- */

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
    if (isnan(h->key[root]))
        return SHM_ORDER_ECORRUPT;
    if (!(h->key[root] < INFINITY))
        return SHM_ORDER_OK; /* empty */
    if (n == 1) {            /* the root's winner (heap.py returns its slot) */
        int64_t s = h->slot[root];
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
    kept[0] = (entry){h->key[root], h->touch[root], 0};
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
            if (j + PREFETCH_AHEAD < m) {
                const double *row = h->key + base + (kept[j + PREFETCH_AHEAD].idx << h->bits[l]);
                __builtin_prefetch(row, 0, 1);
                if (arity > 8)
                    __builtin_prefetch(row + 8, 0, 1);
            }
            int64_t first = kept[j].idx << h->bits[l];
            for (int c = 0; c < arity; c++) {
                double key = h->key[base + first + c];
                if (isnan(key)) {
                    rc = SHM_ORDER_ECORRUPT;
                    break;
                }
                if (!(key < INFINITY) || (bounded && key > t.key))
                    continue; /* an empty subtree, or one beyond T: its touch is not read */
                entry e = {key, h->touch[base + first + c], first + c};
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
            if (s >= h->num_slots || h->slot[s] != s) {
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
