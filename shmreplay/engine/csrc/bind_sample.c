/* Bindings of the sample concern: SampleCore, built once per table over its shared arrays,
 * whose methods run the sample path's bookkeeping, row copies and mutations (sample.c). */
#include "shm_bind.h"

#include "sample.h"
#include "shm_buffers.h"

#define MAX_FIELDS 64
/* Copies of at least this many bytes (tens of µs) run with the GIL released, so that the
 * process's other threads (a training loop beside a prefetching sampler) run meanwhile; a
 * smaller one keeps it: taking it back may wait for another thread's switch interval (5 ms),
 * far longer than the copy. */
#define GIL_RELEASE_BYTES (256 * 1024)

typedef struct {
    PyObject_HEAD
    shm_sample_table t;
    Py_buffer times_sampled, key, priority, gen, state, owner, free, ctrl;
    Py_buffer data[MAX_FIELDS];
    int nfields;
    int64_t row_bytes[MAX_FIELDS];
    int held; /* buffers filled so far (dealloc releases them) */
    int ndata;
} SampleCore;

static void core_dealloc(SampleCore *self) {
    Py_buffer *fixed[] = {&self->times_sampled, &self->key, &self->priority,
                          &self->gen, &self->state, &self->owner, &self->free, &self->ctrl};
    for (int i = 0; i < self->held && i < 8; i++)
        PyBuffer_Release(fixed[i]);
    for (int i = 0; i < self->ndata; i++)
        PyBuffer_Release(&self->data[i]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int set_error(int rc, const char *what) {
    switch (rc) {
    case SHM_SAMPLE_ECORRUPT:
        PyErr_Format(PyExc_ValueError, "corrupt: %s: a slot index outside the table", what);
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
        .priority_w = self->priority.buf,
        .samples = c + i_samples,
        .total_sampled = c + i_total,
        .unique_sampled = c + i_unique,
        .size = c + i_size,
        .deletes = c + i_deletes,
        .state_w = self->state.buf,
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

static PyMethodDef core_methods[] = {
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
    Py_INCREF(&SampleCoreType);
    if (PyModule_AddObject(module, "SampleCore", (PyObject *)&SampleCoreType) < 0) {
        Py_DECREF(&SampleCoreType);
        return -1;
    }
    return 0;
}
