/* Bindings of the sample concern: SampleCore, built once per table over its shared arrays,
 * whose methods run the sample path's bookkeeping, row copies and mutations (sample.c).
 *
 * SampleCore.sample is the learner's whole sample in one call: the table's robust mutex taken
 * here (trylock, a short spin), the limiter, the draw, the bookkeeping and the max_times_sampled
 * removal (shm_sample_locked), unlock, the row copy with its seqlock check (GIL released for a
 * large copy). Scratch lives in the object, allocated once per batch size and reused. */
#include "shm_bind.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>

#include "bind_selector.h"
#include "sample.h"
#include "shm_buffers.h"

#define MAX_FIELDS 64
/* Copies of at least this many bytes (tens of µs) run with the GIL released, so that the
 * process's other threads (a training loop beside a prefetching sampler) run meanwhile; a
 * smaller one keeps it: taking it back may wait for another thread's switch interval (5 ms),
 * far longer than the copy. */
#define GIL_RELEASE_BYTES (256 * 1024)
/* A busy table lock: trylock this many times (~0.3 µs each; holders keep it for microseconds),
 * then this many more after a sched_yield each (the holder may wait for our CPU), then hand the
 * wait to Python (RobustMutex.acquire: timed waits, LockTimeout naming the holder). The same
 * figures as shmreplay/mutex.py. */
#define SPIN_TRIES 64
#define YIELD_TRIES 16

/* numpy's bitgen_t (numpy/random/bitgen.h), the struct its BitGenerator.capsule holds. */
typedef struct {
    void *state;
    uint64_t (*next_uint64)(void *st);
    uint32_t (*next_uint32)(void *st);
    double (*next_double)(void *st);
    uint64_t (*next_raw)(void *st);
} numpy_bitgen;

/* sample()'s freed when it did not release the exhausted items (SampleCore.RELEASE_*). */
#define RELEASE_PENDING (-1)    /* the lock was busy: the caller releases them */
#define RELEASE_OWNER_DIED (-2) /* we hold the lock, its owner died: recover, release, unlock */

/* What sample() returns first (SampleCore.SAMPLED ...): shm_sample_locked's values, then: */
enum {
    SAMPLE_BUSY = SHM_SAMPLE_UNREMOVED + 1, /* the lock is held by another: nothing done */
    SAMPLE_OWNER_DIED,                      /* we hold the lock, its previous owner died */
};

typedef struct {
    PyObject_HEAD
    shm_sample_table t;
    Py_buffer times_sampled, key, priority, gen, state, owner, free, ctrl;
    Py_buffer data[MAX_FIELDS];
    int nfields;
    int64_t row_bytes[MAX_FIELDS];
    int held; /* buffers filled so far (dealloc releases them) */
    int ndata;
    /* configure(): what sample() needs besides the per-slot arrays. */
    int configured;
    Py_buffer mutex_view, params_view, chan_view;
    PyObject *sampler_cap, *remover_cap; /* capsules of shm_selector (bind_selector.h) */
    const shm_selector *sampler, *remover;
    pthread_mutex_t *mutex;
    shm_limiter lim;
    shm_sample_waiters waiters;
    /* set_rng(): the table's numpy BitGenerator, its lock's acquire and release. */
    PyObject *bitgen, *rng_acquire, *rng_release;
    shm_uniforms rng;
    /* Scratch of sample(), cap entries each; last_* describe the last selection. */
    int64_t cap;
    double *u, *drawn_prob;
    int64_t *drawn, *kept, *gen_snap, *exhausted;
    uint8_t *intact;
    int64_t last_taken, last_exhausted;
    int in_use; /* a sample() runs (another thread of ours, the GIL released for its copy) */
} SampleCore;

