/* Binding of the rate limiter: Limiter(params, ctrl) over a table's parameter and control
 * lines. The logic is in ratelimit.c. */
#include <string.h>

#include "ratelimit.h"
#include "shm_bind.h"
#include "shm_layout.h"
#include "shm_status.h"

typedef struct {
    PyObject_HEAD
    shm_limiter l;
    Py_buffer params, ctrl;
    int nviews;
} LimiterObject;

/* A 1-D view of 8-byte items of kind 'd' or 'i' (int64), strided (a column of the lines). */
static int get_column(PyObject *obj, Py_buffer *v, char kind, Py_ssize_t need, int64_t *stride,
                      const char *what) {
    if (PyObject_GetBuffer(obj, v, PyBUF_STRIDES | PyBUF_FORMAT) < 0)
        return -1;
    const char *f = v->format ? v->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    int ok = kind == 'd' ? strcmp(f, "d") == 0 : (strcmp(f, "l") == 0 || strcmp(f, "q") == 0);
    if (!ok || v->itemsize != 8 || v->ndim != 1 || v->strides[0] <= 0 || v->strides[0] % 8 ||
        v->shape[0] < need) {
        PyErr_Format(PyExc_TypeError, "%s must be a 1-D %s array of at least %zd items, with a "
                     "positive stride", what, kind == 'd' ? "float64" : "int64", need);
        PyBuffer_Release(v);
        return -1;
    }
    *stride = v->strides[0] / 8;
    return 0;
}

static void limiter_dealloc(LimiterObject *self) {
    if (self->nviews > 1)
        PyBuffer_Release(&self->ctrl);
    if (self->nviews > 0)
        PyBuffer_Release(&self->params);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int limiter_init(LimiterObject *self, PyObject *args, PyObject *kwds) {
    PyObject *params, *ctrl;
    (void)kwds;
    if (self->nviews) {
        PyErr_SetString(PyExc_RuntimeError, "Limiter is initialised once");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "OO:Limiter", &params, &ctrl))
        return -1;
    if (get_column(params, &self->params, 'd', SHM_PARAM_KIND + 1, &self->l.pstride,
                   "params") < 0)
        return -1;
    self->nviews = 1;
    if (get_column(ctrl, &self->ctrl, 'i', SHM_CTRL_DELETES + 1, &self->l.cstride, "ctrl") < 0)
        return -1;
    self->nviews = 2;
    self->l.params = self->params.buf;
    self->l.ctrl = self->ctrl.buf;
    return 0;
}

static int limiter_ready(LimiterObject *self) {
    if (self->nviews < 2) {
        PyErr_SetString(PyExc_RuntimeError, "Limiter is not initialised");
        return 0;
    }
    return 1;
}

static PyObject *allowance_result(int64_t k, const char *what) {
    if (k < 0) {
        PyErr_Format(PyExc_ValueError, "%s: the rate limiter's parameters or counters make no "
                     "sense (a NaN, or an infinite bound)", what);
        return NULL;
    }
    return PyLong_FromLongLong(k);
}

PyDoc_STRVAR(limiter_insert_doc,
             "insert_allowance(n, pending=0) -> int: how many of n inserts may go ahead, "
             "counting pending ones as already in. ValueError where the parameters make no "
             "sense (Python's arithmetic raised there).");

static PyObject *limiter_insert(LimiterObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (!limiter_ready(self))
        return NULL;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "insert_allowance(n, pending=0)");
        return NULL;
    }
    long long n = PyLong_AsLongLong(args[0]);
    long long pending = nargs > 1 ? PyLong_AsLongLong(args[1]) : 0;
    if (PyErr_Occurred())
        return NULL;
    if (n < 0 || pending < 0) {
        PyErr_SetString(PyExc_ValueError, "insert_allowance: n and pending must be >= 0");
        return NULL;
    }
    return allowance_result(shm_insert_allowance(&self->l, n, pending), "insert_allowance");
}

PyDoc_STRVAR(limiter_sample_doc,
             "sample_allowance(n) -> int: how many of n samples may go ahead now.");

static PyObject *limiter_sample(LimiterObject *self, PyObject *arg) {
    if (!limiter_ready(self))
        return NULL;
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "sample_allowance: n must be >= 0");
        return NULL;
    }
    return allowance_result(shm_sample_allowance(&self->l, n), "sample_allowance");
}

PyDoc_STRVAR(limiter_blocks_doc,
             "blocks_inserts() -> bool: whether inserts can be held back at all (MAX_DIFF is "
             "not +inf).");

static PyObject *limiter_blocks(LimiterObject *self, PyObject *unused) {
    (void)unused;
    if (!limiter_ready(self))
        return NULL;
    return PyBool_FromLong(shm_limiter_blocks_inserts(&self->l));
}

static PyMethodDef limiter_methods[] = {
    {"insert_allowance", (PyCFunction)(void (*)(void))limiter_insert, METH_FASTCALL,
     limiter_insert_doc},
    {"sample_allowance", (PyCFunction)limiter_sample, METH_O, limiter_sample_doc},
    {"blocks_inserts", (PyCFunction)limiter_blocks, METH_NOARGS, limiter_blocks_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LimiterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.Limiter",
    .tp_doc = PyDoc_STR("Limiter(params, ctrl): Reverb's rate limiter over a table's parameter "
                        "lines (float64, column 0) and control lines (int64, column 0); "
                        "csrc/ratelimit.h."),
    .tp_basicsize = sizeof(LimiterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)limiter_init,
    .tp_dealloc = (destructor)limiter_dealloc,
    .tp_methods = limiter_methods,
};

int shm_bind_ratelimit(PyObject *module) {
    if (PyModule_AddType(module, &LimiterType) < 0)
        return -1;
    return 0;
}
