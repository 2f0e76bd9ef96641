/* Bindings of the writer concern: Writer, one per (Table handle, channel), built once.
 *
 * It holds the channel's control lines and rings, the table's metadata arrays and data columns
 * (their Py_buffers kept for its lifetime) and the local ring positions, so that an insert
 * parses only its row, priority and episode. Waiting (semaphores, deadlines, limiter messages)
 * stays in Python: a call that cannot go on returns a code instead of blocking.
 */
#include "shm_bind.h"

#include <string.h>
#include <structmember.h>
#include <unistd.h>

#include "shm_atomics.h"
#include "shm_buffers.h"
#include "writer.h"

/* insert() results besides a key (keys are unsigned: a negative int is never a key) */
#define CODE_EMPTY (-1)     /* no leased slot: Python waits (_wait_for_lease) and retries */
#define CODE_FULL (-2)      /* no room in the publish ring: Python waits for commits */
#define CODE_BAD_VALUE (-3) /* a value is not a C-contiguous buffer of the field's row size */
#define CODE_CHECK (-4)     /* insert_mapping: not the common case; Python checks it all */

#define MAX_FORMAT 16
#define MAX_DIMS 32

/* What insert_mapping() accepts without Python for one field: exactly the row Python's
 * _validate_row would pass on as it is (a numpy array of the field's dtype and shape, or the
 * field's numpy scalar type), recognised by type, buffer format and shape. */
typedef struct {
    PyObject *name;        /* the field's name (str) */
    PyObject *scalar_type; /* numpy scalar type of a 0-d field, else NULL */
    char format[MAX_FORMAT];
    int ndim;
    Py_ssize_t shape[MAX_DIMS];
} FieldCheck;

enum { B_CHAN, B_CTRL, B_LEASE, B_PUBLISH, B_GEN, B_PRIORITY, B_EPISODE, B_STEPS, B_KEY, NFIXED };

typedef struct {
    PyObject_HEAD shm_writer w;
    int wake; /* the last insert()'s wake rule: 1 = post the daemon's semaphore */
    double max_priority;
    int64_t daemon_pid;    /* the daemon this client attached to (TableCore.daemon_pid) */
    PyObject *array_type;  /* numpy.ndarray */
    FieldCheck *fields;    /* one per column */
    int nbuffers;
    Py_buffer *buffers; /* NFIXED fixed arrays, then one per data column */
    shm_writer_column *cols;
} WriterObject;

static void raise_corrupt(const char *what) {
    PyObject *mod = PyImport_ImportModule("shmreplay.errors");
    PyObject *exc = mod ? PyObject_GetAttrString(mod, "SegmentError") : NULL;
    Py_XDECREF(mod);
    if (exc == NULL)
        return;
    PyErr_Format(exc,
                 "the channel's %s in shared memory holds an impossible value (a ring position "
                 "out of range or a slot outside the table): the segment is corrupt or another "
                 "process wrote into it; attach again",
                 what);
    Py_DECREF(exc);
}

