/* Bindings of the random concern: SumTree, DenseSet and Prioritized types over a table's shared
 * arrays, plus weight() and priority_limit(). Each type borrows its shared arrays once, at
 * construction (released in dealloc), so a call parses only its own small arguments; outputs go
 * into arrays the caller allocates (no numpy C API). Logic: sumtree.c, dense.c,
 * random_selectors.c. */
#include "shm_bind.h"

#include <float.h>
#include <string.h>

#include "bind_selector.h"
#include "dense.h"
#include "random_selectors.h"
#include "shm_buffers.h"
#include "sumtree.h"

/* Batches at least this long run with the GIL released (shorter ones cost less than the
 * release). */
#define NOGIL_MIN 2048

/* ---- arguments ---------------------------------------------------------------------------- */

/* Set the exception of a status of sumtree.h; returns NULL. */
static PyObject *raise_status(int rc, const char *what, double total) {
    PyObject *cls;
    switch (rc) {
    case SHM_ECORRUPT:
        cls = shm_corrupt_structure();
        if (cls != NULL)
            PyErr_Format(cls, "%s: the shared arrays contradict themselves", what);
        break;
    case SHM_EEMPTY: {
        char *repr = PyOS_double_to_string(total, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (repr == NULL)
            break;
        PyErr_Format(PyExc_ValueError, "cannot sample from a sum-tree whose total weight is %s",
                     repr);
        PyMem_Free(repr);
        break;
    }
    case SHM_ENOMEM:
        PyErr_NoMemory();
        break;
    default:
        PyErr_Format(PyExc_ValueError, "%s: an index or count out of range", what);
    }
    return NULL;
}

/* ---- SumTree ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Py_buffer tree_view;
    shm_sumtree t;
} SumTreeObject;

static int borrow_tree(PyObject *arr, int64_t num_leaves, Py_buffer *view, shm_sumtree *t) {
    if (num_leaves < 0) {
        PyErr_SetString(PyExc_ValueError, "num_leaves must be >= 0");
        return -1;
    }
    int64_t cap = shm_sumtree_capacity(num_leaves);
    if (shm_get_array(arr, view, 'd', 1, "tree") < 0)
        return -1;
    if (shm_buffer_len(view) != 2 * cap) {
        PyErr_Format(PyExc_ValueError, "sum-tree needs float64[%lld], got %zd items",
                     (long long)(2 * cap), shm_buffer_len(view));
        PyBuffer_Release(view);
        return -1;
    }
    t->tree = view->buf;
    t->capacity = cap;
    t->num_leaves = num_leaves;
    return 0;
}

static PyObject *SumTree_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tree", "num_leaves", NULL};
    PyObject *arr;
    long long num_leaves;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OL", kwlist, &arr, &num_leaves))
        return NULL;
    SumTreeObject *self = (SumTreeObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (borrow_tree(arr, num_leaves, &self->tree_view, &self->t) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void SumTree_dealloc(SumTreeObject *self) {
    if (self->tree_view.obj != NULL)
        PyBuffer_Release(&self->tree_view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *SumTree_set(SumTreeObject *self, PyObject *const *args, Py_ssize_t nargs) {
    SHM_CHECK_NARGS("set", 2);
    Py_buffer lv, vv;
    if (shm_get_array(args[0], &lv, 'i', 0, "leaves") < 0)
        return NULL;
    if (shm_get_array(args[1], &vv, 'd', 0, "values") < 0) {
        PyBuffer_Release(&lv);
        return NULL;
    }
    int64_t n = shm_buffer_len(&lv), nv = shm_buffer_len(&vv);
    int rc;
    if (n >= NOGIL_MIN) {
        Py_BEGIN_ALLOW_THREADS
        rc = shm_sumtree_set(&self->t, lv.buf, n, vv.buf, nv);
        Py_END_ALLOW_THREADS
    } else {
        rc = shm_sumtree_set(&self->t, lv.buf, n, vv.buf, nv);
    }
    PyBuffer_Release(&lv);
    PyBuffer_Release(&vv);
    if (rc != SHM_OK)
        return raise_status(rc, "sum-tree set", 0.0);
    Py_RETURN_NONE;
}

static PyObject *SumTree_get(SumTreeObject *self, PyObject *const *args, Py_ssize_t nargs) {
    SHM_CHECK_NARGS("get", 2);
    Py_buffer lv, ov;
    if (shm_get_array(args[0], &lv, 'i', 0, "leaves") < 0)
        return NULL;
    if (shm_get_array(args[1], &ov, 'd', 1, "out") < 0) {
        PyBuffer_Release(&lv);
        return NULL;
    }
    int64_t n = shm_buffer_len(&lv);
    int rc = shm_buffer_len(&ov) == n ? shm_sumtree_get(&self->t, lv.buf, n, ov.buf) : SHM_EINVAL;
    PyBuffer_Release(&lv);
    PyBuffer_Release(&ov);
    if (rc != SHM_OK)
        return raise_status(rc, "sum-tree get", 0.0);
    Py_RETURN_NONE;
}

static PyObject *SumTree_sample(SumTreeObject *self, PyObject *const *args, Py_ssize_t nargs) {
    SHM_CHECK_NARGS("sample", 2);
    Py_buffer uv, ov;
    if (shm_get_array(args[0], &uv, 'd', 0, "u") < 0)
        return NULL;
    if (shm_get_array(args[1], &ov, 'i', 1, "out") < 0) {
        PyBuffer_Release(&uv);
        return NULL;
    }
    int64_t n = shm_buffer_len(&uv);
    int rc = SHM_EINVAL;
    if (shm_buffer_len(&ov) == n) {
        if (n >= NOGIL_MIN) {
            Py_BEGIN_ALLOW_THREADS
            rc = shm_sumtree_sample(&self->t, uv.buf, n, ov.buf);
            Py_END_ALLOW_THREADS
        } else {
            rc = shm_sumtree_sample(&self->t, uv.buf, n, ov.buf);
        }
    }
    PyBuffer_Release(&uv);
    PyBuffer_Release(&ov);
    if (rc != SHM_OK)
        return raise_status(rc, "sum-tree sample", self->t.tree[1]);
    Py_RETURN_NONE;
}

static PyObject *SumTree_rebuild(SumTreeObject *self, PyObject *arg) {
    Py_buffer vv;
    if (shm_get_array(arg, &vv, 'd', 0, "leaf_values") < 0)
        return NULL;
    if (shm_buffer_len(&vv) != self->t.num_leaves) {
        PyErr_Format(PyExc_ValueError, "rebuild needs %lld leaf values, got %zd",
                     (long long)self->t.num_leaves, shm_buffer_len(&vv));
        PyBuffer_Release(&vv);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    shm_sumtree_rebuild(&self->t, vv.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&vv);
    Py_RETURN_NONE;
}

static PyObject *SumTree_clear(SumTreeObject *self, PyObject *unused) {
    (void)unused;
    shm_sumtree_clear(&self->t);
    Py_RETURN_NONE;
}

static PyObject *SumTree_total(SumTreeObject *self, void *closure) {
    (void)closure;
    return PyFloat_FromDouble(self->t.tree[1]);
}

static PyMethodDef SumTree_methods[] = {
    {"set", (PyCFunction)(void (*)(void))SumTree_set, METH_FASTCALL,
     "set(leaves int64[n], values float64[n or 1]): in order (the last wins), then ancestors."},
    {"get", (PyCFunction)(void (*)(void))SumTree_get, METH_FASTCALL,
     "get(leaves int64[n], out float64[n]): the leaves' weights into out."},
    {"sample", (PyCFunction)(void (*)(void))SumTree_sample, METH_FASTCALL,
     "sample(u float64[n], out int64[n]): the leaf of each uniform u (see sumtree.h)."},
    {"rebuild", (PyCFunction)SumTree_rebuild, METH_O,
     "rebuild(leaf_values float64[num_leaves]): every leaf replaced, every node recomputed."},
    {"clear", (PyCFunction)SumTree_clear, METH_NOARGS, "clear(): every node and leaf 0."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef SumTree_getset[] = {
    {"total", (getter)SumTree_total, NULL, "The root: the sum of every weight.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SumTreeType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.SumTree",
    .tp_basicsize = sizeof(SumTreeObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SumTree(tree float64[2·capacity], num_leaves): the sum-tree over a shared array.",
    .tp_new = SumTree_new,
    .tp_dealloc = (destructor)SumTree_dealloc,
    .tp_methods = SumTree_methods,
    .tp_getset = SumTree_getset,
};

/* ---- DenseSet ----------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer views[3]; /* live, pos, count */
    int nviews;
    shm_dense d;
} DenseObject;

