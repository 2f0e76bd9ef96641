/* Bindings of the commit concern: CommitTable (a table's commit metadata and free-slot lease,
 * TableCore's) and CommitRound (the daemon's drain of every channel, one call per round). The
 * logic is in commit.c. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "bind_selector.h"
#include "commit.h"
#include "rng.h"
#include "shm_bind.h"
#include "shm_buffers.h"

/* ---- Rng --------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    shm_rng r;
} RngObject;

static int rng_init(RngObject *self, PyObject *args, PyObject *kwds) {
    unsigned long long seed;
    (void)kwds;
    if (!PyArg_ParseTuple(args, "K:Rng", &seed))
        return -1;
    shm_rng_seed(&self->r, seed);
    return 0;
}

PyDoc_STRVAR(rng_random_doc,
             "random(n) -> memoryview of n float64 (np.asarray it): the next n uniforms in "
             "[0, 1), (x >> 11) * 2**-53 of successive xoshiro256** outputs.");

static PyObject *rng_random(RngObject *self, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || n > (Py_ssize_t)(INT64_MAX / 16)) {
        PyErr_SetString(PyExc_ValueError, "random(n): n out of range");
        return NULL;
    }
    PyObject *bytes = PyByteArray_FromStringAndSize(NULL, n * 8);
    if (bytes == NULL)
        return NULL;
    shm_rng_fill(&self->r, (double *)(void *)PyByteArray_AS_STRING(bytes), n);
    PyObject *view = PyMemoryView_FromObject(bytes);
    Py_DECREF(bytes);
    if (view == NULL)
        return NULL;
    PyObject *cast = PyObject_CallMethod(view, "cast", "s", "d");
    Py_DECREF(view);
    return cast;
}

static PyMethodDef rng_methods[] = {
    {"random", (PyCFunction)rng_random, METH_O, rng_random_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RngType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.Rng",
    .tp_doc = PyDoc_STR("Rng(seed): the daemon's PRNG (xoshiro256**, seeded by splitmix64 from "
                        "a 64-bit seed; csrc/rng.h)."),
    .tp_basicsize = sizeof(RngObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)rng_init,
    .tp_methods = rng_methods,
};

/* ---- CommitTable ------------------------------------------------------------------------- */

enum { TB_CTRL, TB_KEY, TB_STATE, TB_PRIORITY, TB_TIMES, TB_SEQ, TB_GEN, TB_OWNER, TB_EPISODE,
       TB_FREE, TB_LAST_EPISODE, TB_COUNT };
static const char *const table_names[TB_COUNT] = {
    "ctrl", "key", "state", "priority", "times_sampled", "seq",
    "gen", "owner", "episode", "free", "last_episode"};
static const Py_ssize_t table_items[TB_COUNT] = {8, 8, 1, 8, 4, 8, 8, 4, 8, 8, 8};
static const int table_writable[TB_COUNT] = {1, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1};

typedef struct {
    PyObject_HEAD
    shm_table t;
    Py_buffer views[TB_COUNT];
    int nviews;
    /* attach(): the selectors' capsules and the Rng (strong references: cs points into them) */
    shm_commit_sel cs;
    PyObject *sampler, *remover, *rng;
    shm_full_error err; /* the last full commit's failure, for why() */
} CommitTable;

static void table_detach(CommitTable *self) {
    Py_CLEAR(self->sampler);
    Py_CLEAR(self->remover);
    Py_CLEAR(self->rng);
    free(self->cs.victims);
    free(self->cs.u);
    self->cs.victims = NULL;
    self->cs.u = NULL;
}

