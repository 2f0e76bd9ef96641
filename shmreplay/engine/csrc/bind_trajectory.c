/* Bindings of the trajectory concern: selections and histories (the C bases of the writer's
 * TrajectoryColumn and ColumnHistory), the batch gather and batch metadata of
 * TrajectoryWriter._send_table, create_item's field check, append's copy into the history
 * rings, and the n-step adder's window.
 *
 * gather(ring, rows, starts, length, out) copies item i's ``length`` steps from ``starts[i]``
 * out of a column's history ring into out[i]: one call per field per batch, in place of the
 * numpy index arithmetic and take. ``starts`` is a list of Python ints, or the tuple of one
 * field's entries of the writer's pending items: start steps (compact items) and selections,
 * read here without a list.
 */
#include "shm_bind.h"

#include <float.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <string.h>
#include <structmember.h>

#include "shm_status.h"
#include "trajectory.h"

/* ---- selections: TrajSel, the C base of trajectory.TrajectoryColumn -------------------------
 *
 * A selection only records (column, first step, length, [step indices], kind); the Python
 * subclass (``__slots__ = ()``) has its properties and methods. Made in C, a selection costs
 * an allocation instead of a Python __init__. */

typedef struct {
    PyObject_HEAD PyObject *col; /* the writer's _Column */
    PyObject *indices;           /* None, or int64 steps (kind 2) */
    long long start;             /* the first (lowest) step referenced */
    long long length;            /* steps selected */
    int kind;                    /* 0 consecutive steps, 1 one step without time axis, 2 by index */
} TrajSelObject;

static int trajsel_traverse(TrajSelObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->col);
    Py_VISIT(self->indices);
    return 0;
}

static int trajsel_clear(TrajSelObject *self) {
    Py_CLEAR(self->col);
    Py_CLEAR(self->indices);
    return 0;
}

/* The types are static: a Python subclass's subtype_dealloc (and subtype_traverse) handles
 * its heap type's reference, so neither touches the type here. */
static void trajsel_dealloc(TrajSelObject *self) {
    PyObject_GC_UnTrack(self);
    trajsel_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A new selection of type ``tp`` (TrajSel or its Python subclass), untracked fields set. */
static PyObject *trajsel_make(PyTypeObject *tp, PyObject *col, long long start, long long length,
                              PyObject *indices, int kind) {
    TrajSelObject *sel = (TrajSelObject *)tp->tp_alloc(tp, 0);
    if (sel == NULL)
        return NULL;
    sel->col = Py_NewRef(col);
    sel->indices = Py_NewRef(indices);
    sel->start = start;
    sel->length = length;
    sel->kind = kind;
    return (PyObject *)sel;
}

/* TrajectoryColumn(col, start, length, indices=None, squeezed=False) */
static int trajsel_init(TrajSelObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"col", "start", "length", "indices", "squeezed", NULL};
    PyObject *col, *indices = Py_None;
    long long start, length;
    int squeezed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OLL|Op", kwlist, &col, &start, &length,
                                     &indices, &squeezed))
        return -1;
    Py_XSETREF(self->col, Py_NewRef(col));
    Py_XSETREF(self->indices, Py_NewRef(indices));
    self->start = start;
    self->length = length;
    self->kind = indices != Py_None ? 2 : (squeezed ? 1 : 0);
    return 0;
}