static void Writer_dealloc(WriterObject *self) {
    shm_writer_free(&self->w);
    for (int i = 0; i < self->nbuffers; i++)
        PyBuffer_Release(&self->buffers[i]);
    PyMem_Free(self->buffers);
    PyMem_Free(self->cols);
    if (self->fields != NULL) {
        for (int i = 0; i < self->w.ncols; i++) {
            Py_XDECREF(self->fields[i].name);
            Py_XDECREF(self->fields[i].scalar_type);
        }
        PyMem_Free(self->fields);
    }
    Py_XDECREF(self->array_type);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Writer(chan, ctrl, lease, publish, gen, priority, episode, episode_steps, key, columns,
 *        names, scalar_types, ndarray, max_priority, daemon_pid):
 * chan = chan.ctrl[c] (8 lines of 8 int64), ctrl = the table's ctrl (24 lines), lease and
 * publish = the channel's rings, columns = the data arrays in signature order, names and
 * scalar_types (None for shaped fields) per column for insert_mapping's checks. Ring positions
 * start from the channel's words. */
static int Writer_init(WriterObject *self, PyObject *args, PyObject *kwds) {
    static const char *names[NFIXED] = {"chan", "ctrl", "lease", "publish", "gen",
                                        "priority", "episode", "episode_steps", "key"};
    static const Py_ssize_t itemsizes[NFIXED] = {8, 8, 8, 8, 8, 8, 8, 4, 8};
    PyObject *objs[NFIXED];
    PyObject *columns, *fnames, *scalar_types, *array_type;
    double max_priority;
    long long daemon_pid;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Writer() takes positional arguments only");
        return -1;
    }
    if (self->buffers != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Writer is already initialised");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OOOOOOOOOO!O!O!O!dL:Writer", &objs[0], &objs[1], &objs[2],
                          &objs[3], &objs[4], &objs[5], &objs[6], &objs[7], &objs[8],
                          &PyList_Type, &columns, &PyList_Type, &fnames, &PyList_Type,
                          &scalar_types, &PyType_Type, &array_type, &max_priority, &daemon_pid))
        return -1;
    Py_ssize_t ncols = PyList_GET_SIZE(columns);
    if (PyList_GET_SIZE(fnames) != ncols || PyList_GET_SIZE(scalar_types) != ncols) {
        PyErr_SetString(PyExc_ValueError, "Writer: one name and scalar type per column");
        return -1;
    }
    self->fields = PyMem_Calloc(ncols > 0 ? ncols : 1, sizeof(FieldCheck));
    if (self->fields == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->w.ncols = (int)ncols; /* for dealloc's loop over fields */
    self->max_priority = max_priority;
    self->daemon_pid = daemon_pid;
    self->array_type = Py_NewRef(array_type);
    self->buffers = PyMem_Calloc(NFIXED + ncols, sizeof(Py_buffer));
    self->cols = PyMem_Calloc(ncols > 0 ? ncols : 1, sizeof(shm_writer_column));
    if (self->buffers == NULL || self->cols == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < NFIXED; i++) {
        if (shm_get_buffer(objs[i], &self->buffers[i], itemsizes[i], 1, names[i]) < 0)
            return -1;
        self->nbuffers++;
    }
    Py_buffer *b = self->buffers;
    int64_t slots = shm_buffer_len(&b[B_GEN]);
    if (shm_buffer_len(&b[B_CHAN]) != 8 * SHM_LINE ||
        shm_buffer_len(&b[B_CTRL]) != SHM_CTRL_COUNT * SHM_LINE ||
        shm_buffer_len(&b[B_LEASE]) != SHM_LEASE_CAPACITY ||
        shm_buffer_len(&b[B_PUBLISH]) != SHM_PUBLISH_CAPACITY ||
        shm_buffer_len(&b[B_PRIORITY]) != slots || shm_buffer_len(&b[B_EPISODE]) != slots ||
        shm_buffer_len(&b[B_STEPS]) != 2 * slots || shm_buffer_len(&b[B_KEY]) != slots) {
        PyErr_SetString(PyExc_ValueError, "Writer: arrays of inconsistent sizes");
        return -1;
    }
    for (Py_ssize_t i = 0; i < ncols; i++) {
        Py_buffer *v = &self->buffers[NFIXED + i];
        if (PyObject_GetBuffer(PyList_GET_ITEM(columns, i), v,
                               PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE | PyBUF_FORMAT) < 0)
            return -1;
        self->nbuffers++;
        if (slots == 0 || v->len % slots != 0 || v->ndim < 1 || v->shape[0] != slots ||
            v->ndim > MAX_DIMS || v->format == NULL || strlen(v->format) >= MAX_FORMAT) {
            PyErr_SetString(PyExc_ValueError, "Writer: a data column of another length");
            return -1;
        }
        FieldCheck *fc = &self->fields[i];
        PyObject *st = PyList_GET_ITEM(scalar_types, i);
        fc->name = Py_NewRef(PyList_GET_ITEM(fnames, i));
        fc->scalar_type = st == Py_None ? NULL : Py_NewRef(st);
        strcpy(fc->format, v->format);
        fc->ndim = v->ndim - 1;
        for (int d = 1; d < v->ndim; d++)
            fc->shape[d - 1] = v->shape[d];
        self->cols[i].base = v->buf;
        self->cols[i].rowsize = (size_t)(v->len / slots);
    }
    shm_writer *w = &self->w;
    w->chan = b[B_CHAN].buf;
    w->ctrl = b[B_CTRL].buf;
    w->lease = b[B_LEASE].buf;
    w->publish = b[B_PUBLISH].buf;
    w->gen = b[B_GEN].buf;
    w->priority = b[B_PRIORITY].buf;
    w->episode = b[B_EPISODE].buf;
    w->steps = b[B_STEPS].buf;
    w->key = b[B_KEY].buf;
    w->num_slots = slots;
    w->ncols = (int)ncols;
    w->cols = self->cols;
    /* Starting positions: our own words (LEASE_HEAD, PUB_TAIL) and the daemon's as they are;
     * the next take/room check re-reads and validates the daemon's. */
    w->lease_head = w->chan[SHM_CHAN_LEASE_HEAD * SHM_LINE];
    w->pub_tail = w->chan[SHM_CHAN_PUB_TAIL * SHM_LINE];
    /* Positions only grow from 0 by one per item: beyond 2**62 they are garbage (and would
     * overflow the ring arithmetic). */
    if (w->lease_head < 0 || w->lease_head > ((int64_t)1 << 62) || w->pub_tail < 0 ||
        w->pub_tail > ((int64_t)1 << 62)) {
        raise_corrupt("LEASE_HEAD or PUB_TAIL");
        return -1;
    }
    w->lease_tail = w->lease_head;
    /* A head a whole ring behind: the first room check re-reads PUB_HEAD (another handle on
     * this channel may have published entries the daemon has not committed yet). */
    w->pub_head = w->pub_tail - SHM_PUBLISH_CAPACITY;
    return 0;
}