static void core_dealloc(SampleCore *self) {
    Py_buffer *fixed[] = {&self->times_sampled, &self->key, &self->priority,
                          &self->gen, &self->state, &self->owner, &self->free, &self->ctrl};
    for (int i = 0; i < self->held && i < 8; i++)
        PyBuffer_Release(fixed[i]);
    for (int i = 0; i < self->ndata; i++)
        PyBuffer_Release(&self->data[i]);
    if (self->configured) {
        PyBuffer_Release(&self->mutex_view);
        PyBuffer_Release(&self->params_view);
        PyBuffer_Release(&self->chan_view);
    }
    Py_XDECREF(self->sampler_cap);
    Py_XDECREF(self->remover_cap);
    Py_XDECREF(self->bitgen);
    Py_XDECREF(self->rng_acquire);
    Py_XDECREF(self->rng_release);
    free(self->u);
    free(self->drawn_prob);
    free(self->drawn);
    free(self->kept);
    free(self->gen_snap);
    free(self->exhausted);
    free(self->intact);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int set_error(int rc, const char *what) {
    PyObject *corrupt;
    switch (rc) {
    case SHM_SAMPLE_ECORRUPT:
        /* The selectors' corrupt-structure error: the table rebuilds them from the per-slot
         * metadata (TableCore.repair). */
        corrupt = shm_corrupt_structure();
        if (corrupt != NULL)
            PyErr_Format(corrupt, "corrupt: %s: a slot index outside the table", what);
        break;
    case SHM_SAMPLE_ENOMEM:
        PyErr_NoMemory();
        break;
    default:
        PyErr_Format(PyExc_ValueError, "%s: a position outside the output", what);
    }
    return -1;
}

/* SampleCore(times_sampled, key, priority, gen, state, owner, free, ctrl, samples,
 *            total_sampled, unique_sampled, size, deletes, free_tail, max_times_sampled, data):
 * counters are indices into ctrl's int64 items. */
static int core_init(SampleCore *self, PyObject *args, PyObject *kwds) {
    PyObject *ts, *key, *prio, *gen, *state, *owner, *free, *ctrl, *data;
    Py_ssize_t i_samples, i_total, i_unique, i_size, i_deletes, i_free_tail;
    long long mts;
    static char *kwlist[] = {"times_sampled", "key", "priority", "gen", "state", "owner",
                             "free", "ctrl", "samples", "total_sampled", "unique_sampled",
                             "size", "deletes", "free_tail", "max_times_sampled", "data", NULL};
    if (self->held || self->ndata) {
        PyErr_SetString(PyExc_TypeError, "SampleCore is initialized once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOOnnnnnnLO", kwlist, &ts, &key, &prio,
                                     &gen, &state, &owner, &free, &ctrl, &i_samples, &i_total,
                                     &i_unique, &i_size, &i_deletes, &i_free_tail, &mts, &data))
        return -1;
    struct {
        PyObject *obj;
        Py_buffer *view;
        Py_ssize_t itemsize;
        const char *what;
    } want[] = {{ts, &self->times_sampled, 4, "times_sampled"},
                {key, &self->key, 8, "key"},
                {prio, &self->priority, 8, "priority"},
                {gen, &self->gen, 8, "gen"},
                {state, &self->state, 1, "state"},
                {owner, &self->owner, 4, "owner"},
                {free, &self->free, 8, "free"},
                {ctrl, &self->ctrl, 8, "ctrl"}};
    for (int i = 0; i < 8; i++) {
        if (shm_get_buffer(want[i].obj, want[i].view, want[i].itemsize, 1, want[i].what) < 0)
            return -1;
        self->held++;
    }
    Py_ssize_t n = shm_buffer_len(&self->key);
    if (shm_buffer_len(&self->times_sampled) != n || shm_buffer_len(&self->priority) != n ||
        shm_buffer_len(&self->gen) != n || shm_buffer_len(&self->state) != n ||
        shm_buffer_len(&self->owner) != n || shm_buffer_len(&self->free) != n) {
        PyErr_SetString(PyExc_ValueError, "the per-slot arrays differ in length");
        return -1;
    }
    Py_ssize_t nctrl = shm_buffer_len(&self->ctrl);
    Py_ssize_t counters[] = {i_samples, i_total, i_unique, i_size, i_deletes, i_free_tail};
    for (int i = 0; i < 6; i++) {
        if (counters[i] < 0 || counters[i] >= nctrl) {
            PyErr_SetString(PyExc_ValueError, "a counter index outside ctrl");
            return -1;
        }
    }
    PyObject *seq = PySequence_Fast(data, "data must be a sequence of arrays");
    if (seq == NULL)
        return -1;
    Py_ssize_t nf = PySequence_Fast_GET_SIZE(seq);
    if (nf > MAX_FIELDS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "at most %d fields", MAX_FIELDS);
        return -1;
    }
    for (Py_ssize_t f = 0; f < nf; f++) {
        Py_buffer *v = &self->data[f];
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, f), v, PyBUF_C_CONTIGUOUS) < 0) {
            Py_DECREF(seq);
            return -1;
        }
        self->ndata++;
        if (n == 0 || v->len % n != 0) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "a data array is not num_slots rows");
            return -1;
        }
        self->row_bytes[f] = v->len / n;
    }
    Py_DECREF(seq);
    self->nfields = (int)nf;
    int64_t *c = self->ctrl.buf;
    self->t = (shm_sample_table){
        .times_sampled = self->times_sampled.buf,
        .key = self->key.buf,
        .priority = self->priority.buf,
        .gen = self->gen.buf,
        .state = self->state.buf,
        .samples = c + i_samples,
        .total_sampled = c + i_total,
        .unique_sampled = c + i_unique,
        .size = c + i_size,
        .deletes = c + i_deletes,
        .owner = self->owner.buf,
        .free = self->free.buf,
        .free_tail = c + i_free_tail,
        .num_slots = n,
        .max_times_sampled = mts,
    };
    return 0;
}

/* Borrow nargs buffers of the given item sizes (writable); releases what it took on error. */
static int borrow(PyObject *const *args, Py_buffer *views, const Py_ssize_t *itemsize,
                  const int *writable, const char *const *what, int n) {
    for (int i = 0; i < n; i++) {
        if (shm_get_buffer(args[i], &views[i], itemsize[i], writable[i], what[i]) < 0) {
            for (int j = 0; j < i; j++)
                PyBuffer_Release(&views[j]);
            return -1;
        }
    }
    return 0;
}