static PyMemberDef trajsel_members[] = {
    {"_col", T_OBJECT, offsetof(TrajSelObject, col), READONLY, NULL},
    {"_indices", T_OBJECT, offsetof(TrajSelObject, indices), READONLY, NULL},
    {"_start", T_LONGLONG, offsetof(TrajSelObject, start), READONLY, NULL},
    {"_length", T_LONGLONG, offsetof(TrajSelObject, length), READONLY, NULL},
    {"_kind", T_INT, offsetof(TrajSelObject, kind), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject TrajSelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.TrajSel",
    .tp_basicsize = sizeof(TrajSelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A selection of history steps (column, first step, length, indices, kind).",
    .tp_traverse = (traverseproc)trajsel_traverse,
    .tp_clear = (inquiry)trajsel_clear,
    .tp_dealloc = (destructor)trajsel_dealloc,
    .tp_init = (initproc)trajsel_init,
    .tp_new = PyType_GenericNew,
    .tp_members = trajsel_members,
};

/* ---- the batch gather --------------------------------------------------------------------- */

/* A batch has at most MAX_BATCH_ITEMS (128) items: their starts fit on the stack. */
#define STACK_STARTS 256
/* Copies of at least this many bytes release the GIL (below it, releasing costs more). */
#define NOGIL_BYTES (64 << 10)

static PyObject *traj_gather(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "gather(ring, rows, starts, length, out)");
        return NULL;
    }
    long long rows = PyLong_AsLongLong(args[1]);
    long long length = PyLong_AsLongLong(args[3]);
    if ((rows == -1 || length == -1) && PyErr_Occurred())
        return NULL;
    PyObject *starts_obj = args[2];
    /* a list of start steps, or a tuple of start steps and selections (their first steps) */
    int from_sels = PyTuple_CheckExact(starts_obj);
    if (!from_sels && !PyList_CheckExact(starts_obj)) {
        PyErr_SetString(PyExc_TypeError,
                        "gather: starts must be a list of ints or a tuple of ints and selections");
        return NULL;
    }
    Py_ssize_t n = Py_SIZE(starts_obj);
    if (rows < 1 || length < 1 || length > rows) {
        PyErr_Format(PyExc_ValueError, "gather: need 1 <= length (%lld) <= rows (%lld)", length,
                     rows);
        return NULL;
    }
    int64_t stack[STACK_STARTS];
    int64_t *starts = stack;
    if (n > STACK_STARTS) {
        starts = PyMem_Malloc((size_t)n * sizeof *starts);
        if (starts == NULL)
            return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    Py_buffer ring = {0}, out = {0};
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item =
            from_sels ? PyTuple_GET_ITEM(starts_obj, i) : PyList_GET_ITEM(starts_obj, i);
        if (from_sels && PyObject_TypeCheck(item, &TrajSelType)) {
            starts[i] = ((TrajSelObject *)item)->start;
            continue;
        }
        if (!PyLong_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "gather: a start is neither an int nor a selection");
            goto done;
        }
        long long s = PyLong_AsLongLong(item);
        if (s == -1 && PyErr_Occurred())
            goto done;
        starts[i] = s;
    }
    if (PyObject_GetBuffer(args[0], &ring, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_SetString(PyExc_TypeError, "gather: ring must be a C-contiguous array");
        goto done;
    }
    if (PyObject_GetBuffer(args[4], &out, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyErr_SetString(PyExc_TypeError, "gather: out must be a C-contiguous writable array");
        PyBuffer_Release(&ring);
        ring.obj = NULL;
        goto done;
    }
    if (ring.len % rows != 0) {
        PyErr_Format(PyExc_ValueError, "gather: a ring of %zd bytes is not %lld rows", ring.len,
                     rows);
        goto done;
    }
    size_t step_bytes = (size_t)(ring.len / rows);
    size_t need = (size_t)n * (size_t)length * step_bytes;
    if ((size_t)out.len != need) {
        PyErr_Format(PyExc_ValueError, "gather: out has %zd bytes, %zu needed", out.len, need);
        goto done;
    }
    int rc;
    if (need >= NOGIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS;
        rc = shm_traj_gather(ring.buf, rows, step_bytes, starts, n, length, out.buf);
        Py_END_ALLOW_THREADS;
    } else {
        rc = shm_traj_gather(ring.buf, rows, step_bytes, starts, n, length, out.buf);
    }
    if (rc != SHM_OK) {
        PyErr_SetString(PyExc_ValueError, "gather: a start step is negative");
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    if (ring.obj != NULL)
        PyBuffer_Release(&ring);
    if (out.obj != NULL)
        PyBuffer_Release(&out);
    if (starts != stack)
        PyMem_Free(starts);
    return result;
}


/* ---- TrajHistory: the C base of trajectory.ColumnHistory -------------------------------------
 *
 * ``h[-T:]`` and ``h[i]`` (an int in range) are answered here: the writer's ``_total`` and
 * ``_history_start`` read (two attribute lookups), a selection made. Every other key, and an
 * int out of range (its IndexError names the column), goes to the subclass's ``_select_slow``. */

typedef struct {
    PyObject_HEAD PyObject *col; /* the writer's _Column */
    PyObject *writer;            /* the TrajectoryWriter */
    PyTypeObject *sel_type;      /* TrajectoryColumn (a subclass of TrajSel) */
} TrajHistoryObject;

static PyObject *str_total, *str_history_start, *str_select_slow;

static int trajhist_traverse(TrajHistoryObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->col);
    Py_VISIT(self->writer);
    Py_VISIT(self->sel_type);
    return 0;
}

static int trajhist_clear(TrajHistoryObject *self) {
    Py_CLEAR(self->col);
    Py_CLEAR(self->writer);
    Py_CLEAR(self->sel_type);
    return 0;
}

static void trajhist_dealloc(TrajHistoryObject *self) {
    PyObject_GC_UnTrack(self);
    trajhist_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* TrajHistory(col, writer, sel_type) */
static int trajhist_init(TrajHistoryObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"col", "writer", "sel_type", NULL};
    PyObject *col, *writer, *sel_type;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO!", kwlist, &col, &writer, &PyType_Type,
                                     &sel_type))
        return -1;
    if (!PyType_IsSubtype((PyTypeObject *)sel_type, &TrajSelType)) {
        PyErr_SetString(PyExc_TypeError, "TrajHistory: sel_type must subclass TrajSel");
        return -1;
    }
    Py_XSETREF(self->col, Py_NewRef(col));
    Py_XSETREF(self->writer, Py_NewRef(writer));
    Py_XSETREF(self->sel_type, (PyTypeObject *)Py_NewRef(sel_type));
    return 0;
}