/* The per-call views of a row's or a batch's columns (their buffers, then the data pointers
 * insert or the batch paths take): on the stack up to STACK_COLUMNS fields, allocated beyond
 * (no per-call allocation for the tables one meets). */
#define STACK_COLUMNS 16

typedef struct {
    Py_buffer *views;
    const void **ptrs; /* for shm_writer_insert */
    const char **srcs; /* for the batch paths */
    int got;           /* views[0..got) are held */
    Py_buffer stack_views[STACK_COLUMNS];
    const void *stack_ptrs[STACK_COLUMNS];
    const char *stack_srcs[STACK_COLUMNS];
} ColumnViews;

/* 0, or -1 with MemoryError set (nothing held). */
static int views_open(ColumnViews *cv, int ncols) {
    cv->got = 0;
    cv->views = cv->stack_views;
    cv->ptrs = cv->stack_ptrs;
    cv->srcs = cv->stack_srcs;
    if (ncols <= STACK_COLUMNS)
        return 0;
    cv->views = PyMem_Calloc((size_t)ncols, sizeof(Py_buffer));
    cv->ptrs = PyMem_Calloc((size_t)ncols, sizeof(void *));
    cv->srcs = PyMem_Calloc((size_t)ncols, sizeof(char *));
    if (cv->views == NULL || cv->ptrs == NULL || cv->srcs == NULL) {
        PyMem_Free(cv->views);
        PyMem_Free(cv->ptrs);
        PyMem_Free(cv->srcs);
        cv->views = cv->stack_views;
        cv->ptrs = cv->stack_ptrs;
        cv->srcs = cv->stack_srcs;
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void views_close(ColumnViews *cv) {
    for (int i = 0; i < cv->got; i++)
        PyBuffer_Release(&cv->views[i]);
    cv->got = 0;
    if (cv->views != cv->stack_views) {
        PyMem_Free(cv->views);
        PyMem_Free(cv->ptrs);
        PyMem_Free(cv->srcs);
    }
}

/* insert(row: list, priority: float, episode: int, first: int, last: int) -> int
 * The key, or CODE_EMPTY / CODE_FULL / CODE_BAD_VALUE with nothing taken or written. */
static PyObject *Writer_insert(WriterObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5 || !PyList_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "insert(row: list, priority, episode, first, last)");
        return NULL;
    }
    shm_writer *w = &self->w;
    PyObject *row = args[0];
    if (PyList_GET_SIZE(row) != w->ncols) {
        PyErr_SetString(PyExc_ValueError, "insert: one value per field");
        return NULL;
    }
    double priority = PyFloat_AsDouble(args[1]);
    long long eid = PyLong_AsLongLong(args[2]);
    long first = PyLong_AsLong(args[3]);
    long last = PyLong_AsLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (first < INT32_MIN || first > INT32_MAX || last < INT32_MIN || last > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "insert: episode steps must fit in an int32");
        return NULL;
    }
    ColumnViews cv;
    if (views_open(&cv, w->ncols) < 0)
        return NULL;
    PyObject *result = NULL;
    for (; cv.got < w->ncols; cv.got++) {
        Py_buffer *v = &cv.views[cv.got];
        if (PyObject_GetBuffer(PyList_GET_ITEM(row, cv.got), v, PyBUF_C_CONTIGUOUS) < 0) {
            PyErr_Clear();
            result = PyLong_FromLong(CODE_BAD_VALUE);
            goto done;
        }
        if ((size_t)v->len != w->cols[cv.got].rowsize) {
            cv.got++;
            result = PyLong_FromLong(CODE_BAD_VALUE);
            goto done;
        }
        cv.ptrs[cv.got] = v->buf;
    }
    uint64_t key;
    int rc = shm_writer_insert(w, cv.ptrs, priority, (int64_t)eid, (int32_t)first, (int32_t)last,
                               &key, &self->wake);
    if (rc == SHM_WRITER_OK)
        result = PyLong_FromUnsignedLongLong(key);
    else if (rc == SHM_WRITER_EMPTY)
        result = PyLong_FromLong(CODE_EMPTY);
    else if (rc == SHM_WRITER_FULL)
        result = PyLong_FromLong(CODE_FULL);
    else
        raise_corrupt("lease or publish ring");
done:
    views_close(&cv);
    return result;
}