static void release(Py_buffer *views, int n) {
    for (int i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
}

/* select(slots, probability, slots_out, probability_out, key, priority, times_sampled, gen,
 *        table_size, exhausted, size, count_samples) -> (taken, n_exhausted) */
static PyObject *core_select(SampleCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "select takes 12 arguments");
        return NULL;
    }
    static const Py_ssize_t isz[] = {8, 8, 8, 8, 8, 8, 4, 8, 8, 8};
    static const int wr[] = {0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
    static const char *const what[] = {"slots", "probability", "slots_out", "probability_out",
                                       "key", "priority", "times_sampled", "gen",
                                       "table_size", "exhausted"};
    long long size = PyLong_AsLongLong(args[10]);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    int count = PyObject_IsTrue(args[11]);
    if (count < 0)
        return NULL;
    Py_buffer v[10];
    if (borrow(args, v, isz, wr, what, 10) < 0)
        return NULL;
    Py_ssize_t k = shm_buffer_len(&v[0]);
    for (int i = 1; i < 10; i++) {
        if (shm_buffer_len(&v[i]) < k) {
            release(v, 10);
            return PyErr_Format(PyExc_ValueError, "%s is shorter than slots", what[i]);
        }
    }
    shm_selection sel = {v[2].buf, v[3].buf, v[4].buf, v[5].buf,
                         v[6].buf, v[7].buf, v[8].buf, v[9].buf};
    int64_t taken, nex;
    int rc = shm_sample_select(&self->t, size, count, v[0].buf, v[1].buf, k, &sel, &taken, &nex);
    release(v, 10);
    if (rc != SHM_SAMPLE_OK) {
        set_error(rc, "sample selection");
        return NULL;
    }
    return Py_BuildValue("(LL)", (long long)taken, (long long)nex);
}

/* gather(slots, gen_snapshot, outs, positions, intact) -> n_intact: outs holds one array per
 * field, in the data order given at construction; positions None: rows 0..k-1. */
static PyObject *core_gather(SampleCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "gather takes 5 arguments");
        return NULL;
    }
    PyObject *outs = args[2];
    if (!PyTuple_Check(outs) || PyTuple_GET_SIZE(outs) != self->nfields) {
        PyErr_Format(PyExc_TypeError, "outs must be a tuple of %d arrays", self->nfields);
        return NULL;
    }
    Py_buffer slots, snap, pos, intact;
    Py_buffer out[MAX_FIELDS];
    shm_sample_field fields[MAX_FIELDS];
    int have_pos = args[3] != Py_None, nout = 0;
    PyObject *result = NULL;
    if (shm_get_buffer(args[0], &slots, 8, 0, "slots") < 0)
        return NULL;
    if (shm_get_buffer(args[1], &snap, 8, 0, "gen_snapshot") < 0)
        goto free_slots;
    if (have_pos && shm_get_buffer(args[3], &pos, 8, 0, "positions") < 0)
        goto free_snap;
    if (shm_get_buffer(args[4], &intact, 1, 1, "intact") < 0)
        goto free_pos;
    Py_ssize_t k = shm_buffer_len(&slots);
    if (shm_buffer_len(&snap) < k || shm_buffer_len(&intact) < k ||
        (have_pos && shm_buffer_len(&pos) < k)) {
        PyErr_SetString(PyExc_ValueError, "gen_snapshot, positions and intact need len(slots)");
        goto free_out;
    }
    for (; nout < self->nfields; nout++) {
        Py_buffer *o = &out[nout];
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(outs, nout), o,
                               PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
            goto free_out;
        int64_t rb = self->row_bytes[nout];
        fields[nout] = (shm_sample_field){self->data[nout].buf, o->buf, rb,
                                          rb ? o->len / rb : INT64_MAX};
    }
    int64_t good, bytes = 0;
    int rc;
    for (int f = 0; f < self->nfields; f++)
        bytes += self->row_bytes[f] * k;
    if (bytes >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS;
        rc = shm_sample_gather(fields, self->nfields, self->t.gen, self->t.num_slots, slots.buf,
                               have_pos ? pos.buf : NULL, k, snap.buf, intact.buf, &good);
        Py_END_ALLOW_THREADS;
    } else {
        rc = shm_sample_gather(fields, self->nfields, self->t.gen, self->t.num_slots, slots.buf,
                               have_pos ? pos.buf : NULL, k, snap.buf, intact.buf, &good);
    }
    if (rc != SHM_SAMPLE_OK)
        set_error(rc, "sample copy");
    else
        result = PyLong_FromLongLong(good);
free_out:
    release(out, nout);
    PyBuffer_Release(&intact);
free_pos:
    if (have_pos)
        PyBuffer_Release(&pos);