static void table_dealloc(CommitTable *self) {
    table_detach(self);
    for (int i = 0; i < self->nviews; i++)
        PyBuffer_Release(&self->views[i]);
    free(self->t.scratch);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int table_init(CommitTable *self, PyObject *args, PyObject *kwds) {
    PyObject *objs[TB_COUNT];
    double max_priority;
    (void)kwds;
    if (self->nviews) {
        PyErr_SetString(PyExc_RuntimeError, "CommitTable is initialised once");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOd:CommitTable", &objs[0], &objs[1], &objs[2],
                          &objs[3], &objs[4], &objs[5], &objs[6], &objs[7], &objs[8], &objs[9],
                          &objs[10], &max_priority))
        return -1;
    for (int i = 0; i < TB_COUNT; i++) {
        if (shm_get_buffer(objs[i], &self->views[i], table_items[i], table_writable[i],
                           table_names[i]) < 0)
            return -1;
        self->nviews = i + 1;
    }
    Py_ssize_t slots = shm_buffer_len(&self->views[TB_KEY]);
    const int per_slot[] = {TB_STATE, TB_PRIORITY, TB_TIMES, TB_SEQ, TB_GEN, TB_OWNER,
                            TB_EPISODE, TB_FREE};
    for (size_t i = 0; i < sizeof per_slot / sizeof per_slot[0]; i++) {
        if (shm_buffer_len(&self->views[per_slot[i]]) != slots) {
            PyErr_Format(PyExc_ValueError, "%s must have one item per slot (%zd)",
                         table_names[per_slot[i]], slots);
            return -1;
        }
    }
    if (shm_buffer_len(&self->views[TB_CTRL]) < (SHM_CTRL_EPISODES + 1) * SHM_LINE) {
        PyErr_SetString(PyExc_ValueError, "ctrl is too short");
        return -1;
    }
    shm_table *t = &self->t;
    t->num_slots = slots;
    t->max_clients = shm_buffer_len(&self->views[TB_LAST_EPISODE]);
    t->max_priority = max_priority;
    t->ctrl = self->views[TB_CTRL].buf;
    t->key = self->views[TB_KEY].buf;
    t->state = self->views[TB_STATE].buf;
    t->priority = self->views[TB_PRIORITY].buf;
    t->times_sampled = self->views[TB_TIMES].buf;
    t->seq = self->views[TB_SEQ].buf;
    t->gen = self->views[TB_GEN].buf;
    t->owner = self->views[TB_OWNER].buf;
    t->episode = self->views[TB_EPISODE].buf;
    t->free_ring = self->views[TB_FREE].buf;
    t->last_episode = self->views[TB_LAST_EPISODE].buf;
    /* Private to this process (nobody else can write it): the duplicate check's positions. */
    t->scratch = malloc((size_t)(slots > 0 ? slots : 1) * sizeof(int32_t));
    if (t->scratch == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int table_ready(CommitTable *self) {
    if (self->t.scratch == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "CommitTable is not initialised");
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(table_commit_doc,
             "commit(slots, priorities) -> int: commit the metadata of distinct in-range slots "
             "(int64, writable) with their checked priorities (float64, writable, same length); "
             "mutex held. Those not LEASED or with an odd generation are dropped: the kept ones "
             "are compacted to the front of both arrays. Returns how many were kept.");

static PyObject *table_commit(CommitTable *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!table_ready(self))
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "commit(slots, priorities)");
        return NULL;
    }
    Py_buffer s, p;
    if (shm_get_buffer(args[0], &s, 8, 1, "slots") < 0)
        return NULL;
    if (shm_get_buffer(args[1], &p, 8, 1, "priorities") < 0) {
        PyBuffer_Release(&s);
        return NULL;
    }
    int64_t n = shm_buffer_len(&s), k = -1;
    int64_t *slots = s.buf;
    const char *bad = NULL;
    if (shm_buffer_len(&p) != n)
        bad = "slots and priorities differ in length";
    for (int64_t i = 0; bad == NULL && i < n; i++)
        if (slots[i] < 0 || slots[i] >= self->t.num_slots)
            bad = "a slot is out of range";
    if (bad == NULL)
        k = shm_commit_meta(&self->t, slots, p.buf, n);
    PyBuffer_Release(&s);
    PyBuffer_Release(&p);
    if (bad != NULL) {
        PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    if (k < 0)
        return PyErr_NoMemory();
    return PyLong_FromLongLong(k);
}

PyDoc_STRVAR(table_lease_doc,
             "lease(channel, n, out) -> int: take up to n free slots into out (int64, writable, "
             "at least n long), with fresh key tags, owned by channel, LEASED; mutex held. "
             "Returns how many, or -1 when the free ring makes no sense (nothing changed: "
             "rebuild it and call again).");

static PyObject *table_lease(CommitTable *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!table_ready(self))
        return NULL;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "lease(channel, n, out)");
        return NULL;
    }
    long long channel = PyLong_AsLongLong(args[0]);
    long long n = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer o;
    if (shm_get_buffer(args[2], &o, 8, 1, "out") < 0)
        return NULL;
    int64_t k;
    if (n < 0 || n > shm_buffer_len(&o)) {
        PyBuffer_Release(&o);
        PyErr_SetString(PyExc_ValueError, "n must be in 0..len(out)");
        return NULL;
    }
    k = shm_lease_pop(&self->t, channel, n, o.buf);
    PyBuffer_Release(&o);
    return PyLong_FromLongLong(k < 0 ? -1 : k);
}

PyDoc_STRVAR(table_attach_doc,
             "attach(sampler, remover, rng, max_size) -> None: the table's selectors (capsules "
             "from their _selector()), the daemon's Rng and max_size, for commit_all and evict.");

static PyObject *table_attach(CommitTable *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!table_ready(self))
        return NULL;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "attach(sampler, remover, rng, max_size)");
        return NULL;
    }
    shm_selector *sel[2];
    for (int i = 0; i < 2; i++)
        if ((sel[i] = PyCapsule_GetPointer(args[i], SHM_SELECTOR_CAPSULE)) == NULL)
            return NULL;
    if (!PyObject_TypeCheck(args[2], &RngType)) {
        PyErr_SetString(PyExc_TypeError, "rng must be an Rng");
        return NULL;
    }
    long long max_size = PyLong_AsLongLong(args[3]);
    if (max_size == -1 && PyErr_Occurred())
        return NULL;
    if (max_size < 0) {
        PyErr_SetString(PyExc_ValueError, "max_size must be >= 0");
        return NULL;
    }
    size_t slots = (size_t)(self->t.num_slots > 0 ? self->t.num_slots : 1);
    int64_t *victims = malloc(slots * sizeof(int64_t));
    double *u = malloc(slots * sizeof(double));
    if (victims == NULL || u == NULL) {
        free(victims);
        free(u);
        return PyErr_NoMemory();
    }
    table_detach(self);
    self->cs.victims = victims;
    self->cs.u = u;
    self->cs.sampler = *sel[0];
    self->cs.remover = *sel[1];
    self->cs.rng = &((RngObject *)args[2])->r;
    self->cs.max_size = max_size;
    Py_INCREF(args[0]);
    Py_INCREF(args[1]);
    Py_INCREF(args[2]);
    self->sampler = args[0];
    self->remover = args[1];
    self->rng = args[2];
    Py_RETURN_NONE;
}

static int table_attached(CommitTable *self) {
    if (!table_ready(self))
        return 0;
    if (self->rng == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "CommitTable: attach() the selectors first");
        return 0;
    }
    return 1;
}

/* -1: nothing changed; -2: the metadata was committed (why() gives k), then a selector failed. */
static PyObject *full_failed(CommitTable *self) {
    return PyLong_FromLong(self->err.changed ? -2 : -1);
}

PyDoc_STRVAR(table_commit_all_doc,
             "commit_all(slots, priorities) -> int: TableCore.commit in one call (mutex held): "
             "the O(1) count checks, commit(slots, priorities) (compacting both arrays in "
             "place), the sampler's and the remover's insert, the eviction of what exceeds "
             "max_size. Returns how many were committed, -1 when a count check failed (nothing "
             "changed: repair, call again), -2 when a selector failed after the metadata was "
             "committed (repair, which takes the new items, then evict()). why() says what.");