/* insert_mapping(data, priority) -> int: Table.insert's common case whole: a dict with exactly
 * the fields, each value of the field's exact dtype and shape (a C-contiguous numpy array or
 * the field's numpy scalar), a float priority in [0, max_priority], an open table, a leased
 * slot and room to publish. The key, or CODE_CHECK with nothing taken or written (Python then
 * checks everything, raises its errors, waits). */
static PyObject *Writer_insert_mapping(WriterObject *self, PyObject *const *args,
                                       Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "insert_mapping(data, priority)");
        return NULL;
    }
    shm_writer *w = &self->w;
    PyObject *data = args[0];
    PyObject *prio = args[1];
    if (!PyDict_CheckExact(data) || PyDict_GET_SIZE(data) != w->ncols ||
        !PyFloat_CheckExact(prio))
        return PyLong_FromLong(CODE_CHECK);
    double priority = PyFloat_AS_DOUBLE(prio);
    if (!(priority >= 0.0 && priority <= self->max_priority) ||
        !shm_writer_table_open(w, self->daemon_pid, (int64_t)getpid()))
        return PyLong_FromLong(CODE_CHECK);
    ColumnViews cv;
    if (views_open(&cv, w->ncols) < 0)
        return NULL;
    PyObject *result = NULL;
    for (; cv.got < w->ncols; cv.got++) {
        FieldCheck *fc = &self->fields[cv.got];
        PyObject *v = PyDict_GetItemWithError(data, fc->name); /* borrowed */
        if (v == NULL) {
            PyErr_Clear(); /* a missing field, or an unhashable key compared: Python says */
            goto done;
        }
        PyTypeObject *t = Py_TYPE(v);
        if ((PyObject *)t != self->array_type && (PyObject *)t != fc->scalar_type)
            goto done;
        Py_buffer *vb = &cv.views[cv.got];
        if (PyObject_GetBuffer(v, vb, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            PyErr_Clear();
            goto done;
        }
        int same = vb->ndim == fc->ndim && vb->format != NULL &&
                   strcmp(vb->format, fc->format) == 0 &&
                   (size_t)vb->len == w->cols[cv.got].rowsize;
        for (int d = 0; same && d < fc->ndim; d++)
            same = vb->shape[d] == fc->shape[d];
        if (!same) {
            cv.got++;
            goto done;
        }
        cv.ptrs[cv.got] = vb->buf;
    }
    uint64_t key;
    int rc = shm_writer_insert(w, cv.ptrs, priority, 0, 0, 0, &key, &self->wake);
    if (rc == SHM_WRITER_OK) {
        result = PyLong_FromUnsignedLongLong(key);
        goto release;
    }
    if (rc == SHM_WRITER_CORRUPT) {
        raise_corrupt("lease or publish ring");
        goto release;
    }
    /* EMPTY or FULL: Python waits */
done:
    result = PyLong_FromLong(CODE_CHECK);
release:
    views_close(&cv);
    return result;
}

/* insert_batch_mapping(data, priorities, keys_out, start[, episodes]) -> int:
 * Table.insert_batch's common case in C: a dict with exactly the fields, each a C-contiguous
 * numpy array of the field's dtype with len(keys_out) items of the field's shape, priorities a
 * float or a float64 array of one per item, all in [0, max_priority], episodes None (all 0) or
 * a C-contiguous int64 array of shape (n, 3) whose steps fit int32 with first <= last, an open
 * table. Writes and publishes items [start, n) until done, until a chunk's wake rule says to
 * post the daemon (wake_needed), or until no slot is leased / no room is left; returns the new
 * start (Python posts, waits, or calls again), or CODE_CHECK with nothing written (Python
 * checks it all). */