free_snap:
    PyBuffer_Release(&snap);
free_slots:
    PyBuffer_Release(&slots);
    return result;
}

/* update(keys, priorities, slots_out, priorities_out) -> (n_present, n_missing) */
static PyObject *core_update(SampleCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "update takes 4 arguments");
        return NULL;
    }
    static const Py_ssize_t isz[] = {8, 8, 8, 8};
    static const int wr[] = {0, 0, 1, 1};
    static const char *const what[] = {"keys", "priorities", "slots_out", "priorities_out"};
    Py_buffer v[4];
    if (borrow(args, v, isz, wr, what, 4) < 0)
        return NULL;
    Py_ssize_t n = shm_buffer_len(&v[0]);
    if (shm_buffer_len(&v[1]) != n || shm_buffer_len(&v[2]) < n || shm_buffer_len(&v[3]) < n) {
        release(v, 4);
        PyErr_SetString(PyExc_ValueError, "update needs len(keys) of each array");
        return NULL;
    }
    int64_t found, missing;
    int rc = shm_sample_update(&self->t, v[0].buf, v[1].buf, n, v[2].buf, v[3].buf, &found,
                               &missing);
    release(v, 4);
    if (rc != SHM_SAMPLE_OK) {
        set_error(rc, "update_priorities");
        return NULL;
    }
    return Py_BuildValue("(LL)", (long long)found, (long long)missing);
}

/* present(keys, slots_out) -> n: the distinct slots of the present keys, ascending. */
static PyObject *core_present(SampleCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "present takes 2 arguments");
        return NULL;
    }
    static const Py_ssize_t isz[] = {8, 8};
    static const int wr[] = {0, 1};
    static const char *const what[] = {"keys", "slots_out"};
    Py_buffer v[2];
    if (borrow(args, v, isz, wr, what, 2) < 0)
        return NULL;
    Py_ssize_t n = shm_buffer_len(&v[0]);
    if (shm_buffer_len(&v[1]) < n) {
        release(v, 2);
        PyErr_SetString(PyExc_ValueError, "slots_out needs len(keys) entries");
        return NULL;
    }
    int64_t found;
    shm_sample_present(&self->t, v[0].buf, n, v[1].buf, &found);
    release(v, 2);
    return PyLong_FromLongLong(found);
}

/* removed(slots, releasing_owner) -> None: the bookkeeping of removed items (-1: FREE). */
static PyObject *core_removed(SampleCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "removed takes 2 arguments");
        return NULL;
    }
    long owner = PyLong_AsLong(args[1]);
    if (owner == -1 && PyErr_Occurred())
        return NULL;
    if (owner < -1 || owner > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "releasing_owner must be a channel or -1");
        return NULL;
    }
    Py_buffer v;
    if (shm_get_buffer(args[0], &v, 8, 0, "slots") < 0)
        return NULL;
    int rc = shm_sample_removed(&self->t, v.buf, shm_buffer_len(&v), (int32_t)owner);
    PyBuffer_Release(&v);
    if (rc != SHM_SAMPLE_OK) {
        set_error(rc, "removal");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* release(slots, channel) -> freed: the sampler's RELEASING slots become FREE, on the ring. */
static PyObject *core_release(SampleCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "release takes 2 arguments");
        return NULL;
    }
    long channel = PyLong_AsLong(args[1]);
    if (channel == -1 && PyErr_Occurred())
        return NULL;
    if (channel < 0 || channel > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "channel must be >= 0");
        return NULL;
    }
    Py_buffer v;
    if (shm_get_buffer(args[0], &v, 8, 0, "slots") < 0)
        return NULL;
    int64_t freed;
    int rc = shm_sample_release(&self->t, v.buf, shm_buffer_len(&v), (int32_t)channel, &freed);
    PyBuffer_Release(&v);
    if (rc != SHM_SAMPLE_OK) {
        set_error(rc, "release");
        return NULL;
    }
    return PyLong_FromLongLong(freed);
}

/* ---- the whole sample in one call ------------------------------------------------------------ */

/* configure(sampler, remover, mutex, params, chan) -> None: sampler and remover are the
 * selectors' capsules (Selector._c_selector), mutex the table's robust mutex (uint8 bytes),
 * params its float64 parameter lines (SHM_PARAM_* lines of SHM_LINE words), chan its channels'
 * control lines (int64). */