static PyObject *table_commit_all(CommitTable *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!table_attached(self))
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "commit_all(slots, priorities)");
        return NULL;
    }
    Py_buffer s, p;
    if (shm_get_buffer(args[0], &s, 8, 1, "slots") < 0)
        return NULL;
    if (shm_get_buffer(args[1], &p, 8, 1, "priorities") < 0) {
        PyBuffer_Release(&s);
        return NULL;
    }
    int64_t n = shm_buffer_len(&s), k = 0;
    int64_t *slots = s.buf;
    const char *bad = NULL;
    if (shm_buffer_len(&p) != n)
        bad = "slots and priorities differ in length";
    for (int64_t i = 0; bad == NULL && i < n; i++)
        if (slots[i] < 0 || slots[i] >= self->t.num_slots)
            bad = "a slot is out of range";
    if (bad == NULL)
        k = shm_commit_full(&self->t, &self->cs, slots, p.buf, n, &self->err);
    PyBuffer_Release(&s);
    PyBuffer_Release(&p);
    if (bad != NULL) {
        PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    if (k == SHM_ENOMEM)
        return PyErr_NoMemory();
    if (k < 0)
        return full_failed(self);
    return PyLong_FromLongLong(k);
}

PyDoc_STRVAR(table_evict_doc,
             "evict() -> int: evict what exceeds max_size (the remover's victims, uniforms from "
             "the Rng when it draws); mutex held. Returns how many, or -2 when a selector failed "
             "(repair, call again); why() says what.");

static PyObject *table_evict(CommitTable *self, PyObject *unused) {
    (void)unused;
    if (!table_attached(self))
        return NULL;
    self->err.k = 0;
    int64_t k = shm_commit_evict(&self->t, &self->cs, &self->err);
    if (k < 0)
        return full_failed(self);
    return PyLong_FromLongLong(k);
}

/* The text of a selector check's problem (the Python selectors' check() wording). */
static PyObject *sel_reason(const shm_sel_problem *q) {
    switch (q->what) {
    case SHM_SEL_BAD_COUNT:
        return PyUnicode_FromFormat("its items set counts %lld items, the table holds %lld",
                                    (long long)q->a, (long long)q->b);
    case SHM_SEL_BAD_TOTAL: {
        PyObject *p = PyFloat_FromDouble(q->p);
        PyObject *s = p == NULL ? NULL : PyUnicode_FromFormat("its sum-tree total is %R", p);
        Py_XDECREF(p);
        return s;
    }
    case SHM_SEL_BAD_ENDS:
        return PyUnicode_FromFormat("its order ring's head %lld and tail %lld cannot hold %lld "
                                    "items in %lld entries",
                                    (long long)q->a, (long long)q->b, (long long)q->d,
                                    (long long)q->c);
    case SHM_SEL_BAD_CLOCK:
        return PyUnicode_FromFormat("its clock is %lld, outside 0..%lld", (long long)q->a,
                                    (long long)SHM_SEL_MAX_CLOCK);
    }
    return PyUnicode_FromString("its arrays make no sense");
}

PyDoc_STRVAR(table_why_doc,
             "why() -> (reason, k): what the last failed commit_all/evict found (check_counts' "
             "wording), and how many items it had committed.");

static PyObject *table_why(CommitTable *self, PyObject *unused) {
    (void)unused;
    const shm_full_error *e = &self->err;
    long long a = e->a, b = e->b, c = e->c, k = e->k;
    PyObject *why = NULL;
    switch (e->what) {
    case SHM_FULL_SIZE:
        why = PyUnicode_FromFormat("its size is %lld, outside 0..%lld", a,
                                   (long long)self->t.num_slots);
        break;
    case SHM_FULL_FREE_ENDS:
        why = PyUnicode_FromFormat("its free ring's head %lld and tail %lld do not fit %lld "
                                   "slots of which %lld hold items",
                                   a, b, (long long)self->t.num_slots, c);
        break;
    case SHM_FULL_FREE_TAIL:
        why = PyUnicode_FromFormat("its free ring's tail is %lld", a);
        break;
    case SHM_FULL_SAMPLER:
    case SHM_FULL_REMOVER: {
        const char *role = e->what == SHM_FULL_SAMPLER ? "sampler" : "remover";
        PyObject *inner = e->code == SHM_OK ? sel_reason(&e->sel)
                                            : PyUnicode_FromFormat(
                                                  "its arrays make no sense (status %d)",
                                                  e->code);
        if (inner != NULL)
            why = PyUnicode_FromFormat("its %s: %U", role, inner);
        Py_XDECREF(inner);
        break;
    }
    default:
        why = PyUnicode_FromString("nothing failed");
    }
    if (why == NULL)
        return NULL;
    return Py_BuildValue("(NL)", why, k);
}

PyDoc_STRVAR(table_check_doc,
             "check() -> None or str: check_counts in O(1) (mutex held): the size and the free "
             "ring's ends against the table, then each selector's own counts; what is wrong.");

static PyObject *table_check(CommitTable *self, PyObject *unused) {
    (void)unused;
    if (!table_attached(self))
        return NULL;
    if (shm_commit_check(&self->t, &self->cs, &self->err) == SHM_OK)
        Py_RETURN_NONE;
    self->err.k = 0;
    PyObject *why = table_why(self, NULL);
    if (why == NULL)
        return NULL;
    PyObject *text = PyTuple_GET_ITEM(why, 0);
    Py_INCREF(text);
    Py_DECREF(why);
    return text;
}