static PyObject *Writer_insert_batch_mapping(WriterObject *self, PyObject *const *args,
                                             Py_ssize_t nargs) {
    if (nargs != 4 && nargs != 5) {
        PyErr_SetString(PyExc_TypeError,
                        "insert_batch_mapping(data, priorities, keys_out, start[, episodes])");
        return NULL;
    }
    PyObject *eps_obj = nargs == 5 ? args[4] : Py_None;
    shm_writer *w = &self->w;
    PyObject *data = args[0];
    PyObject *prio = args[1];
    long long start = PyLong_AsLongLong(args[3]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer keys;
    if (shm_get_buffer(args[2], &keys, 8, 1, "keys_out") < 0)
        return NULL;
    int64_t n = shm_buffer_len(&keys);
    Py_buffer prios = {0}, eps = {0};
    int have_prios = 0, have_eps = 0;
    PyObject *result = NULL;
    int64_t scratch[SHM_PUBLISH_CAPACITY / 2]; /* a chunk's slots (16 KB) */
    ColumnViews cv;
    if (views_open(&cv, w->ncols) < 0) {
        PyBuffer_Release(&keys);
        return NULL;
    }
    if (start < 0 || start > n) {
        PyErr_SetString(PyExc_ValueError, "insert_batch_mapping: start outside the batch");
        goto release;
    }
    if (!PyDict_CheckExact(data) || PyDict_GET_SIZE(data) != w->ncols ||
        !shm_writer_table_open(w, self->daemon_pid, (int64_t)getpid()))
        goto check;
    double priority = 0.0;
    if (PyFloat_CheckExact(prio)) {
        priority = PyFloat_AS_DOUBLE(prio);
        if (!(priority >= 0.0 && priority <= self->max_priority))
            goto check;
    } else {
        if ((PyObject *)Py_TYPE(prio) != self->array_type ||
            PyObject_GetBuffer(prio, &prios, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            PyErr_Clear();
            goto check;
        }
        have_prios = 1;
        if (prios.ndim != 1 || prios.shape[0] != n || prios.format == NULL ||
            strcmp(prios.format, "d") != 0)
            goto check;
        const double *p = prios.buf;
        for (int64_t j = start; j < n; j++) /* items before start: checked by the first call */
            if (!(p[j] >= 0.0 && p[j] <= self->max_priority))
                goto check;
    }
    if (eps_obj != Py_None) {
        if ((PyObject *)Py_TYPE(eps_obj) != self->array_type ||
            PyObject_GetBuffer(eps_obj, &eps, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            PyErr_Clear();
            goto check;
        }
        have_eps = 1;
        /* int64 is "l" on LP64 numpy, "q" elsewhere */
        if (eps.ndim != 2 || eps.shape[0] != n || eps.shape[1] != 3 || eps.itemsize != 8 ||
            eps.format == NULL || (strcmp(eps.format, "l") != 0 && strcmp(eps.format, "q") != 0))
            goto check;
        const int64_t *e = eps.buf;
        for (int64_t j = start; j < n; j++)
            if (e[3 * j + 1] < INT32_MIN || e[3 * j + 2] > INT32_MAX ||
                e[3 * j + 1] > e[3 * j + 2])
                goto check;
    }
    for (; cv.got < w->ncols; cv.got++) {
        FieldCheck *fc = &self->fields[cv.got];
        PyObject *v = PyDict_GetItemWithError(data, fc->name); /* borrowed */
        if (v == NULL) {
            PyErr_Clear();
            goto check;
        }
        if ((PyObject *)Py_TYPE(v) != self->array_type)
            goto check;
        Py_buffer *vb = &cv.views[cv.got];
        if (PyObject_GetBuffer(v, vb, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            PyErr_Clear();
            goto check;
        }
        int same = vb->ndim == fc->ndim + 1 && vb->shape[0] == n && vb->format != NULL &&
                   strcmp(vb->format, fc->format) == 0 &&
                   (size_t)vb->len == (size_t)n * w->cols[cv.got].rowsize;
        for (int d = 0; same && d < fc->ndim; d++)
            same = vb->shape[d + 1] == fc->shape[d];
        if (!same) {
            cv.got++;
            goto check;
        }
        cv.srcs[cv.got] = vb->buf;
    }
    int64_t done;
    const double *parr = have_prios ? prios.buf : NULL;
    size_t bytes = 0;
    for (int i = 0; i < w->ncols; i++)
        bytes += (size_t)(n - start) * w->cols[i].rowsize;
    if (bytes >= 65536) { /* a copy this long outweighs dropping and taking the GIL */
        Py_BEGIN_ALLOW_THREADS;
        done = shm_writer_insert_batch(w, cv.srcs, n, start, parr, priority,
                                       have_eps ? eps.buf : NULL, keys.buf, &self->wake,
                                       scratch);
        Py_END_ALLOW_THREADS;
    } else {
        done = shm_writer_insert_batch(w, cv.srcs, n, start, parr, priority,
                                       have_eps ? eps.buf : NULL, keys.buf, &self->wake,
                                       scratch);
    }
    if (done < 0)
        raise_corrupt("lease or publish ring");
    else
        result = PyLong_FromLongLong(done);
    goto release;
check:
    result = PyLong_FromLong(CODE_CHECK);
release:
    views_close(&cv);
    if (have_prios)
        PyBuffer_Release(&prios);
    if (have_eps)
        PyBuffer_Release(&eps);
    PyBuffer_Release(&keys);
    return result;
}

/* take(out: int64 array) -> int: up to len(out) leased slots written into out; how many, or
 * CODE_EMPTY. Raises SegmentError for a corrupt lease ring. */
static PyObject *Writer_take(WriterObject *self, PyObject *out) {
    Py_buffer v;
    if (shm_get_buffer(out, &v, 8, 1, "out") < 0)
        return NULL;
    Py_ssize_t n = shm_buffer_len(&v);
    int64_t k = 0;
    int rc = n > 0 ? shm_writer_take(&self->w, n, v.buf, &k) : SHM_WRITER_OK;
    PyBuffer_Release(&v);
    if (rc == SHM_WRITER_CORRUPT) {
        raise_corrupt("lease ring");
        return NULL;
    }
    return PyLong_FromLongLong(rc == SHM_WRITER_EMPTY ? CODE_EMPTY : k);
}

/* take_one() -> int: one leased slot, or CODE_EMPTY. */
static PyObject *Writer_take_one(WriterObject *self, PyObject *unused) {
    (void)unused;
    int64_t slot, k;
    int rc = shm_writer_take(&self->w, 1, &slot, &k);
    if (rc == SHM_WRITER_CORRUPT) {
        raise_corrupt("lease ring");
        return NULL;
    }
    return PyLong_FromLongLong(rc == SHM_WRITER_EMPTY ? CODE_EMPTY : slot);
}

static int slot_arg(WriterObject *self, PyObject *obj, int64_t *slot) {
    long long s = PyLong_AsLongLong(obj);
    if (s == -1 && PyErr_Occurred())
        return -1;
    if (s < 0 || s >= self->w.num_slots) {
        PyErr_Format(PyExc_IndexError, "slot %lld outside the table", s);
        return -1;
    }
    *slot = s;
    return 0;
}

/* begin(slot) -> int: seqlock begin (generation odd); returns the generation found. */
static PyObject *Writer_begin(WriterObject *self, PyObject *arg) {
    int64_t slot;
    if (slot_arg(self, arg, &slot) < 0)
        return NULL;
    return PyLong_FromLongLong(shm_writer_begin(&self->w, slot));
}

/* end(slot, gen, priority, episode, first, last): priority, episode, then generation gen + 2
 * (store-release). */
static PyObject *Writer_end(WriterObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "end(slot, gen, priority, episode, first, last)");
        return NULL;
    }
    int64_t slot;
    if (slot_arg(self, args[0], &slot) < 0)
        return NULL;
    long long g = PyLong_AsLongLong(args[1]);
    double priority = PyFloat_AsDouble(args[2]);
    long long eid = PyLong_AsLongLong(args[3]);
    long first = PyLong_AsLong(args[4]);
    long last = PyLong_AsLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (first < INT32_MIN || first > INT32_MAX || last < INT32_MIN || last > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "end: episode steps must fit in an int32");
        return NULL;
    }
    shm_writer_end(&self->w, slot, (int64_t)g, priority, (int64_t)eid, (int32_t)first,
                   (int32_t)last);
    Py_RETURN_NONE;
}

/* abandon(slot, gen): generation gen + 2, the slot kept for the next take (a discarded
 * reservation: never published). */
static PyObject *Writer_abandon(WriterObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "abandon(slot, gen)");
        return NULL;
    }
    int64_t slot;
    if (slot_arg(self, args[0], &slot) < 0)
        return NULL;
    long long g = PyLong_AsLongLong(args[1]);
    if (g == -1 && PyErr_Occurred())
        return NULL;
    if (shm_writer_abandon(&self->w, slot, (int64_t)g) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* publish(slots: int64 array) -> int: appends them (<= PUBLISH_CAPACITY) to the publish ring
 * and releases PUB_TAIL: 0, or CODE_FULL with nothing published. Each slot is range-checked
 * (it is ours, but a bad one would get this channel cut off). */
static PyObject *Writer_publish(WriterObject *self, PyObject *slots) {
    Py_buffer v;
    if (shm_get_buffer(slots, &v, 8, 0, "slots") < 0)
        return NULL;
    Py_ssize_t k = shm_buffer_len(&v);
    const int64_t *s = v.buf;
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < k; i++) {
        if (s[i] < 0 || s[i] >= self->w.num_slots) {
            PyErr_Format(PyExc_IndexError, "slot %lld outside the table", (long long)s[i]);
            goto done;
        }
    }
    if (k > SHM_PUBLISH_CAPACITY) {
        PyErr_SetString(PyExc_ValueError, "publish: more slots than the ring holds");
        goto done;
    }
    int rc = shm_writer_room(&self->w, k);
    if (rc == SHM_WRITER_CORRUPT) {
        raise_corrupt("publish ring head");
        goto done;
    }
    if (rc == SHM_WRITER_FULL) {
        result = PyLong_FromLong(CODE_FULL);
        goto done;
    }
    shm_writer_publish(&self->w, s, k);
    result = PyLong_FromLong(0);
done:
    PyBuffer_Release(&v);
    return result;
}