static void release_views(Py_buffer *views, int n) {
    for (int i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
}

/* Borrow live[num_slots], pos[num_slots], count[>= 1] into views (*nviews counts those held). */
static int borrow_dense(PyObject *live, PyObject *pos, PyObject *count, Py_buffer *views,
                        int *nviews, shm_dense *d) {
    PyObject *objs[3] = {live, pos, count};
    const char *names[3] = {"live", "pos", "count"};
    for (int i = 0; i < 3; i++) {
        if (shm_get_array(objs[i], &views[i], 'i', 1, names[i]) < 0)
            return -1;
        (*nviews)++;
    }
    Py_ssize_t num_slots = shm_buffer_len(&views[0]);
    if (shm_buffer_len(&views[1]) != num_slots || shm_buffer_len(&views[2]) < 1) {
        PyErr_SetString(PyExc_ValueError, "a dense set needs live and pos of one length, count[1]");
        return -1;
    }
    d->live = views[0].buf;
    d->pos = views[1].buf;
    d->count = views[2].buf;
    d->num_slots = num_slots;
    return 0;
}

static PyObject *Dense_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"live", "pos", "count", NULL};
    PyObject *live, *pos, *count;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO", kwlist, &live, &pos, &count))
        return NULL;
    DenseObject *self = (DenseObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (borrow_dense(live, pos, count, self->views, &self->nviews, &self->d) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void Dense_dealloc(DenseObject *self) {
    release_views(self->views, self->nviews);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* f(set, slots, n) for insert/remove/rebuild */
static PyObject *dense_slots_op(shm_dense *d, PyObject *arg,
                                int (*f)(shm_dense *, const int64_t *, int64_t),
                                const char *what) {
    Py_buffer sv;
    if (shm_get_array(arg, &sv, 'i', 0, "slots") < 0)
        return NULL;
    int64_t n = shm_buffer_len(&sv);
    int rc;
    if (n >= NOGIL_MIN) {
        Py_BEGIN_ALLOW_THREADS
        rc = f(d, sv.buf, n);
        Py_END_ALLOW_THREADS
    } else {
        rc = f(d, sv.buf, n);
    }
    PyBuffer_Release(&sv);
    if (rc != SHM_OK) {
        if (rc == SHM_ECORRUPT && f == shm_dense_remove) {
            PyObject *cls = shm_corrupt_structure();
            if (cls != NULL)
                PyErr_Format(cls, "a set of %lld items does not hold %lld of its members where it "
                             "says", (long long)d->count[0], (long long)n);
            return NULL;
        }
        return raise_status(rc, what, 0.0);
    }
    Py_RETURN_NONE;
}

static PyObject *Dense_insert(DenseObject *self, PyObject *arg) {
    return dense_slots_op(&self->d, arg, shm_dense_insert, "dense set insert");
}

static PyObject *Dense_remove(DenseObject *self, PyObject *arg) {
    return dense_slots_op(&self->d, arg, shm_dense_remove, "dense set remove");
}

static PyObject *Dense_rebuild(DenseObject *self, PyObject *arg) {
    return dense_slots_op(&self->d, arg, shm_dense_rebuild, "dense set rebuild");
}

static int dense_draw_any(shm_dense *d, const double *u, int64_t n, int64_t *out, int distinct) {
    return distinct ? shm_dense_draw_distinct(d, u, n, out) : shm_dense_draw(d, u, n, out);
}

/* draw / draw_distinct(u float64[n], out int64[n]) */
static PyObject *dense_draw_op(DenseObject *self, PyObject *const *args, Py_ssize_t nargs,
                               int distinct) {
    SHM_CHECK_NARGS("draw", 2);
    Py_buffer uv, ov;
    if (shm_get_array(args[0], &uv, 'd', 0, "u") < 0)
        return NULL;
    if (shm_get_array(args[1], &ov, 'i', 1, "out") < 0) {
        PyBuffer_Release(&uv);
        return NULL;
    }
    int64_t n = shm_buffer_len(&uv);
    int rc = SHM_EINVAL;
    if (shm_buffer_len(&ov) == n) {
        if (n >= NOGIL_MIN) {
            Py_BEGIN_ALLOW_THREADS
            rc = dense_draw_any(&self->d, uv.buf, n, ov.buf, distinct);
            Py_END_ALLOW_THREADS
        } else {
            rc = dense_draw_any(&self->d, uv.buf, n, ov.buf, distinct);
        }
    }
    PyBuffer_Release(&uv);
    PyBuffer_Release(&ov);
    if (rc != SHM_OK)
        return raise_status(rc, distinct ? "dense set draw_distinct" : "dense set draw", 0.0);
    Py_RETURN_NONE;
}

static PyObject *Dense_draw(DenseObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return dense_draw_op(self, args, nargs, 0);
}

static PyObject *Dense_draw_distinct(DenseObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return dense_draw_op(self, args, nargs, 1);
}

static PyObject *Dense_selector(DenseObject *self, PyObject *unused) {
    (void)unused;
    return shm_selector_capsule((PyObject *)self, SHM_SEL_UNIFORM, &self->d);
}

static PyObject *Dense_clear(DenseObject *self, PyObject *unused) {
    (void)unused;
    shm_dense_clear(&self->d);
    Py_RETURN_NONE;
}

static PyMethodDef Dense_methods[] = {
    {"insert", (PyCFunction)Dense_insert, METH_O, "insert(slots int64[n]): append new members."},
    {"remove", (PyCFunction)Dense_remove, METH_O,
     "remove(slots int64[n]): forget distinct members (CorruptStructure, nothing changed, when "
     "the arrays say one is not a member)."},
    {"rebuild", (PyCFunction)Dense_rebuild, METH_O, "rebuild(slots int64[n]): clear, insert."},
    {"draw", (PyCFunction)(void (*)(void))Dense_draw, METH_FASTCALL,
     "draw(u float64[n], out int64[n]): out[i] = live[min(floor(u[i]·count), count-1)]."},
    {"draw_distinct", (PyCFunction)(void (*)(void))Dense_draw_distinct, METH_FASTCALL,
     "draw_distinct(u float64[n], out int64[n]): n distinct members by a partial Fisher-Yates on "
     "live (see dense.h)."},
    {"clear", (PyCFunction)Dense_clear, METH_NOARGS, "clear(): count = 0."},
    {"_selector", (PyCFunction)Dense_selector, METH_NOARGS,
     "_selector() -> capsule: this set as a Uniform selector, for CommitTable.attach."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DenseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.DenseSet",
    .tp_basicsize = sizeof(DenseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "DenseSet(live int64[N], pos int64[N], count int64[>=1]): a dense set in shared "
              "memory.",
    .tp_new = Dense_new,
    .tp_dealloc = (destructor)Dense_dealloc,
    .tp_methods = Dense_methods,
};

/* ---- Prioritized -------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Py_buffer views[4]; /* live, pos, count, tree */
    int nviews;
    shm_prioritized s;
} PrioritizedObject;

static PyObject *Prioritized_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"tree", "live", "pos", "count", "exponent", NULL};
    PyObject *tree, *live, *pos, *count;
    double exponent;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOd", kwlist, &tree, &live, &pos, &count,
                                     &exponent))
        return NULL;
    PrioritizedObject *self = (PrioritizedObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (borrow_dense(live, pos, count, self->views, &self->nviews, &self->s.items) < 0 ||
        borrow_tree(tree, self->s.items.num_slots, &self->views[3], &self->s.tree) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->nviews = 4;
    self->s.exponent = exponent;
    return (PyObject *)self;
}

static void Prioritized_dealloc(PrioritizedObject *self) {
    release_views(self->views, self->nviews);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

typedef int (*prio_slots_fn)(shm_prioritized *, const int64_t *, const double *, int64_t);

/* f(selector, slots, priorities, n) for insert/update/rebuild */
static PyObject *prio_slots_op(PrioritizedObject *self, PyObject *const *args, Py_ssize_t nargs,
                               prio_slots_fn f, const char *what) {
    SHM_CHECK_NARGS("insert", 2);
    Py_buffer sv, pv;
    if (shm_get_array(args[0], &sv, 'i', 0, "slots") < 0)
        return NULL;
    if (shm_get_array(args[1], &pv, 'd', 0, "priorities") < 0) {
        PyBuffer_Release(&sv);
        return NULL;
    }
    int64_t n = shm_buffer_len(&sv);
    int rc = SHM_EINVAL;
    if (shm_buffer_len(&pv) == n) {
        if (n >= NOGIL_MIN) {
            Py_BEGIN_ALLOW_THREADS
            rc = f(&self->s, sv.buf, pv.buf, n);
            Py_END_ALLOW_THREADS
        } else {
            rc = f(&self->s, sv.buf, pv.buf, n);
        }
    }
    PyBuffer_Release(&sv);
    PyBuffer_Release(&pv);
    if (rc != SHM_OK)
        return raise_status(rc, what, 0.0);
    Py_RETURN_NONE;
}

static PyObject *Prioritized_insert(PrioritizedObject *self, PyObject *const *args,
                                    Py_ssize_t nargs) {
    return prio_slots_op(self, args, nargs, shm_prioritized_insert, "prioritized insert");
}

static PyObject *Prioritized_update(PrioritizedObject *self, PyObject *const *args,
                                    Py_ssize_t nargs) {
    return prio_slots_op(self, args, nargs, shm_prioritized_update, "prioritized update");
}

static PyObject *Prioritized_rebuild(PrioritizedObject *self, PyObject *const *args,
                                     Py_ssize_t nargs) {
    return prio_slots_op(self, args, nargs, shm_prioritized_rebuild, "prioritized rebuild");
}

static PyObject *Prioritized_remove(PrioritizedObject *self, PyObject *arg) {
    Py_buffer sv;
    if (shm_get_array(arg, &sv, 'i', 0, "slots") < 0)
        return NULL;
    int64_t n = shm_buffer_len(&sv);
    int rc = shm_prioritized_remove(&self->s, sv.buf, n);
    PyBuffer_Release(&sv);
    if (rc == SHM_ECORRUPT) {
        PyObject *cls = shm_corrupt_structure();
        if (cls != NULL)
            PyErr_Format(cls, "a set of %lld items does not hold %lld of its members where it says",
                         (long long)self->s.items.count[0], (long long)n);
        return NULL;
    }
    if (rc != SHM_OK)
        return raise_status(rc, "prioritized remove", 0.0);
    Py_RETURN_NONE;
}

static PyObject *Prioritized_sample(PrioritizedObject *self, PyObject *const *args,
                                    Py_ssize_t nargs) {
    SHM_CHECK_NARGS("sample", 3);
    Py_buffer uv, sv, pv;
    if (shm_get_array(args[0], &uv, 'd', 0, "u") < 0)
        return NULL;
    if (shm_get_array(args[1], &sv, 'i', 1, "slots") < 0) {
        PyBuffer_Release(&uv);
        return NULL;
    }
    if (shm_get_array(args[2], &pv, 'd', 1, "prob") < 0) {
        PyBuffer_Release(&uv);
        PyBuffer_Release(&sv);
        return NULL;
    }
    int64_t n = shm_buffer_len(&uv);
    int rc = SHM_EINVAL;
    if (shm_buffer_len(&sv) == n && shm_buffer_len(&pv) == n) {
        if (n >= NOGIL_MIN) {
            Py_BEGIN_ALLOW_THREADS
            rc = shm_prioritized_sample(&self->s, uv.buf, n, sv.buf, pv.buf);
            Py_END_ALLOW_THREADS
        } else {
            rc = shm_prioritized_sample(&self->s, uv.buf, n, sv.buf, pv.buf);
        }
    }
    PyBuffer_Release(&uv);
    PyBuffer_Release(&sv);
    PyBuffer_Release(&pv);
    if (rc != SHM_OK)
        return raise_status(rc, "prioritized sample", self->s.tree.tree[1]);
    Py_RETURN_NONE;
}

static PyObject *Prioritized_victims(PrioritizedObject *self, PyObject *const *args,
                                     Py_ssize_t nargs) {
    SHM_CHECK_NARGS("victims", 2);
    Py_buffer uv, ov;
    if (shm_get_array(args[0], &uv, 'd', 0, "u") < 0)
        return NULL;
    if (shm_get_array(args[1], &ov, 'i', 1, "out") < 0) {
        PyBuffer_Release(&uv);
        return NULL;
    }
    int64_t n = shm_buffer_len(&uv);
    int rc = SHM_EINVAL;
    if (shm_buffer_len(&ov) == n) {
        if (n >= NOGIL_MIN) {
            Py_BEGIN_ALLOW_THREADS
            rc = shm_prioritized_victims(&self->s, uv.buf, n, ov.buf);
            Py_END_ALLOW_THREADS
        } else {
            rc = shm_prioritized_victims(&self->s, uv.buf, n, ov.buf);
        }
    }
    PyBuffer_Release(&uv);
    PyBuffer_Release(&ov);
    if (rc != SHM_OK)
        return raise_status(rc, "prioritized victims", self->s.tree.tree[1]);
    Py_RETURN_NONE;
}

static PyObject *Prioritized_selector(PrioritizedObject *self, PyObject *unused) {
    (void)unused;
    return shm_selector_capsule((PyObject *)self, SHM_SEL_PRIORITIZED, &self->s);
}

static PyObject *Prioritized_clear(PrioritizedObject *self, PyObject *unused) {
    (void)unused;
    Py_BEGIN_ALLOW_THREADS
    shm_prioritized_clear(&self->s);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef Prioritized_methods[] = {
    {"insert", (PyCFunction)(void (*)(void))Prioritized_insert, METH_FASTCALL,
     "insert(slots int64[n], priorities float64[n]): new items."},
    {"update", (PyCFunction)(void (*)(void))Prioritized_update, METH_FASTCALL,
     "update(slots int64[n], priorities float64[n]): new priorities (the last wins)."},
    {"rebuild", (PyCFunction)(void (*)(void))Prioritized_rebuild, METH_FASTCALL,
     "rebuild(slots int64[n], priorities float64[n]): the items present, from scratch."},
    {"remove", (PyCFunction)Prioritized_remove, METH_O, "remove(slots int64[n]): forget items."},
    {"sample", (PyCFunction)(void (*)(void))Prioritized_sample, METH_FASTCALL,
     "sample(u float64[n], slots int64[n], prob float64[n]): n weighted draws (see "
     "random_selectors.h)."},
    {"victims", (PyCFunction)(void (*)(void))Prioritized_victims, METH_FASTCALL,
     "victims(u float64[n], out int64[n]): n distinct items, weighted without replacement."},
    {"clear", (PyCFunction)Prioritized_clear, METH_NOARGS, "clear(): forget every item."},
    {"_selector", (PyCFunction)Prioritized_selector, METH_NOARGS,
     "_selector() -> capsule: this selector, for CommitTable.attach."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PrioritizedType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.Prioritized",
    .tp_basicsize = sizeof(PrioritizedObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Prioritized(tree, live, pos, count, exponent): the prioritized selector's C "
              "state over its shared arrays.",
    .tp_new = Prioritized_new,
    .tp_dealloc = (destructor)Prioritized_dealloc,
    .tp_methods = Prioritized_methods,
};

/* ---- functions ---------------------------------------------------------------------------- */

static PyObject *py_weight(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    SHM_CHECK_NARGS("weight", 2);
    double p = PyFloat_AsDouble(args[0]), e = PyFloat_AsDouble(args[1]);
    if (PyErr_Occurred())
        return NULL;
    return PyFloat_FromDouble(shm_weight(p, e));
}

static PyObject *py_priority_limit(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    SHM_CHECK_NARGS("priority_limit", 2);
    double e = PyFloat_AsDouble(args[0]), w_max = PyFloat_AsDouble(args[1]);
    if (PyErr_Occurred())
        return NULL;
    return PyFloat_FromDouble(shm_priority_limit(e, w_max));
}

static PyObject *py_last_wins(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    SHM_CHECK_NARGS("last_wins_mask", 2);
    Py_buffer kv, mv;
    if (shm_get_array(args[0], &kv, 'i', 0, "keys") < 0)
        return NULL;
    if (shm_get_buffer(args[1], &mv, 1, 1, "keep") < 0) {
        PyBuffer_Release(&kv);
        return NULL;
    }
    int64_t n = shm_buffer_len(&kv), kept = SHM_EINVAL;
    if (shm_buffer_len(&mv) == n)
        kept = shm_last_wins(kv.buf, n, mv.buf);
    PyBuffer_Release(&kv);
    PyBuffer_Release(&mv);
    if (kept < 0)
        return raise_status((int)kept, "last_wins_mask", 0.0);
    return PyLong_FromLongLong(kept);
}

static PyMethodDef random_functions[] = {
    {"last_wins_mask", (PyCFunction)(void (*)(void))py_last_wins, METH_FASTCALL,
     "last_wins_mask(keys int64[n], keep bool[n]) -> int: keep[i] true for the last occurrence "
     "of each key; returns how many are kept."},
    {"weight", (PyCFunction)(void (*)(void))py_weight, METH_FASTCALL,
     "weight(p, exponent) -> float: p**exponent as the prioritized selector computes it."},
    {"priority_limit", (PyCFunction)(void (*)(void))py_priority_limit, METH_FASTCALL,
     "priority_limit(exponent, w_max) -> float: the largest p with weight(p) <= w_max."},
    {NULL, NULL, 0, NULL},
};

int shm_bind_random(PyObject *module) {
    if (PyModule_AddFunctions(module, random_functions) < 0)
        return -1;
    PyTypeObject *types[] = {&SumTreeType, &DenseType, &PrioritizedType};
    const char *names[] = {"SumTree", "DenseSet", "Prioritized"};
    for (int i = 0; i < 3; i++) {
        if (PyType_Ready(types[i]) < 0)
            return -1;
        Py_INCREF(types[i]);
        if (PyModule_AddObject(module, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            return -1;
        }
    }
    return 0;
}