static PyObject *core_configure(SampleCore *self, PyObject *const *args, Py_ssize_t nargs) {
    SHM_CHECK_NARGS("configure", 5);
    if (self->configured || self->held < 8) {
        PyErr_SetString(PyExc_RuntimeError, "configure: once, after construction");
        return NULL;
    }
    shm_selector *sel[2];
    for (int i = 0; i < 2; i++) {
        sel[i] = PyCapsule_GetPointer(args[i], SHM_SELECTOR_CAPSULE);
        if (sel[i] == NULL)
            return NULL;
    }
    if (shm_get_buffer(args[2], &self->mutex_view, 1, 1, "mutex") < 0)
        return NULL;
    if (shm_get_array(args[3], &self->params_view, 'd', 0, "params") < 0) {
        PyBuffer_Release(&self->mutex_view);
        return NULL;
    }
    if (shm_get_array(args[4], &self->chan_view, 'i', 1, "chan") < 0) {
        PyBuffer_Release(&self->mutex_view);
        PyBuffer_Release(&self->params_view);
        return NULL;
    }
    const char *bad = NULL;
    Py_ssize_t np = shm_buffer_len(&self->params_view);
    Py_ssize_t chan_words = shm_buffer_len(&self->chan_view);
    if (np < SHM_PARAM_COUNT * SHM_LINE)
        bad = "params: fewer than SHM_PARAM_COUNT lines";
    if (self->mutex_view.len < (Py_ssize_t)sizeof(pthread_mutex_t) ||
        (uintptr_t)self->mutex_view.buf % _Alignof(pthread_mutex_t) != 0)
        bad = "mutex: too short or misaligned for a pthread mutex";
    if (chan_words % (SHM_CHAN_COUNT * SHM_LINE) != 0)
        bad = "chan: not whole channels";
    if (shm_buffer_len(&self->ctrl) < SHM_CTRL_COUNT * SHM_LINE)
        bad = "ctrl: fewer lines than the layout's";
    if (bad != NULL) {
        PyBuffer_Release(&self->mutex_view);
        PyBuffer_Release(&self->params_view);
        PyBuffer_Release(&self->chan_view);
        PyErr_SetString(PyExc_ValueError, bad);
        return NULL;
    }
    self->configured = 1;
    Py_INCREF(args[0]);
    Py_INCREF(args[1]);
    self->sampler_cap = args[0];
    self->remover_cap = args[1];
    self->sampler = sel[0];
    self->remover = sel[1];
    self->mutex = self->mutex_view.buf;
    const double *p = self->params_view.buf;
    int64_t *c = self->ctrl.buf;
    self->lim = (shm_limiter){p, SHM_LINE, c, SHM_LINE};
    self->waiters = (shm_sample_waiters){
        .chan = self->chan_view.buf,
        .max_clients = chan_words / (SHM_CHAN_COUNT * SHM_LINE),
        .sampler_waiting = c + SHM_CTRL_SAMPLER_WAITING * SHM_LINE,
    };
    Py_RETURN_NONE;
}

/* set_rng(bit_generator) -> None: draws take their uniforms from this numpy BitGenerator (its
 * capsule's next_double, under its lock), the very numbers Generator.random would return. */
static PyObject *core_set_rng(SampleCore *self, PyObject *bitgen) {
    PyObject *cap = PyObject_GetAttrString(bitgen, "capsule");
    if (cap == NULL)
        return NULL;
    numpy_bitgen *bg = PyCapsule_GetPointer(cap, "BitGenerator");
    Py_DECREF(cap);
    if (bg == NULL)
        return NULL;
    PyObject *lock = PyObject_GetAttrString(bitgen, "lock");
    if (lock == NULL)
        return NULL;
    PyObject *acquire = PyObject_GetAttrString(lock, "acquire");
    PyObject *release = PyObject_GetAttrString(lock, "release");
    Py_DECREF(lock);
    if (acquire == NULL || release == NULL) {
        Py_XDECREF(acquire);
        Py_XDECREF(release);
        return NULL;
    }
    Py_INCREF(bitgen); /* keeps bg alive: the capsule points into the BitGenerator */
    Py_XSETREF(self->bitgen, bitgen);
    Py_XSETREF(self->rng_acquire, acquire);
    Py_XSETREF(self->rng_release, release);
    self->rng = (shm_uniforms){bg->state, bg->next_double};
    Py_RETURN_NONE;
}

/* Scratch for batches of n: grown (never shrunk) to the largest n seen. */
static int reserve_scratch(SampleCore *self, int64_t n) {
    if (n <= self->cap)
        return 0;
    void **bufs[] = {(void **)&self->u, (void **)&self->drawn_prob, (void **)&self->drawn,
                     (void **)&self->kept, (void **)&self->gen_snap, (void **)&self->exhausted};
    for (int i = 0; i < 6; i++) {
        void *p = realloc(*bufs[i], (size_t)n * 8);
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        *bufs[i] = p;
    }
    void *p = realloc(self->intact, (size_t)n);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->intact = p;
    self->cap = n;
    return 0;
}

/* The table lock: 0 held, SAMPLE_BUSY, or SAMPLE_OWNER_DIED (held). */
static int take_lock(pthread_mutex_t *m) {
    int rc = pthread_mutex_trylock(m);
    for (int i = 0; rc == EBUSY && i < SPIN_TRIES + YIELD_TRIES; i++) {
        if (i >= SPIN_TRIES)
            sched_yield();
        rc = pthread_mutex_trylock(m);
    }
    if (rc == 0)
        return 0;
    if (rc == EOWNERDEAD)
        return SAMPLE_OWNER_DIED;
    return SAMPLE_BUSY; /* EBUSY, or an error RobustMutex.acquire reports */
}