/* publish_one(slot) -> int: publish(), for one slot without an array. */
static PyObject *Writer_publish_one(WriterObject *self, PyObject *arg) {
    int64_t slot;
    if (slot_arg(self, arg, &slot) < 0)
        return NULL;
    int rc = shm_writer_room(&self->w, 1);
    if (rc == SHM_WRITER_CORRUPT) {
        raise_corrupt("publish ring head");
        return NULL;
    }
    if (rc == SHM_WRITER_FULL)
        return PyLong_FromLong(CODE_FULL);
    shm_writer_publish(&self->w, &slot, 1);
    return PyLong_FromLong(0);
}

/* room(k) -> bool: room for k more publish entries (PUB_HEAD re-read if needed). */
static PyObject *Writer_room(WriterObject *self, PyObject *arg) {
    long long k = PyLong_AsLongLong(arg);
    if (k == -1 && PyErr_Occurred())
        return NULL;
    if (k < 0 || k > SHM_PUBLISH_CAPACITY) {
        PyErr_SetString(PyExc_ValueError, "room: k out of range");
        return NULL;
    }
    int rc = shm_writer_room(&self->w, k);
    if (rc == SHM_WRITER_CORRUPT) {
        raise_corrupt("publish ring head");
        return NULL;
    }
    return PyBool_FromLong(rc == SHM_WRITER_OK);
}