static PyMethodDef table_methods[] = {
    {"check", (PyCFunction)table_check, METH_NOARGS, table_check_doc},
    {"attach", (PyCFunction)(void (*)(void))table_attach, METH_FASTCALL, table_attach_doc},
    {"commit_all", (PyCFunction)(void (*)(void))table_commit_all, METH_FASTCALL,
     table_commit_all_doc},
    {"evict", (PyCFunction)table_evict, METH_NOARGS, table_evict_doc},
    {"why", (PyCFunction)table_why, METH_NOARGS, table_why_doc},
    {"commit", (PyCFunction)(void (*)(void))table_commit, METH_FASTCALL, table_commit_doc},
    {"lease", (PyCFunction)(void (*)(void))table_lease, METH_FASTCALL, table_lease_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CommitTableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.CommitTable",
    .tp_doc = PyDoc_STR("CommitTable(ctrl, key, state, priority, times_sampled, seq, gen, owner, "
                        "episode, free, last_episode, max_priority): a table's commit metadata "
                        "and free-slot lease over its shared arrays (ctrl flat, int64)."),
    .tp_basicsize = sizeof(CommitTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)table_init,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_methods = table_methods,
};

/* ---- CommitRound ------------------------------------------------------------------------- */

enum { RB_CHAN, RB_LEASE, RB_PUBLISH, RB_ACTIVE, RB_PUB_HEAD, RB_LEASE_TAIL, RB_OUTSTANDING,
       RB_OUT_SLOTS, RB_OUT_PRIOS, RB_COUNT };
static const char *const round_names[RB_COUNT] = {
    "chan", "lease", "publish", "active", "pub_head", "lease_tail", "outstanding",
    "out_slots", "out_prios"};
static const Py_ssize_t round_items[RB_COUNT] = {8, 8, 8, 1, 8, 8, 8, 8, 8};

typedef struct {
    PyObject_HEAD
    shm_round r;
    PyObject *table; /* the CommitTable: keeps r.t alive */
    Py_buffer views[RB_COUNT];
    int nviews;
    Py_buffer mutex_view; /* set_mutex(): the table's robust mutex, for commit_round */
    pthread_mutex_t *mutex;
    int64_t *drained_tail;
    shm_pub_error *errors;
    int64_t *wanting; /* 3 x max_clients: wanting()'s channels, wants and lease counts */
} CommitRound;

static void round_dealloc(CommitRound *self) {
    if (self->mutex != NULL)
        PyBuffer_Release(&self->mutex_view);
    for (int i = 0; i < self->nviews; i++)
        PyBuffer_Release(&self->views[i]);
    free(self->drained_tail);
    free(self->errors);
    free(self->wanting);
    Py_XDECREF(self->table);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int round_init(CommitRound *self, PyObject *args, PyObject *kwds) {
    PyObject *table, *objs[RB_COUNT];
    (void)kwds;
    if (self->table != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "CommitRound is initialised once");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "O!OOOOOOOOO:CommitRound", &CommitTableType, &table, &objs[0],
                          &objs[1], &objs[2], &objs[3], &objs[4], &objs[5], &objs[6], &objs[7],
                          &objs[8]))
        return -1;
    CommitTable *ct = (CommitTable *)table;
    if (!table_ready(ct))
        return -1;
    Py_INCREF(table);
    self->table = table;
    for (int i = 0; i < RB_COUNT; i++) {
        if (shm_get_buffer(objs[i], &self->views[i], round_items[i], 1, round_names[i]) < 0)
            return -1;
        self->nviews = i + 1;
    }
    Py_ssize_t clients = ct->t.max_clients;
    const Py_ssize_t want[RB_COUNT] = {
        clients * SHM_CHAN_COUNT * SHM_LINE, clients * SHM_LEASE_CAPACITY,
        clients * SHM_PUBLISH_CAPACITY, clients, clients, clients, clients,
        clients * SHM_PUBLISH_CAPACITY, clients * SHM_PUBLISH_CAPACITY};
    for (int i = 0; i < RB_COUNT; i++) {
        if (shm_buffer_len(&self->views[i]) != want[i]) {
            PyErr_Format(PyExc_ValueError, "%s must have %zd items for %zd channels",
                         round_names[i], want[i], clients);
            return -1;
        }
    }
    self->drained_tail = malloc((size_t)(clients > 0 ? clients : 1) * sizeof(int64_t));
    self->errors = malloc((size_t)(clients > 0 ? clients : 1) * sizeof(shm_pub_error));
    self->wanting = malloc((size_t)(3 * (clients > 0 ? clients : 1)) * sizeof(int64_t));
    if (self->drained_tail == NULL || self->errors == NULL || self->wanting == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t c = 0; c < clients; c++)
        self->drained_tail[c] = -1;
    shm_round *r = &self->r;
    r->t = &ct->t;
    r->chan = self->views[RB_CHAN].buf;
    r->lease_ring = self->views[RB_LEASE].buf;
    r->publish_ring = self->views[RB_PUBLISH].buf;
    r->active = self->views[RB_ACTIVE].buf;
    r->pub_head = self->views[RB_PUB_HEAD].buf;
    r->lease_tail = self->views[RB_LEASE_TAIL].buf;
    r->outstanding = self->views[RB_OUTSTANDING].buf;
    r->out_slots = self->views[RB_OUT_SLOTS].buf;
    r->out_prios = self->views[RB_OUT_PRIOS].buf;
    r->drained_tail = self->drained_tail;
    return 0;
}

static int round_ready(CommitRound *self) {
    if (self->drained_tail == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "CommitRound is not initialised");
        return 0;
    }
    return 1;
}

/* check_published's text for a refused run. */
static PyObject *pub_reason(const shm_pub_error *e, const shm_table *t) {
    long long a = e->a, b = e->b, c = e->c, d = e->d;
    switch (e->code) {
    case SHM_PUB_BEHIND:
        return PyUnicode_FromFormat("its publish ring's tail (%lld) is behind its head (%lld)",
                                    a, b);
    case SHM_PUB_AHEAD:
        return PyUnicode_FromFormat("its publish ring's tail (%lld) is %lld ahead of its head "
                                    "(%lld), but it holds %lld leased slot(s) (ring capacity %d)",
                                    a, b, c, d, SHM_PUBLISH_CAPACITY);
    case SHM_PUB_RANGE:
        return PyUnicode_FromFormat("it published slot index %lld, outside 0..%lld", a,
                                    (long long)t->num_slots - 1);
    case SHM_PUB_FOREIGN:
        return PyUnicode_FromFormat("it published slot %lld, which is not leased to it (state "
                                    "%lld, owner channel %lld)",
                                    a, b, c);
    case SHM_PUB_TWICE:
        return PyUnicode_FromFormat("it published slot %lld twice", a);
    default: {
        PyObject *p = PyFloat_FromDouble(e->p), *lim = PyFloat_FromDouble(t->max_priority);
        PyObject *s = NULL;
        if (p != NULL && lim != NULL)
            s = PyUnicode_FromFormat("it published priority %R for slot %lld; priorities must be "
                                     "finite, >= 0 and at most %R",
                                     p, a, lim);
        Py_XDECREF(p);
        Py_XDECREF(lim);
        return s;
    }
    }
}

PyDoc_STRVAR(round_pending_doc,
             "pending() -> bool: whether any active channel published past the daemon's head.");