/* take_lock, the GIL released while it spins and yields (a holder keeps the lock for
 * microseconds, but the yields may hand the CPU away for longer): the process's other threads
 * run meanwhile. One trylock first, with the GIL: the common case costs no release. */
static int take_lock_nogil(pthread_mutex_t *m) {
    int rc = pthread_mutex_trylock(m);
    if (rc == 0)
        return 0;
    if (rc == EOWNERDEAD)
        return SAMPLE_OWNER_DIED;
    Py_BEGIN_ALLOW_THREADS;
    rc = take_lock(m);
    Py_END_ALLOW_THREADS;
    return rc;
}

#define SAMPLE_OUTPUTS 5

/* sample(n, channel, outs, key, probability, priority, times_sampled, table_size, locked)
 *   -> (status, taken, n_exhausted, n_intact, wake_writers, freed) */
static PyObject *core_sample(SampleCore *self, PyObject *const *args, Py_ssize_t nargs) {
    SHM_CHECK_NARGS("sample", 9);
    if (!self->configured || self->rng.next_double == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "sample: configure() and set_rng() first");
        return NULL;
    }
    long long n = PyLong_AsLongLong(args[0]), channel = PyLong_AsLongLong(args[1]);
    int locked = PyObject_IsTrue(args[8]);
    if (PyErr_Occurred() || locked < 0)
        return NULL;
    if (n <= 0 || channel < 0 || channel >= self->waiters.max_clients) {
        PyErr_SetString(PyExc_ValueError, "sample: n must be > 0 and channel a table's channel");
        return NULL;
    }
    PyObject *outs = args[2];
    if (!PyTuple_Check(outs) || PyTuple_GET_SIZE(outs) != self->nfields) {
        PyErr_Format(PyExc_TypeError, "outs must be a tuple of %d arrays", self->nfields);
        return NULL;
    }
    if (self->in_use) /* another thread's call: the Python path allocates its own */
        return Py_BuildValue("(iiiiii)", SHM_SAMPLE_SLOW, 0, 0, 0, 0, 0);
    static const Py_ssize_t isz[SAMPLE_OUTPUTS] = {8, 8, 8, 4, 8};
    static const int wr[SAMPLE_OUTPUTS] = {1, 1, 1, 1, 1};
    static const char *const what[SAMPLE_OUTPUTS] = {"key", "probability", "priority",
                                                     "times_sampled", "table_size"};
    Py_buffer v[SAMPLE_OUTPUTS], out[MAX_FIELDS];
    shm_sample_field fields[MAX_FIELDS];
    int nout = 0;
    PyObject *result = NULL;
    if (reserve_scratch(self, n) < 0 || borrow(args + 3, v, isz, wr, what, SAMPLE_OUTPUTS) < 0)
        return NULL;
    for (int i = 0; i < SAMPLE_OUTPUTS; i++) {
        if (shm_buffer_len(&v[i]) < n) {
            PyErr_Format(PyExc_ValueError, "%s needs n entries", what[i]);
            goto done;
        }
    }
    int64_t bytes = 0;
    for (; nout < self->nfields; nout++) {
        Py_buffer *o = &out[nout];
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(outs, nout), o,
                               PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
            goto done;
        int64_t rb = self->row_bytes[nout];
        if (rb != 0 && o->len / rb < n) {
            PyBuffer_Release(o);
            PyErr_SetString(PyExc_ValueError, "an output array has fewer than n rows");
            goto done;
        }
        fields[nout] = (shm_sample_field){self->data[nout].buf, o->buf, rb, n};
        bytes += rb * n;
    }
    /* The BitGenerator's lock, as Generator.random takes it: another thread of ours may draw
     * from it. Busy (rare): the Python path. */
    PyObject *got = PyObject_CallOneArg(self->rng_acquire, Py_False);
    if (got == NULL)
        goto done;
    int have_rng = PyObject_IsTrue(got);
    Py_DECREF(got);
    if (have_rng <= 0) {
        if (have_rng == 0)
            result = Py_BuildValue("(iiiiii)", SHM_SAMPLE_SLOW, 0, 0, 0, 0, 0);
        goto done;
    }
    /* From here the scratch is ours, also while the GIL is released (lock wait, copy). */
    self->in_use = 1;
    int status = locked ? 0 : take_lock_nogil(self->mutex);
    int64_t taken = 0, nex = 0, good = 0, freed = 0;
    int wake = 0;
    if (status == 0) {
        shm_sample_scratch sc = {self->u, self->drawn, self->drawn_prob};
        shm_selection sel = {self->kept, v[1].buf, v[0].buf, v[2].buf,
                             v[3].buf, self->gen_snap, v[4].buf, self->exhausted};
        status = shm_sample_locked(&self->t, &self->lim, &self->waiters, self->sampler,
                                   self->remover, &self->rng, n, channel, &sc, &sel, &taken,
                                   &nex);
        if (status != SHM_SAMPLE_UNREMOVED)
            pthread_mutex_unlock(self->mutex);
    }
    PyObject *r = PyObject_CallNoArgs(self->rng_release);
    if (r == NULL) {
        /* Cannot happen (we hold it); the table lock is already released unless UNREMOVED. */
        if (status == SHM_SAMPLE_UNREMOVED)
            pthread_mutex_unlock(self->mutex);
        self->in_use = 0;
        goto done;
    }
    Py_DECREF(r);
    self->last_taken = taken;
    self->last_exhausted = nex;
    if (status == SHM_SAMPLED) {
        wake = shm_sample_wakes_writers(&self->lim, &self->waiters);
        /* The copy, outside the lock; its seqlock check says which rows are intact. */
        int rc;
        if (bytes >= GIL_RELEASE_BYTES) {
            Py_BEGIN_ALLOW_THREADS;
            rc = shm_sample_gather(fields, self->nfields, self->t.gen, self->t.num_slots,
                                   self->kept, NULL, taken, self->gen_snap, self->intact, &good);
            Py_END_ALLOW_THREADS;
        } else {
            rc = shm_sample_gather(fields, self->nfields, self->t.gen, self->t.num_slots,
                                   self->kept, NULL, taken, self->gen_snap, self->intact, &good);
        }
        /* The items this draw exhausted are copied: back to the free ring (the lock again,
         * briefly). A busy lock, or one whose owner died, leaves it to the caller. */
        if (nex > 0 && rc == SHM_SAMPLE_OK) {
            int lr = take_lock_nogil(self->mutex);
            if (lr == 0) {
                if (shm_sample_release(&self->t, self->exhausted, nex, (int32_t)channel,
                                       &freed) != SHM_SAMPLE_OK)
                    freed = RELEASE_PENDING; /* a corrupt free ring: the caller repairs it */
                pthread_mutex_unlock(self->mutex);
            } else {
                freed = lr == SAMPLE_OWNER_DIED ? RELEASE_OWNER_DIED : RELEASE_PENDING;
            }
        }
        /* A selection the caller completes stays ours until it called last_selection(). */
        self->in_use = !(taken == n && good == n && freed >= 0);
        if (rc != SHM_SAMPLE_OK) { /* cannot happen: the bookkeeping checked every slot */
            self->in_use = 0;
            set_error(rc, "sample copy");
            goto done;
        }
    } else {
        self->in_use = status == SHM_SAMPLE_UNREMOVED; /* then until last_selection() */
    }
    result = Py_BuildValue("(iLLLiL)", status, (long long)taken, (long long)nex,
                           (long long)good, wake, (long long)freed);