/* committed() -> int: PUB_HEAD (acquired and range-checked against our tail). */
static PyObject *Writer_committed(WriterObject *self, PyObject *unused) {
    (void)unused;
    /* Dekker with the daemon: the caller stored WAIT_INSERT, the daemon stores PUB_HEAD; each
     * fences, then loads the other's word (a waiter's wake is never lost). */
    shm_fence_seq_cst();
    if (shm_writer_poll_committed(&self->w) != SHM_WRITER_OK) {
        raise_corrupt("publish ring head");
        return NULL;
    }
    return PyLong_FromLongLong(self->w.pub_head);
}

/* leased() -> int: slots leased and not yet taken (LEASE_TAIL acquired and checked). */
static PyObject *Writer_leased(WriterObject *self, PyObject *unused) {
    (void)unused;
    /* Dekker with the daemon: the caller stored WAIT_INSERT (and WANT_LEASE), the daemon
     * store-releases LEASE_TAIL; each fences, then loads the other's word. */
    shm_fence_seq_cst();
    if (shm_writer_poll_lease(&self->w) != SHM_WRITER_OK) {
        raise_corrupt("lease ring tail");
        return NULL;
    }
    return PyLong_FromLongLong(self->w.lease_tail - self->w.lease_head);
}

/* wake(force) -> bool: seq_cst fence, then the wake rule; True = post the daemon (cleared). */
static PyObject *Writer_wake(WriterObject *self, PyObject *arg) {
    int force = PyObject_IsTrue(arg);
    if (force < 0)
        return NULL;
    return PyBool_FromLong(shm_writer_wake(&self->w, force));
}

/* write_batch(slots, columns: list, priorities, episodes, keys_out): rows [0, k) of each
 * column (C-contiguous, k rows of the field) into the k slots (taken from this writer's lease:
 * range-checked again here), under the seqlock; the GIL is released for large copies. */