/* The writer's int attribute ``name`` into *out: 0, or -1 with an exception set. */
static int writer_int(PyObject *writer, PyObject *name, long long *out) {
    PyObject *v = PyObject_GetAttr(writer, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *trajhist_subscript(TrajHistoryObject *self, PyObject *key) {
    if (self->col == NULL) {
        PyErr_SetString(PyExc_TypeError, "TrajHistory not initialised");
        return NULL;
    }
    long long total, base;
    if (PySlice_Check(key)) {
        PySliceObject *sl = (PySliceObject *)key;
        if (sl->step == Py_None && sl->stop == Py_None && PyLong_CheckExact(sl->start)) {
            int overflow;
            long long first = PyLong_AsLongLongAndOverflow(sl->start, &overflow);
            if (!overflow && first < 0) {
                /* h[-T:], the commonest: the newest T steps, fewer if the history is shorter */
                if (writer_int(self->writer, str_total, &total) < 0 ||
                    writer_int(self->writer, str_history_start, &base) < 0)
                    return NULL;
                first += total;
                if (first < base)
                    first = base;
                return trajsel_make(self->sel_type, self->col, first, total - first, Py_None, 0);
            }
        }
    } else if (PyLong_CheckExact(key)) {
        int overflow;
        long long i = PyLong_AsLongLongAndOverflow(key, &overflow);
        if (i == -1 && PyErr_Occurred())
            return NULL;
        if (!overflow) {
            if (writer_int(self->writer, str_total, &total) < 0 ||
                writer_int(self->writer, str_history_start, &base) < 0)
                return NULL;
            long long n = total - base;
            long long j = i < 0 ? i + n : i;
            if (j >= 0 && j < n)
                return trajsel_make(self->sel_type, self->col, base + j, 1, Py_None, 1);
        }
    }
    return PyObject_CallMethodOneArg((PyObject *)self, str_select_slow, key);
}

static PyMappingMethods trajhist_mapping = {
    .mp_subscript = (binaryfunc)trajhist_subscript,
};

static PyMemberDef trajhist_members[] = {
    {"_col", T_OBJECT, offsetof(TrajHistoryObject, col), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject TrajHistoryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.TrajHistory",
    .tp_basicsize = sizeof(TrajHistoryObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One field's history: h[-T:] and h[i] in C, other keys by _select_slow.",
    .tp_traverse = (traverseproc)trajhist_traverse,
    .tp_clear = (inquiry)trajhist_clear,
    .tp_dealloc = (destructor)trajhist_dealloc,
    .tp_init = (initproc)trajhist_init,
    .tp_new = PyType_GenericNew,
    .tp_members = trajhist_members,
    .tp_as_mapping = &trajhist_mapping,
};

/* ---- create_item's field loop ------------------------------------------------------------
 *
 * traj_fields(trajectory, names, vcol, vlen, vkind, oldest, sel_type)
 *     -> (starts, lo, hi) | None
 *
 * The common item, checked in C: ``trajectory`` a dict, each names[j] a selection of exactly
 * ``sel_type`` with the layout last accepted for field j (column vcol[j], length vlen[j], kind
 * vkind[j], not by index), starting at or after ``oldest`` and after its column's last step
 * without a value (``complete_since``). Returns the selections' first steps in field order (a
 * tuple of ints: the item in the writer's compact form, the layout being the accepted one)
 * and the item's first and last steps. None: not that case (a missing field, a new layout, a
 * step that may not be kept or set); the caller's Python loop then checks it all and raises
 * what it finds. The caller makes sure no step is open (the open step's fields need the
 * Python checks). */
static PyObject *str_complete_since;

static PyObject *traj_fields(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "traj_fields(trajectory, names, vcol, vlen, vkind, oldest, sel_type)");
        return NULL;
    }
    PyObject *traj = args[0], *names = args[1], *vcol = args[2], *vlen = args[3];
    PyObject *vkind = args[4];
    PyTypeObject *sel_type = (PyTypeObject *)args[6];
    long long oldest = PyLong_AsLongLong(args[5]);
    if (oldest == -1 && PyErr_Occurred())
        return NULL;
    if (!PyDict_CheckExact(traj) || !PyTuple_CheckExact(names) || !PyList_CheckExact(vcol) ||
        !PyList_CheckExact(vlen) || !PyList_CheckExact(vkind))
        Py_RETURN_NONE;
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    if (n < 1 || !PyType_Check(sel_type) || !PyType_IsSubtype(sel_type, &TrajSelType) ||
        PyList_GET_SIZE(vcol) != n || PyList_GET_SIZE(vlen) != n || PyList_GET_SIZE(vkind) != n)
        Py_RETURN_NONE;
    PyObject *sels = PyTuple_New(n); /* the start steps */
    if (sels == NULL)
        return NULL;
    long long lo = LLONG_MAX, hi = -1;
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *sel = PyDict_GetItemWithError(traj, PyTuple_GET_ITEM(names, j));
        if (sel == NULL) {
            if (PyErr_Occurred())
                goto fail;
            goto slow;
        }
        if (Py_TYPE(sel) != sel_type)
            goto slow;
        TrajSelObject *s = (TrajSelObject *)sel;
        if (s->col != PyList_GET_ITEM(vcol, j) || s->kind == 2)
            goto slow;
        PyObject *len_obj = PyList_GET_ITEM(vlen, j), *kind_obj = PyList_GET_ITEM(vkind, j);
        if (!PyLong_CheckExact(len_obj) || !PyLong_CheckExact(kind_obj) ||
            PyLong_AsLongLong(len_obj) != s->length || PyLong_AsLong(kind_obj) != s->kind) {
            if (PyErr_Occurred())
                goto fail;
            goto slow;
        }
        if (s->length < 1 || s->start < oldest)
            goto slow;
        PyObject *cs_obj = PyObject_GetAttr(s->col, str_complete_since);
        if (cs_obj == NULL)
            goto fail;
        long long complete_since = PyLong_AsLongLong(cs_obj);
        Py_DECREF(cs_obj);
        if (complete_since == -1 && PyErr_Occurred())
            goto fail;
        if (s->start < complete_since)
            goto slow;
        long long last = s->start + s->length - 1;
        if (s->start < lo)
            lo = s->start;
        if (last > hi)
            hi = last;
        PyObject *start = PyLong_FromLongLong(s->start);
        if (start == NULL)
            goto fail;
        PyTuple_SET_ITEM(sels, j, start);
    }
    return Py_BuildValue("(NLL)", sels, lo, hi);
slow:
    Py_DECREF(sels);
    Py_RETURN_NONE;
fail:
    Py_DECREF(sels);
    return NULL;
}

/* ---- append: TrajRing, a column's history ring, and traj_append --------------------------
 *
 * TrajRing(ring, scalar_type) keeps the buffer of a column's ring (numpy [rows, *step_shape],
 * C-contiguous, this process's memory) for its lifetime. traj_append(step, rings, i) writes
 * every value of ``step`` into row i % rows of its field's ring when each is exactly what the
 * Python path would copy as it is: the field's numpy scalar type (0-d fields), an ndarray of
 * the ring's format and step shape, or a Python number that a 0-d ring of float32, float64,
 * int64 or bool holds exactly as numpy would store it (the ``fast`` types of the Python path:
 * a bool anywhere, an int in an int64 ring, an int or a float in a float ring; an int only
 * where the float holds it exactly, a float32 only in range: numpy's own rounding and
 * warnings stay with the Python path). Otherwise (a new field, a value to cast or check) it
 * writes nothing and returns False: the Python path does it all. */

#define MAX_APPEND_FIELDS 32
#define MAX_RING_DIMS 32

/* Which Python numbers a ring takes in C (0-d rings of these dtypes only). */
enum { PY_NONE, PY_F32, PY_F64, PY_I64, PY_BOOL };

typedef struct {
    PyObject_HEAD Py_buffer view; /* the ring: ndim >= 1, shape[0] = rows */
    PyObject *scalar_type;        /* the numpy scalar type of a 0-d field, else None */
    Py_ssize_t rows;
    Py_ssize_t step_bytes;
    int pykind; /* PY_*: the ring's dtype, for Python numbers */
} TrajRingObject;

static PyObject *ndarray_type; /* numpy.ndarray, looked up at the first TrajRing */

static void trajring_dealloc(TrajRingObject *self) {
    if (self->view.obj != NULL)
        PyBuffer_Release(&self->view);
    Py_XDECREF(self->scalar_type);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int trajring_init(TrajRingObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"ring", "scalar_type", NULL};
    PyObject *ring, *scalar_type;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO", kwlist, &ring, &scalar_type))
        return -1;
    if (self->view.obj != NULL) {
        PyErr_SetString(PyExc_TypeError, "TrajRing is initialised once");
        return -1;
    }
    if (ndarray_type == NULL) {
        PyObject *np = PyImport_ImportModule("numpy");
        if (np == NULL)
            return -1;
        ndarray_type = PyObject_GetAttrString(np, "ndarray");
        Py_DECREF(np);
        if (ndarray_type == NULL)
            return -1;
    }
    if (PyObject_GetBuffer(ring, &self->view,
                           PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0)
        return -1;
    if (self->view.ndim < 1 || self->view.ndim > MAX_RING_DIMS || self->view.shape[0] < 1 ||
        self->view.format == NULL) {
        PyBuffer_Release(&self->view);
        self->view.obj = NULL;
        PyErr_SetString(PyExc_ValueError, "TrajRing: ring must be an array of >= 1 rows");
        return -1;
    }
    self->rows = self->view.shape[0];
    self->step_bytes = self->view.len / self->rows;
    self->scalar_type = Py_NewRef(scalar_type);
    self->pykind = PY_NONE;
    const char *fmt = self->view.format;
    if (*fmt == '@' || *fmt == '=')
        fmt++;
    if (self->view.ndim == 1 && fmt[0] != '\0' && fmt[1] == '\0') {
        Py_ssize_t size = self->step_bytes;
        if (fmt[0] == 'f' && size == 4)
            self->pykind = PY_F32;
        else if (fmt[0] == 'd' && size == 8)
            self->pykind = PY_F64;
        else if ((fmt[0] == 'l' || fmt[0] == 'q') && size == 8)
            self->pykind = PY_I64;
        else if (fmt[0] == '?' && size == 1)
            self->pykind = PY_BOOL;
    }
    return 0;
}

static PyTypeObject TrajRingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.TrajRing",
    .tp_basicsize = sizeof(TrajRingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TrajRing(ring, scalar_type): a history ring's buffer, for traj_append.",
    .tp_dealloc = (destructor)trajring_dealloc,
    .tp_init = (initproc)trajring_init,
    .tp_new = PyType_GenericNew,
};

/* A Python number's bytes in ``r``'s dtype, into *num: 1 if ``value`` is one that the ring
 * holds exactly as numpy would store it (see above), else 0. */
static int python_number(TrajRingObject *r, PyObject *value, uint64_t *num) {
    double d;
    long long v;
    int overflow;
    if (r->pykind == PY_NONE)
        return 0;
    if (PyBool_Check(value)) {
        v = value == Py_True;
        d = (double)v;
    } else if (PyLong_CheckExact(value)) {
        if (r->pykind == PY_BOOL)
            return 0;
        v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow || (v == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        /* beyond 2^24 (2^53) a float32 (float64) may round: numpy does that, not this */
        long long exact = r->pykind == PY_F32 ? (1LL << 24) : (1LL << 53);
        if (r->pykind != PY_I64 && (v > exact || v < -exact))
            return 0;
        d = (double)v;
    } else if (PyFloat_CheckExact(value)) {
        if (r->pykind == PY_BOOL || r->pykind == PY_I64)
            return 0;
        d = PyFloat_AS_DOUBLE(value);
        /* a finite float beyond float32's range: numpy's overflow warning, in Python */
        if (r->pykind == PY_F32 && isfinite(d) && fabs(d) > FLT_MAX)
            return 0;
        v = 0;
    } else {
        return 0;
    }
    *num = 0;
    switch (r->pykind) {
    case PY_F32: {
        float f = (float)d;
        memcpy(num, &f, sizeof f);
        break;
    }
    case PY_F64:
        memcpy(num, &d, sizeof d);
        break;
    case PY_I64: {
        int64_t q = v;
        memcpy(num, &q, sizeof q);
        break;
    }
    default: {
        uint8_t b = v != 0;
        memcpy(num, &b, sizeof b);
        break;
    }
    }
    return 1;
}

/* Whether ``value`` goes into ``r`` as it is; fills ``view`` (to release) if so. */
static int ring_accepts(TrajRingObject *r, PyObject *value, Py_buffer *view) {
    PyTypeObject *t = Py_TYPE(value);
    if ((PyObject *)t == r->scalar_type) {
        /* the field's own numpy scalar: its buffer is one item of the ring's dtype */
        if (PyObject_GetBuffer(value, view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            return 0;
        }
    } else if ((PyObject *)t == ndarray_type) {
        if (PyObject_GetBuffer(value, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            PyErr_Clear();
            return 0;
        }
        int same = view->format != NULL && strcmp(view->format, r->view.format) == 0 &&
                   view->ndim == r->view.ndim - 1;
        for (int d = 0; same && d < view->ndim; d++)
            same = view->shape[d] == r->view.shape[d + 1];
        if (!same) {
            PyBuffer_Release(view);
            return 0;
        }
    } else {
        return 0;
    }
    if (view->len != r->step_bytes) {
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

static PyObject *traj_append(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "traj_append(step, rings, i)");
        return NULL;
    }
    PyObject *step = args[0], *rings = args[1];
    long long i = PyLong_AsLongLong(args[2]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (!PyDict_CheckExact(step) || !PyDict_CheckExact(rings) || i < 0)
        Py_RETURN_FALSE;
    Py_ssize_t n = PyDict_GET_SIZE(step);
    if (n > MAX_APPEND_FIELDS)
        Py_RETURN_FALSE;
    TrajRingObject *dst[MAX_APPEND_FIELDS];
    Py_buffer views[MAX_APPEND_FIELDS];
    uint64_t numbers[MAX_APPEND_FIELDS]; /* Python numbers in their ring's dtype */
    Py_ssize_t got = 0, pos = 0;
    PyObject *name, *value;
    /* Check every value first: nothing is written unless all go in as they are. */
    while (PyDict_Next(step, &pos, &name, &value)) {
        PyObject *r = PyDict_GetItemWithError(rings, name);
        if (r == NULL || Py_TYPE(r) != &TrajRingType) {
            if (PyErr_Occurred())
                PyErr_Clear(); /* an unhashable name: the Python path says what is wrong */
            goto slow;
        }
        TrajRingObject *ring = (TrajRingObject *)r;
        views[got].obj = NULL;
        if (!python_number(ring, value, &numbers[got]) &&
            !ring_accepts(ring, value, &views[got]))
            goto slow;
        dst[got++] = ring;
    }
    for (Py_ssize_t k = 0; k < got; k++) {
        TrajRingObject *r = dst[k];
        const void *src = views[k].obj != NULL ? views[k].buf : (const void *)&numbers[k];
        memcpy((char *)r->view.buf + (size_t)(i % r->rows) * (size_t)r->step_bytes, src,
               (size_t)r->step_bytes);
        if (views[k].obj != NULL)
            PyBuffer_Release(&views[k]);
    }
    Py_RETURN_TRUE;
slow:
    for (Py_ssize_t k = 0; k < got; k++) {
        if (views[k].obj != NULL)
            PyBuffer_Release(&views[k]);
    }
    Py_RETURN_FALSE;
}

/* ---- NStepWindow: the n-step adder's window of rewards and discounts -------------------------
 *
 * NStepWindow(n, gamma) keeps the newest n (reward, discount) pairs in a ring. ``full()`` is the
 * return and bootstrap discount of the full window (shm_nstep_window), ``push(r, d)`` adds a
 * step (dropping the oldest of a full window), ``rewards()``/``discounts()`` list the window,
 * oldest first (for an episode's end), ``clear()`` empties it. One call per step in place of a
 * Python loop over the window. */

typedef struct {
    PyObject_HEAD double *rewards; /* rings of cap steps, the oldest at head */
    double *discounts;
    int64_t cap, head, len;
    double gamma;
} NStepWindowObject;

static void nstep_dealloc(NStepWindowObject *self) {
    PyMem_Free(self->rewards);
    PyMem_Free(self->discounts);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int nstep_init(NStepWindowObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"n", "gamma", NULL};
    long long n;
    double gamma;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Ld", kwlist, &n, &gamma))
        return -1;
    if (self->rewards != NULL) {
        PyErr_SetString(PyExc_TypeError, "NStepWindow is initialised once");
        return -1;
    }
    if (n < 1 || (unsigned long long)n > PY_SSIZE_T_MAX / sizeof(double)) {
        PyErr_Format(PyExc_ValueError, "NStepWindow: n must be >= 1, got %lld", n);
        return -1;
    }
    self->rewards = PyMem_Malloc((size_t)n * sizeof(double));
    self->discounts = PyMem_Malloc((size_t)n * sizeof(double));
    if (self->rewards == NULL || self->discounts == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->cap = n;
    self->head = self->len = 0;
    self->gamma = gamma;
    return 0;
}

static int nstep_ready(NStepWindowObject *self) {
    if (self->rewards != NULL)
        return 1;
    PyErr_SetString(PyExc_TypeError, "NStepWindow not initialised");
    return 0;
}

static PyObject *nstep_full(NStepWindowObject *self, PyObject *unused) {
    (void)unused;
    if (!nstep_ready(self))
        return NULL;
    double weight;
    double ret = shm_nstep_window(self->rewards, self->discounts, self->cap, self->head, self->len,
                                  self->gamma, &weight);
    return Py_BuildValue("(dd)", ret, weight);
}

static PyObject *nstep_push(NStepWindowObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "push(reward, discount)");
        return NULL;
    }
    if (!nstep_ready(self))
        return NULL;
    double r = PyFloat_AsDouble(args[0]), d = PyFloat_AsDouble(args[1]);
    if ((r == -1.0 || d == -1.0) && PyErr_Occurred())
        return NULL;
    if (self->len == self->cap) { /* full: the new step replaces the oldest */
        self->rewards[self->head] = r;
        self->discounts[self->head] = d;
        self->head = (self->head + 1) % self->cap;
    } else {
        int64_t at = (self->head + self->len) % self->cap;
        self->rewards[at] = r;
        self->discounts[at] = d;
        self->len++;
    }
    Py_RETURN_NONE;
}

static PyObject *nstep_list(NStepWindowObject *self, const double *values) {
    PyObject *out = PyList_New((Py_ssize_t)self->len);
    if (out == NULL)
        return NULL;
    for (int64_t k = 0; k < self->len; k++) {
        PyObject *v = PyFloat_FromDouble(values[(self->head + k) % self->cap]);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)k, v);
    }
    return out;
}

static PyObject *nstep_rewards(NStepWindowObject *self, PyObject *unused) {
    (void)unused;
    return nstep_ready(self) ? nstep_list(self, self->rewards) : NULL;
}

static PyObject *nstep_discounts(NStepWindowObject *self, PyObject *unused) {
    (void)unused;
    return nstep_ready(self) ? nstep_list(self, self->discounts) : NULL;
}

static PyObject *nstep_clear(NStepWindowObject *self, PyObject *unused) {
    (void)unused;
    self->head = self->len = 0;
    Py_RETURN_NONE;
}

static Py_ssize_t nstep_length(NStepWindowObject *self) {
    return (Py_ssize_t)self->len;
}

static PyMethodDef nstep_methods[] = {
    {"full", (PyCFunction)nstep_full, METH_NOARGS,
     "(R, D) of the window: sum_k w_k r_k and w_len, w_{k+1} = w_k * gamma * d_k."},
    {"push", (PyCFunction)(void (*)(void))nstep_push, METH_FASTCALL,
     "push(reward, discount): add the newest step (a full window drops its oldest)."},
    {"rewards", (PyCFunction)nstep_rewards, METH_NOARGS, "The window's rewards, oldest first."},
    {"discounts", (PyCFunction)nstep_discounts, METH_NOARGS,
     "The window's discounts, oldest first."},
    {"clear", (PyCFunction)nstep_clear, METH_NOARGS, "Empty the window."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods nstep_sequence = {
    .sq_length = (lenfunc)nstep_length,
};

static PyTypeObject NStepWindowType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.NStepWindow",
    .tp_basicsize = sizeof(NStepWindowObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "NStepWindow(n, gamma): the n-step adder's newest n rewards and discounts.",
    .tp_dealloc = (destructor)nstep_dealloc,
    .tp_init = (initproc)nstep_init,
    .tp_new = PyType_GenericNew,
    .tp_methods = nstep_methods,
    .tp_as_sequence = &nstep_sequence,
};

/* traj_batch_meta(priorities, episodes, prio_out, ep_out): a batch's priorities (a list of
 * floats) into prio_out (float64 [n]) and its episodes (a list of (id, first, last) int
 * tuples) into ep_out (int64 [n, 3]), for insert_batch: numpy takes ~50 us to read 128 tuples. */
static PyObject *traj_batch_meta(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "traj_batch_meta(priorities, episodes, prio_out, ep_out)");
        return NULL;
    }
    PyObject *prios = args[0], *eps = args[1];
    if (!PyList_CheckExact(prios) || !PyList_CheckExact(eps) ||
        PyList_GET_SIZE(prios) != PyList_GET_SIZE(eps)) {
        PyErr_SetString(PyExc_TypeError, "traj_batch_meta: two lists of the same length");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(prios);
    Py_buffer pv = {0}, ev = {0};
    PyObject *result = NULL;
    if (PyObject_GetBuffer(args[2], &pv, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &ev, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0)
        goto done;
    if (pv.len != n * (Py_ssize_t)sizeof(double) || ev.len != n * 3 * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_SetString(PyExc_ValueError, "traj_batch_meta: outputs of n and n x 3 items needed");
        goto done;
    }
    double *p = pv.buf;
    int64_t *e = ev.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        double v = PyFloat_AsDouble(PyList_GET_ITEM(prios, i));
        if (v == -1.0 && PyErr_Occurred())
            goto done;
        p[i] = v;
        PyObject *t = PyList_GET_ITEM(eps, i);
        if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 3) {
            PyErr_SetString(PyExc_TypeError, "traj_batch_meta: an episode is not a 3-tuple");
            goto done;
        }
        for (int k = 0; k < 3; k++) {
            long long x = PyLong_AsLongLong(PyTuple_GET_ITEM(t, k));
            if (x == -1 && PyErr_Occurred())
                goto done;
            e[3 * i + k] = x;
        }
    }
    result = Py_NewRef(Py_None);
done:
    if (pv.obj != NULL)
        PyBuffer_Release(&pv);
    if (ev.obj != NULL)
        PyBuffer_Release(&ev);
    return result;
}

static PyMethodDef traj_methods[] = {
    {"traj_gather", (PyCFunction)(void (*)(void))traj_gather, METH_FASTCALL,
     "traj_gather(ring, rows, starts, length, out): item i's length steps from starts[i] "
     "(ring row = step % rows, wrapping) copied into out[i]; out holds exactly the items. "
     "starts: a list of ints, or a tuple of ints and selections (their first steps)."},
    {"traj_batch_meta", (PyCFunction)(void (*)(void))traj_batch_meta, METH_FASTCALL,
     "traj_batch_meta(priorities, episodes, prio_out, ep_out): a batch's priorities and "
     "(id, first, last) episodes into float64 [n] and int64 [n, 3] arrays."},
    {"traj_fields", (PyCFunction)(void (*)(void))traj_fields, METH_FASTCALL,
     "traj_fields(trajectory, names, vcol, vlen, vkind, oldest, sel_type): (start steps, first "
     "step, last step) of an item made like the previous one, else None (check in Python)."},
    {"traj_append", (PyCFunction)(void (*)(void))traj_append, METH_FASTCALL,
     "traj_append(step, rings, i): True if every value of step (dict) was copied into row "
     "i % rows of rings[name] as it is; False (nothing written) otherwise."},
    {NULL, NULL, 0, NULL},
};

int shm_bind_trajectory(PyObject *module) {
    str_total = PyUnicode_InternFromString("_total");
    str_history_start = PyUnicode_InternFromString("_history_start");
    str_select_slow = PyUnicode_InternFromString("_select_slow");
    str_complete_since = PyUnicode_InternFromString("complete_since");
    if (str_total == NULL || str_history_start == NULL || str_select_slow == NULL ||
        str_complete_since == NULL)
        return -1;
    if (PyType_Ready(&TrajSelType) < 0 || PyType_Ready(&TrajHistoryType) < 0 ||
        PyType_Ready(&TrajRingType) < 0 || PyType_Ready(&NStepWindowType) < 0)
        return -1;
    if (PyModule_AddType(module, &TrajSelType) < 0 ||
        PyModule_AddType(module, &TrajHistoryType) < 0 ||
        PyModule_AddType(module, &TrajRingType) < 0 ||
        PyModule_AddType(module, &NStepWindowType) < 0)
        return -1;
    return PyModule_AddFunctions(module, traj_methods);
}