static PyObject *round_pending(CommitRound *self, PyObject *unused) {
    (void)unused;
    if (!round_ready(self))
        return NULL;
    return PyBool_FromLong(shm_round_pending(&self->r));
}

PyDoc_STRVAR(round_drain_doc,
             "drain() -> (n, refused): drain every active channel's publish run, checked, into "
             "out_slots[:n] and out_prios[:n] (channel after channel); refused: None, or a list "
             "of (channel, reason) for runs that make no sense (not drained: cut them off). "
             "Call finish() once the drained items are committed.");

/* drain()'s result: (n, None) or (n, [(channel, reason), ...]). */
static PyObject *round_drain_result(CommitRound *self, int64_t n, int64_t nerr) {
    if (nerr == 0)
        return Py_BuildValue("(LO)", (long long)n, Py_None);
    PyObject *list = PyList_New(nerr);
    if (list == NULL)
        return NULL;
    for (int64_t i = 0; i < nerr; i++) {
        PyObject *why = pub_reason(&self->errors[i], self->r.t);
        PyObject *item = why == NULL ? NULL
                                     : Py_BuildValue("(LN)", (long long)self->errors[i].channel,
                                                     why);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return Py_BuildValue("(LN)", (long long)n, list);
}

static PyObject *round_drain(CommitRound *self, PyObject *unused) {
    (void)unused;
    if (!round_ready(self))
        return NULL;
    int64_t nerr = 0;
    int64_t n = shm_round_drain(&self->r, self->errors, &nerr);
    return round_drain_result(self, n, nerr);
}

PyDoc_STRVAR(round_finish_doc,
             "finish() -> int: after the drained items were committed, per drained channel: "
             "outstanding -= its run, head = tail, PUB_HEAD store-release. Returns how many "
             "channels.");

static PyObject *round_finish(CommitRound *self, PyObject *unused) {
    (void)unused;
    if (!round_ready(self))
        return NULL;
    return PyLong_FromLongLong(shm_round_finish(&self->r));
}

PyDoc_STRVAR(round_any_writer_doc,
             "any_writer() -> bool: whether an active channel's WANT_LEASE is > 0.");

static PyObject *round_any_writer(CommitRound *self, PyObject *unused) {
    (void)unused;
    if (!round_ready(self))
        return NULL;
    return PyBool_FromLong(shm_round_any_writer(&self->r));
}

PyDoc_STRVAR(round_settle_doc,
             "settle(flag) -> int: before sleeping: set_sleeping(flag), then bit 1 when a "
             "sampler or a writer waits on the daemon (SAMPLER_WAITING, WAIT_INSERT), bit 2 "
             "when pending().");

static PyObject *round_settle(CommitRound *self, PyObject *arg) {
    if (!round_ready(self))
        return NULL;
    long long v = PyLong_AsLongLong(arg);
    if (v == -1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(shm_round_settle(&self->r, v));
}

PyDoc_STRVAR(round_set_mutex_doc,
             "set_mutex(buf) -> None: the table's process-shared robust mutex (its bytes in the "
             "segment, uint8), which commit_round takes itself.");

static PyObject *round_set_mutex(CommitRound *self, PyObject *arg) {
    if (!round_ready(self))
        return NULL;
    if (self->mutex != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "set_mutex is called once");
        return NULL;
    }
    if (shm_get_buffer(arg, &self->mutex_view, 1, 1, "mutex") < 0)
        return NULL;
    if (self->mutex_view.len < (Py_ssize_t)sizeof(pthread_mutex_t) ||
        (uintptr_t)self->mutex_view.buf % _Alignof(pthread_mutex_t) != 0) {
        PyBuffer_Release(&self->mutex_view);
        PyErr_SetString(PyExc_ValueError, "mutex: too short or misaligned for a pthread mutex");
        return NULL;
    }
    self->mutex = self->mutex_view.buf;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(round_commit_round_doc,
             "commit_round() -> None | int | (n, refused): the daemon's drain and commit in one "
             "call. Drains every active channel; when nothing was refused and the table's mutex "
             "is free (one trylock), commits the items (CommitTable.commit_all), unlocks and "
             "finishes (PUB_HEAD store-release): returns how many were committed (int >= 0). "
             "None: nothing was published. -2: the lock is released, the metadata committed, a "
             "selector failed (repair, evict, then finish()). (n, refused): as drain(), nothing "
             "committed (refusals, a busy lock, or a count check that failed): the caller "
             "commits and finishes as after drain(). (n, False): the same, but the lock is "
             "held and its previous owner died: recover it and release it first.");

static PyObject *round_commit_round(CommitRound *self, PyObject *unused) {
    (void)unused;
    if (!round_ready(self))
        return NULL;
    CommitTable *ct = (CommitTable *)self->table;
    if (self->mutex == NULL || !table_attached(ct)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "commit_round: set_mutex() first");
        return NULL;
    }
    int64_t nerr = 0;
    int64_t n = shm_round_drain(&self->r, self->errors, &nerr);
    if (nerr == 0 && n == 0)
        Py_RETURN_NONE;
    if (nerr > 0)
        return round_drain_result(self, n, nerr);
    /* The table's mutex: robust, process-shared, taken by every process of the group. One
     * try: a holder (a sampler) makes the caller wait for it in Python, with its stall
     * warnings. */
    int rc = pthread_mutex_trylock(self->mutex);
    if (rc == EOWNERDEAD) /* held: the caller repairs, marks it consistent, releases it */
        return Py_BuildValue("(LO)", (long long)n, Py_False);
    if (rc != 0)
        return round_drain_result(self, n, 0);
    int64_t k = shm_commit_full(self->r.t, &ct->cs, self->r.out_slots, self->r.out_prios, n,
                                &ct->err);
    pthread_mutex_unlock(self->mutex);
    if (k == SHM_ECORRUPT && !ct->err.changed)
        return round_drain_result(self, n, 0); /* nothing changed: the caller repairs */
    if (k == SHM_ECORRUPT)
        return PyLong_FromLong(-2);
    if (k < 0)
        return PyErr_NoMemory();
    shm_round_finish(&self->r);
    return PyLong_FromLongLong(k);
}

PyDoc_STRVAR(round_lease_doc,
             "lease(channel, n) -> int: lease up to n free slots to channel and publish them on "
             "its lease ring (LEASE_TAIL store-release; outstanding and lease_tail updated); "
             "mutex held. Returns how many, or -1 when the free ring makes no sense (nothing "
             "changed: rebuild it and call again).");

static PyObject *round_lease(CommitRound *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!round_ready(self))
        return NULL;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "lease(channel, n)");
        return NULL;
    }
    long long c = PyLong_AsLongLong(args[0]), n = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred())
        return NULL;
    if (c < 0 || c >= self->r.t->max_clients || n < 0) {
        PyErr_SetString(PyExc_ValueError, "lease: channel out of range or n negative");
        return NULL;
    }
    int64_t k = shm_round_lease(&self->r, c, n);
    return PyLong_FromLongLong(k < 0 ? -1 : k);
}