static PyObject *Writer_write_batch(WriterObject *self, PyObject *const *args,
                                    Py_ssize_t nargs) {
    if (nargs != 5 || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "write_batch(slots, columns: list, priorities, episodes, keys_out)");
        return NULL;
    }
    shm_writer *w = &self->w;
    PyObject *columns = args[1];
    if (PyList_GET_SIZE(columns) != w->ncols) {
        PyErr_SetString(PyExc_ValueError, "write_batch: one column per field");
        return NULL;
    }
    Py_buffer fixed[4];
    int nfixed = 0;
    PyObject *result = NULL;
    ColumnViews cv;
    if (views_open(&cv, w->ncols) < 0)
        return NULL;
    if (shm_get_buffer(args[0], &fixed[0], 8, 0, "slots") < 0)
        goto done;
    nfixed++;
    if (shm_get_buffer(args[2], &fixed[1], 8, 0, "priorities") < 0)
        goto done;
    nfixed++;
    if (shm_get_buffer(args[3], &fixed[2], 8, 0, "episodes") < 0)
        goto done;
    nfixed++;
    if (shm_get_buffer(args[4], &fixed[3], 8, 1, "keys_out") < 0)
        goto done;
    nfixed++;
    Py_ssize_t k = shm_buffer_len(&fixed[0]);
    if (shm_buffer_len(&fixed[1]) != k || shm_buffer_len(&fixed[2]) != 3 * k ||
        shm_buffer_len(&fixed[3]) != k) {
        PyErr_SetString(PyExc_ValueError, "write_batch: arrays of inconsistent lengths");
        goto done;
    }
    const int64_t *slots = fixed[0].buf;
    for (Py_ssize_t j = 0; j < k; j++) {
        if (slots[j] < 0 || slots[j] >= w->num_slots) {
            PyErr_Format(PyExc_IndexError, "slot %lld outside the table", (long long)slots[j]);
            goto done;
        }
    }
    size_t total = 0;
    for (; cv.got < w->ncols; cv.got++) {
        Py_buffer *v = &cv.views[cv.got];
        if (PyObject_GetBuffer(PyList_GET_ITEM(columns, cv.got), v, PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        if ((size_t)v->len < (size_t)k * w->cols[cv.got].rowsize) {
            cv.got++;
            PyErr_SetString(PyExc_ValueError, "write_batch: a column shorter than the batch");
            goto done;
        }
        cv.srcs[cv.got] = v->buf;
        total += (size_t)k * w->cols[cv.got].rowsize;
    }
    if (total >= 65536) { /* a memcpy this long outweighs dropping and taking the GIL */
        Py_BEGIN_ALLOW_THREADS;
        shm_writer_write_batch(w, slots, k, cv.srcs, fixed[1].buf, fixed[2].buf, fixed[3].buf);
        Py_END_ALLOW_THREADS;
    } else {
        shm_writer_write_batch(w, slots, k, cv.srcs, fixed[1].buf, fixed[2].buf, fixed[3].buf);
    }
    result = Py_NewRef(Py_None);
done:
    views_close(&cv);
    for (int i = 0; i < nfixed; i++)
        PyBuffer_Release(&fixed[i]);
    return result;
}

static PyMethodDef Writer_methods[] = {
    {"insert", (PyCFunction)(void (*)(void))Writer_insert, METH_FASTCALL,
     "insert(row, priority, episode, first, last) -> key, or -1 (no lease), -2 (publish ring "
     "full), -3 (a value is not a contiguous buffer of its field's size)."},
    {"insert_mapping", (PyCFunction)(void (*)(void))Writer_insert_mapping, METH_FASTCALL,
     "insert_mapping(data, priority) -> key, or -4: Table.insert's common case in C."},
    {"insert_batch_mapping", (PyCFunction)(void (*)(void))Writer_insert_batch_mapping,
     METH_FASTCALL,
     "insert_batch_mapping(data, priorities, keys_out, start[, episodes]) -> new start, or -4: "
     "Table.insert_batch's common case in C."},
    {"take", (PyCFunction)Writer_take, METH_O, "take(out) -> k leased slots into out, or -1."},
    {"take_one", (PyCFunction)Writer_take_one, METH_NOARGS, "take_one() -> slot, or -1."},
    {"begin", (PyCFunction)Writer_begin, METH_O, "begin(slot) -> generation found (made odd)."},
    {"end", (PyCFunction)(void (*)(void))Writer_end, METH_FASTCALL,
     "end(slot, gen, priority, episode, first, last): generation gen + 2 after the metadata."},
    {"abandon", (PyCFunction)(void (*)(void))Writer_abandon, METH_FASTCALL,
     "abandon(slot, gen): a discarded reservation's slot, kept for the next take."},
    {"publish", (PyCFunction)Writer_publish, METH_O, "publish(slots) -> 0, or -2 (full)."},
    {"publish_one", (PyCFunction)Writer_publish_one, METH_O,
     "publish_one(slot) -> 0, or -2 (full)."},
    {"room", (PyCFunction)Writer_room, METH_O, "room(k) -> room for k publish entries."},
    {"committed", (PyCFunction)Writer_committed, METH_NOARGS, "committed() -> PUB_HEAD."},
    {"leased", (PyCFunction)Writer_leased, METH_NOARGS, "leased() -> slots left to take."},
    {"wake", (PyCFunction)Writer_wake, METH_O, "wake(force) -> post the daemon's semaphore."},
    {"write_batch", (PyCFunction)(void (*)(void))Writer_write_batch, METH_FASTCALL,
     "write_batch(slots, columns, priorities, episodes, keys_out)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Writer_members[] = {
    {"lease_head", T_LONGLONG, offsetof(WriterObject, w.lease_head), READONLY, NULL},
    {"lease_tail", T_LONGLONG, offsetof(WriterObject, w.lease_tail), READONLY, NULL},
    {"pub_head", T_LONGLONG, offsetof(WriterObject, w.pub_head), READONLY, NULL},
    {"pub_tail", T_LONGLONG, offsetof(WriterObject, w.pub_tail), READONLY, NULL},
    {"spare", T_LONGLONG, offsetof(WriterObject, w.nspare), READONLY,
     "abandoned slots kept for the next take"},
    {"wake_needed", T_INT, offsetof(WriterObject, wake), READONLY,
     "the last insert()'s wake rule: post the daemon's semaphore"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.Writer",
    .tp_basicsize = sizeof(WriterObject),
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Writer(chan, ctrl, lease, publish, gen, priority, episode, episode_steps, key, "
              "columns): a client's insert path on one channel of one table.",
    .tp_methods = Writer_methods,
    .tp_members = Writer_members,
    .tp_init = (initproc)Writer_init,
    .tp_new = PyType_GenericNew,
};

int shm_bind_writer(PyObject *module) {
    if (PyType_Ready(&WriterType) < 0)
        return -1;
    return PyModule_AddType(module, &WriterType);
}