done:
    release(out, nout);
    release(v, SAMPLE_OUTPUTS);
    return result;
}

/* allowance(n) -> int: shm_sample_allowance over the table's counters and parameters (as
 * sample() computes it; -1: the Python path decides). For the differential tests. */
static PyObject *core_allowance(SampleCore *self, PyObject *arg) {
    if (!self->configured) {
        PyErr_SetString(PyExc_RuntimeError, "allowance: configure() first");
        return NULL;
    }
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromLongLong(shm_sample_allowance(&self->lim, n));
}

/* last_selection(slots, gen, exhausted, intact) -> None: the last sample()'s kept draws, their
 * generations, the items it exhausted and which rows its copy found intact (for the Python
 * path that completes a short or torn batch). A sample() that returns anything but a whole
 * intact batch with nothing exhausted keeps its scratch (other threads' calls take the Python
 * path) until this is called. */
static PyObject *core_last_selection(SampleCore *self, PyObject *const *args, Py_ssize_t nargs) {
    SHM_CHECK_NARGS("last_selection", 4);
    static const Py_ssize_t isz[] = {8, 8, 8, 1};
    static const int wr[] = {1, 1, 1, 1};
    static const char *const what[] = {"slots", "gen", "exhausted", "intact"};
    Py_buffer v[4];
    if (borrow(args, v, isz, wr, what, 4) < 0)
        return NULL;
    int64_t k = self->last_taken, e = self->last_exhausted;
    if (shm_buffer_len(&v[0]) < k || shm_buffer_len(&v[1]) < k || shm_buffer_len(&v[2]) < e ||
        shm_buffer_len(&v[3]) < k) {
        release(v, 4);
        PyErr_SetString(PyExc_ValueError, "last_selection: arrays shorter than the selection");
        return NULL;
    }
    if (k > 0) {
        memcpy(v[0].buf, self->kept, (size_t)k * 8);
        memcpy(v[1].buf, self->gen_snap, (size_t)k * 8);
        memcpy(v[3].buf, self->intact, (size_t)k);
    }
    if (e > 0)
        memcpy(v[2].buf, self->exhausted, (size_t)e * 8);
    self->in_use = 0; /* the scratch is free for the next sample() */
    release(v, 4);
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))core_configure, METH_FASTCALL,
     "configure(sampler, remover, mutex, params, chan, spi, min_size_to_sample, min_diff, "
     "max_diff) -> None: what sample() needs: the selectors' capsules, the table's mutex, "
     "the limiter's parameter words (indices into params), the channels' control lines."},
    {"set_rng", (PyCFunction)core_set_rng, METH_O,
     "set_rng(bit_generator) -> None: the numpy BitGenerator sample() draws from."},
    {"sample", (PyCFunction)(void (*)(void))core_sample, METH_FASTCALL,
     "sample(n, channel, outs, key, probability, priority, times_sampled, table_size, locked) "
     "-> (status, taken, n_exhausted, n_intact, wake_writers, freed): take the table lock "
     "(unless locked: the caller holds it), check the limiter, draw n, book them, remove "
     "exhausted items, unlock, copy the kept rows to outs[..][:taken] and check their "
     "generations, then release the exhausted items (freed: how many went back to the free "
     "ring; RELEASE_PENDING: the lock was busy, the caller releases them; "
     "RELEASE_OWNER_DIED: the lock is held, inherited from a dead owner). "
     "status: SAMPLED (the info arrays' first taken entries filled), BLOCKED (wait flags set), "
     "SLOW (nothing done: use the Python path), UNREMOVED (booked; the lock is still held and "
     "the exhausted items are still in the selectors), BUSY (the lock is held elsewhere: "
     "nothing done), OWNER_DIED (the lock is held, inherited from a dead owner: nothing "
     "done)."},
    {"allowance", (PyCFunction)core_allowance, METH_O,
     "allowance(n) -> int: how many of n samples the limiter allows now (-1: not a number "
     "Python would compute; the Python path decides)."},
    {"last_selection", (PyCFunction)(void (*)(void))core_last_selection, METH_FASTCALL,
     "last_selection(slots, gen, exhausted, intact) -> None: the last sample()'s selection."},
    {"release", (PyCFunction)(void (*)(void))core_release, METH_FASTCALL,
     "release(slots, channel) -> freed: slots still RELEASING for channel become FREE and go "
     "on the free ring (mutex held)."},
    {"removed", (PyCFunction)(void (*)(void))core_removed, METH_FASTCALL,
     "removed(slots, releasing_owner) -> None: state and counters of removed items (mutex "
     "held; -1: the slots become FREE, else RELEASING for that channel)."},
    {"select", (PyCFunction)(void (*)(void))core_select, METH_FASTCALL,
     "select(slots, probability, slots_out, probability_out, key, priority, times_sampled, gen, "
     "table_size, exhausted, size, count_samples) -> (taken, n_exhausted): a draw's "
     "bookkeeping (mutex held)."},
    {"gather", (PyCFunction)(void (*)(void))core_gather, METH_FASTCALL,
     "gather(slots, gen_snapshot, outs, positions, intact) -> n_intact: copy rows, then the "
     "seqlock check."},
    {"update", (PyCFunction)(void (*)(void))core_update, METH_FASTCALL,
     "update(keys, priorities, slots_out, priorities_out) -> (n_present, n_missing) (mutex "
     "held)."},
    {"present", (PyCFunction)(void (*)(void))core_present, METH_FASTCALL,
     "present(keys, slots_out) -> n: distinct slots of present keys, ascending (mutex held)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SampleCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.SampleCore",
    .tp_basicsize = sizeof(SampleCore),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SampleCore(times_sampled, key, priority, gen, state, owner, free, ctrl, "
              "samples, total_sampled, unique_sampled, size, deletes, free_tail, "
              "max_times_sampled, data): a table's sample path over its shared arrays.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
};

int shm_bind_sample(PyObject *module) {
    if (PyType_Ready(&SampleCoreType) < 0)
        return -1;
    static const struct {
        const char *name;
        int value;
    } statuses[] = {{"SAMPLED", SHM_SAMPLED},
                    {"BLOCKED", SHM_SAMPLE_BLOCKED},
                    {"SLOW", SHM_SAMPLE_SLOW},
                    {"UNREMOVED", SHM_SAMPLE_UNREMOVED},
                    {"BUSY", SAMPLE_BUSY},
                    {"OWNER_DIED", SAMPLE_OWNER_DIED},
                    {"RELEASE_PENDING", RELEASE_PENDING},
                    {"RELEASE_OWNER_DIED", RELEASE_OWNER_DIED}};
    for (size_t i = 0; i < sizeof statuses / sizeof statuses[0]; i++) {
        PyObject *v = PyLong_FromLong(statuses[i].value);
        if (v == NULL || PyDict_SetItemString(SampleCoreType.tp_dict, statuses[i].name, v) < 0) {
            Py_XDECREF(v);
            return -1;
        }
        Py_DECREF(v);
    }
    PyType_Modified(&SampleCoreType);
    Py_INCREF(&SampleCoreType);
    if (PyModule_AddObject(module, "SampleCore", (PyObject *)&SampleCoreType) < 0) {
        Py_DECREF(&SampleCoreType);
        return -1;
    }
    return 0;
}