PyDoc_STRVAR(round_wanting_doc,
             "wanting(headroom=0) -> list[(channel, want, have)]: the active channels whose "
             "WANT_LEASE is not 0, with what they want and how many leased slots their ring "
             "holds (the daemon's tail minus their head: unchecked). Empty when none; with "
             "headroom > 0 (the table's, no rate limiter blocking inserts) also empty when "
             "every one wants more than 0, holds 0..LEASE_CAPACITY and more than half of its "
             "share min(max(headroom // (2 * wanting), 1), LEASE_CAPACITY): nothing to lease.");

static PyObject *round_wanting(CommitRound *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!round_ready(self))
        return NULL;
    long long headroom = 0;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "wanting(headroom=0)");
        return NULL;
    }
    if (nargs == 1 && (headroom = PyLong_AsLongLong(args[0])) == -1 && PyErr_Occurred())
        return NULL;
    int64_t m = self->r.t->max_clients;
    int64_t *buf = self->wanting; /* allocated once, with the round */
    int64_t k = shm_round_wanting(&self->r, buf, buf + m, buf + 2 * m);
    if (headroom > 0 && k > 0) {
        /* The daemon's refill at half, decided here: a round with nothing to lease builds no
         * list. Anything to refuse (a negative want, a head out of range) goes to Python. */
        long long share = headroom / (2 * k);
        share = share < 1 ? 1 : share > SHM_LEASE_CAPACITY ? SHM_LEASE_CAPACITY : share;
        int needed = 0;
        for (int64_t i = 0; i < k && !needed; i++) {
            int64_t want = buf[m + i], have = buf[2 * m + i];
            needed = want < 0 || have < 0 || have > SHM_LEASE_CAPACITY || have <= share / 2;
        }
        if (!needed)
            k = 0;
    }
    PyObject *list = PyList_New(k);
    for (int64_t i = 0; list != NULL && i < k; i++) {
        PyObject *item = Py_BuildValue("(LLL)", (long long)buf[i], (long long)buf[m + i],
                                       (long long)buf[2 * m + i]);
        if (item == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

PyDoc_STRVAR(round_waiters_doc,
             "waiters() -> (wait_insert, wait_sample): after a seq_cst fence, how many channels "
             "have WAIT_INSERT and WAIT_SAMPLE set.");

static PyObject *round_waiters(CommitRound *self, PyObject *unused) {
    (void)unused;
    if (!round_ready(self))
        return NULL;
    int64_t wi, ws;
    shm_round_waiters(&self->r, &wi, &ws);
    return Py_BuildValue("(LL)", (long long)wi, (long long)ws);
}

static PyMethodDef round_methods[] = {
    {"wanting", (PyCFunction)(void (*)(void))round_wanting, METH_FASTCALL, round_wanting_doc},
    {"waiters", (PyCFunction)round_waiters, METH_NOARGS, round_waiters_doc},
    {"pending", (PyCFunction)round_pending, METH_NOARGS, round_pending_doc},
    {"drain", (PyCFunction)round_drain, METH_NOARGS, round_drain_doc},
    {"set_mutex", (PyCFunction)round_set_mutex, METH_O, round_set_mutex_doc},
    {"any_writer", (PyCFunction)round_any_writer, METH_NOARGS, round_any_writer_doc},
    {"settle", (PyCFunction)round_settle, METH_O, round_settle_doc},
    {"commit_round", (PyCFunction)round_commit_round, METH_NOARGS, round_commit_round_doc},
    {"finish", (PyCFunction)round_finish, METH_NOARGS, round_finish_doc},
    {"lease", (PyCFunction)(void (*)(void))round_lease, METH_FASTCALL, round_lease_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CommitRoundType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.CommitRound",
    .tp_doc = PyDoc_STR("CommitRound(table, chan, lease, publish, active, pub_head, lease_tail, "
                        "outstanding, out_slots, out_prios): the daemon's round over one table's "
                        "channels (chan flat int64 [clients*8*8]; active uint8/bool)."),
    .tp_basicsize = sizeof(CommitRound),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)round_init,
    .tp_dealloc = (destructor)round_dealloc,
    .tp_methods = round_methods,
};

/* ---- Loop ------------------------------------------------------------------------------ */

typedef struct {
    PyObject *round;     /* the CommitRound (strong) */
    sem_t *sample, *insert;
    uint8_t *snapshot;   /* private: the active channels, copied at each serve() */
    const uint8_t *live; /* the daemon's active array (the CommitRound's) */
    Py_buffer params;    /* the table's parameter lines */
    int has_params;
} LoopSlot;

typedef struct {
    PyObject_HEAD
    shm_loop L;
    LoopSlot *slots;
    sem_t *wake;
    Py_buffer attention;
    int has_attention;
    int serving;
} LoopObject;

static void loop_dealloc(LoopObject *self) {
    for (int64_t i = 0; i < self->L.ntables; i++) {
        LoopSlot *s = &self->slots[i];
        if (s->sample != NULL)
            sem_close(s->sample);
        if (s->insert != NULL)
            sem_close(s->insert);
        free(s->snapshot);
        free(self->L.tables[i].scratch);
        if (s->has_params)
            PyBuffer_Release(&s->params);
        Py_XDECREF(s->round);
    }
    free(self->slots);
    free(self->L.tables);
    if (self->wake != NULL)
        sem_close(self->wake);
    if (self->has_attention)
        PyBuffer_Release(&self->attention);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* sem_open of an existing semaphore by its name (posix_ipc's Semaphore.name). */
static sem_t *open_sem(PyObject *name) {
    const char *s = PyUnicode_AsUTF8(name);
    if (s == NULL)
        return NULL;
    sem_t *sem = sem_open(s, 0);
    if (sem == SEM_FAILED) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        return NULL;
    }
    return sem;
}

static int loop_init(LoopObject *self, PyObject *args, PyObject *kwds) {
    PyObject *wake, *attention;
    double nap, idle, window;
    (void)kwds;
    if (self->wake != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Loop is initialised once");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "UOddd:Loop", &wake, &attention, &nap, &idle, &window))
        return -1;
    if (!(nap >= 0 && idle >= 0 && window >= 0)) {
        PyErr_SetString(PyExc_ValueError, "Loop: the nap, idle and window times must be >= 0");
        return -1;
    }
    if (shm_get_array(attention, &self->attention, 'i', 1, "attention") < 0)
        return -1;
    self->has_attention = 1;
    if (shm_buffer_len(&self->attention) < 1) {
        PyErr_SetString(PyExc_ValueError, "attention must hold one int64");
        return -1;
    }
    if ((self->wake = open_sem(wake)) == NULL)
        return -1;
    self->L.wake = self->wake;
    self->L.attention = self->attention.buf;
    self->L.nap_s = nap;
    self->L.idle_s = idle;
    self->L.active_window_s = window;
    self->L.last_work = 0.0;
    self->L.last_pace = shm_monotonic();
    self->L.pace_nap_s = nap;
    self->L.min_nap_s = nap * SHM_LOOP_MIN_NAP_FRACTION;
    return 0;
}

static int loop_ready(LoopObject *self) {
    if (self->wake == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Loop is not initialised");
        return 0;
    }
    if (self->serving) {
        PyErr_SetString(PyExc_RuntimeError, "Loop: serve() runs in another thread");
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(loop_add_doc,
             "add(round, params, headroom, sample, insert) -> int: serve one more table: its "
             "CommitRound (set_mutex() called, its CommitTable attached), its parameter lines "
             "(float64, flat [Param.COUNT * LINE]), spec.headroom, and the names of its sample "
             "and insert events. Returns the table's index in serve()'s answers.");

static PyObject *loop_add(LoopObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!loop_ready(self))
        return NULL;
    SHM_CHECK_NARGS("add", 5);
    if (!PyObject_TypeCheck(args[0], &CommitRoundType)) {
        PyErr_SetString(PyExc_TypeError, "add: round must be a CommitRound");
        return NULL;
    }
    CommitRound *rnd = (CommitRound *)args[0];
    if (!round_ready(rnd))
        return NULL;
    CommitTable *ct = (CommitTable *)rnd->table;
    if (rnd->mutex == NULL || !table_attached(ct)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "add: the round's set_mutex() first");
        return NULL;
    }
    long long headroom = PyLong_AsLongLong(args[2]);
    if (headroom == -1 && PyErr_Occurred())
        return NULL;
    if (headroom < 0) {
        PyErr_SetString(PyExc_ValueError, "add: headroom must be >= 0");
        return NULL;
    }
    Py_buffer pv;
    if (shm_get_array(args[1], &pv, 'd', 0, "params") < 0)
        return NULL;
    if (shm_buffer_len(&pv) < (SHM_PARAM_KIND + 1) * SHM_LINE) {
        PyBuffer_Release(&pv);
        PyErr_SetString(PyExc_ValueError, "add: params must hold the parameter lines");
        return NULL;
    }
    int64_t m = ct->t.max_clients, n = self->L.ntables;
    LoopSlot *slots = realloc(self->slots, (size_t)(n + 1) * sizeof *slots);
    if (slots != NULL)
        self->slots = slots;
    shm_loop_table *tables = slots == NULL ? NULL
                                           : realloc(self->L.tables, (size_t)(n + 1) * sizeof *tables);
    if (tables == NULL) {
        PyBuffer_Release(&pv);
        return PyErr_NoMemory();
    }
    self->L.tables = tables;
    LoopSlot *s = &slots[n];
    shm_loop_table *lt = &tables[n];
    memset(s, 0, sizeof *s);
    memset(lt, 0, sizeof *lt);
    s->snapshot = malloc((size_t)(m > 0 ? m : 1));
    lt->scratch = malloc((size_t)(4 * (m > 0 ? m : 1)) * sizeof(int64_t));
    if (s->snapshot == NULL || lt->scratch == NULL ||
        (s->sample = open_sem(args[3])) == NULL || (s->insert = open_sem(args[4])) == NULL) {
        if (s->snapshot == NULL || lt->scratch == NULL)
            PyErr_NoMemory();
        if (s->sample != NULL)
            sem_close(s->sample);
        free(s->snapshot);
        free(lt->scratch);
        PyBuffer_Release(&pv);
        return NULL;
    }
    s->params = pv;
    s->has_params = 1;
    const double *params = pv.buf;
    Py_INCREF(args[0]);
    s->round = args[0];
    s->live = rnd->r.active;
    lt->r = &rnd->r;
    lt->cs = &ct->cs;
    lt->err = &ct->err;
    lt->errors = rnd->errors;
    lt->mutex = rnd->mutex;
    lt->lim = (shm_limiter){params, SHM_LINE, ct->t.ctrl, SHM_LINE};
    lt->headroom = headroom;
    lt->sample = s->sample;
    lt->insert = s->insert;
    self->L.ntables = n + 1;
    return PyLong_FromLongLong(n);
}

PyDoc_STRVAR(loop_set_broken_doc,
             "set_broken(index, broken) -> None: a quarantined table is not served.");

static PyObject *loop_set_broken(LoopObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!loop_ready(self))
        return NULL;
    SHM_CHECK_NARGS("set_broken", 2);
    long long i = PyLong_AsLongLong(args[0]);
    int broken = PyObject_IsTrue(args[1]);
    if ((i == -1 && PyErr_Occurred()) || broken < 0)
        return NULL;
    if (i < 0 || i >= self->L.ntables) {
        PyErr_SetString(PyExc_IndexError, "set_broken: no such table");
        return NULL;
    }
    self->L.tables[i].broken = broken;
    Py_RETURN_NONE;
}

/* What a table hands to Python, as CommitRound.commit_round's result. */
static PyObject *hand_result(LoopObject *self, const shm_loop_exit *x) {
    CommitRound *rnd = (CommitRound *)self->slots[x->table].round;
    switch (x->hand) {
    case SHM_HAND_REFUSED:
        return round_drain_result(rnd, x->n, x->nerr);
    case SHM_HAND_BUSY:
        return Py_BuildValue("(LO)", (long long)x->n, Py_None);
    case SHM_HAND_DEAD_OWNER:
        return Py_BuildValue("(LO)", (long long)x->n, Py_False);
    case SHM_HAND_SELECTOR:
        return PyLong_FromLong(-2);
    default: /* SHM_HAND_REFILL */
        Py_RETURN_NONE;
    }
}

PyDoc_STRVAR(loop_serve_doc,
             "serve(deadline) -> (code, table, result): the daemon's loop, without the GIL, "
             "until time.monotonic() reaches deadline or something needs Python. code: "
             "LOOP_DEADLINE, LOOP_ATTENTION (attention[0] was set: Python clears it), "
             "LOOP_INTERRUPTED (a signal: its handler has run when this returns) or LOOP_TABLE: "
             "table (its index) needs Python's round, with result in commit_round()'s form "
             "(None when what was published is committed and the leases need Python). Each "
             "channel's activity is read once per call (a channel activated meanwhile is "
             "served from the next call: set attention).");

static PyObject *loop_serve(LoopObject *self, PyObject *arg) {
    if (!loop_ready(self))
        return NULL;
    double deadline = PyFloat_AsDouble(arg);
    if (deadline == -1.0 && PyErr_Occurred())
        return NULL;
    for (int64_t i = 0; i < self->L.ntables; i++) {
        LoopSlot *s = &self->slots[i];
        memcpy(s->snapshot, s->live, (size_t)self->L.tables[i].r->t->max_clients);
        self->L.tables[i].r->active = s->snapshot;
    }
    shm_loop_exit x;
    self->serving = 1;
    Py_BEGIN_ALLOW_THREADS
    shm_loop_serve(&self->L, deadline, &x);
    Py_END_ALLOW_THREADS
    self->serving = 0;
    for (int64_t i = 0; i < self->L.ntables; i++)
        self->L.tables[i].r->active = (uint8_t *)self->slots[i].live;
    if (x.code != SHM_LOOP_TABLE)
        return Py_BuildValue("(iOO)", x.code, Py_None, Py_None);
    PyObject *res = hand_result(self, &x);
    if (res == NULL)
        return NULL;
    return Py_BuildValue("(iLN)", x.code, (long long)x.table, res);
}

PyDoc_STRVAR(loop_statistics_doc,
             "statistics() -> (rounds, naps): rounds served over every table, timed waits.");

static PyObject *loop_statistics(LoopObject *self, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("(LL)", (long long)self->L.rounds, (long long)self->L.naps);
}

PyDoc_STRVAR(loop_set_times_doc,
             "set_times(nap, idle, window) -> None: the longest nap while writers are active, "
             "the longest sleep while they are quiet, and how long quiet means (seconds).");

static PyObject *loop_set_times(LoopObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!loop_ready(self))
        return NULL;
    SHM_CHECK_NARGS("set_times", 3);
    double v[3];
    for (int i = 0; i < 3; i++) {
        v[i] = PyFloat_AsDouble(args[i]);
        if (v[i] == -1.0 && PyErr_Occurred())
            return NULL;
        if (!(v[i] >= 0)) {
            PyErr_SetString(PyExc_ValueError, "set_times: times must be >= 0");
            return NULL;
        }
    }
    self->L.nap_s = v[0], self->L.idle_s = v[1], self->L.active_window_s = v[2];
    self->L.min_nap_s = v[0] * SHM_LOOP_MIN_NAP_FRACTION;
    Py_RETURN_NONE;
}

static PyMethodDef loop_methods[] = {
    {"add", (PyCFunction)(void (*)(void))loop_add, METH_FASTCALL, loop_add_doc},
    {"set_broken", (PyCFunction)(void (*)(void))loop_set_broken, METH_FASTCALL,
     loop_set_broken_doc},
    {"serve", (PyCFunction)loop_serve, METH_O, loop_serve_doc},
    {"statistics", (PyCFunction)loop_statistics, METH_NOARGS, loop_statistics_doc},
    {"set_times", (PyCFunction)(void (*)(void))loop_set_times, METH_FASTCALL,
     loop_set_times_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LoopType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.Loop",
    .tp_doc = PyDoc_STR("Loop(wake, attention, nap, idle, window): the daemon's commit loop over "
                        "its tables (add() each), in C: csrc/commit.h, shm_loop_serve. wake: "
                        "the name of the daemon's event; attention: int64 array, [0] set by "
                        "Python (then wake posted) to get the loop back."),
    .tp_basicsize = sizeof(LoopObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)loop_init,
    .tp_dealloc = (destructor)loop_dealloc,
    .tp_methods = loop_methods,
};

int shm_bind_commit(PyObject *module) {
    if (PyModule_AddType(module, &LoopType) < 0)
        return -1;
    static const struct {
        const char *name;
        int value;
    } codes[] = {{"LOOP_DEADLINE", SHM_LOOP_DEADLINE},
                 {"LOOP_ATTENTION", SHM_LOOP_ATTENTION},
                 {"LOOP_INTERRUPTED", SHM_LOOP_INTERRUPTED},
                 {"LOOP_TABLE", SHM_LOOP_TABLE}};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        if (PyModule_AddIntConstant(module, codes[i].name, codes[i].value) < 0)
            return -1;
    if (PyModule_AddType(module, &RngType) < 0)
        return -1;
    if (PyModule_AddType(module, &CommitTableType) < 0)
        return -1;
    if (PyModule_AddType(module, &CommitRoundType) < 0)
        return -1;
    return 0;
}
