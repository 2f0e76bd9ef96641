/* Bindings of the ordered concern: OrderRing (Fifo/Lifo's insertion-order ring) and Heap
 * (MinHeap/MaxHeap's tournament tree) types over a selector's shared arrays. Each borrows its
 * arrays once, at construction (released in dealloc), so a call parses only its own small
 * arguments; outputs go into arrays the caller allocates (no numpy C API). Logic: order.c,
 * heap.c. */
#include "shm_bind.h"

#include <string.h>

#include "bind_selector.h"
#include "heap.h"
#include "order.h"
#include "shm_buffers.h"

/* Batches at least this long run with the GIL released (shorter ones cost less than the
 * release). */
#define NOGIL_MIN 4096

/* Set the exception of a status of order.h; returns NULL. */
static PyObject *raise_status(int rc, const char *what) {
    PyObject *corrupt;
    switch (rc) {
    case SHM_ORDER_ECORRUPT:
        corrupt = shm_corrupt_structure();
        if (corrupt == NULL)
            return NULL;
        PyErr_Format(corrupt, "its %s contradicts itself", what);
        break;
    case SHM_ORDER_ENOMEM:
        PyErr_NoMemory();
        break;
    default:
        PyErr_Format(PyExc_IndexError, "%s: a slot or count out of range", what);
    }
    return NULL;
}

/* ---- OrderRing ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    shm_order o;
    Py_buffer order, pos, ends;
    int have; /* buffers held */
} OrderRingObject;

static void OrderRing_dealloc(OrderRingObject *self) {
    if (self->have) {
        PyBuffer_Release(&self->order);
        PyBuffer_Release(&self->pos);
        PyBuffer_Release(&self->ends);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int OrderRing_init(OrderRingObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"order", "pos", "ends", NULL};
    PyObject *order, *pos, *ends;
    if (self->have) {
        PyErr_SetString(PyExc_RuntimeError, "OrderRing is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO", kwlist, &order, &pos, &ends))
        return -1;
    if (shm_get_array(order, &self->order, 'i', 1, "order") < 0)
        return -1;
    if (shm_get_array(pos, &self->pos, 'i', 1, "pos") < 0) {
        PyBuffer_Release(&self->order);
        return -1;
    }
    if (shm_get_array(ends, &self->ends, 'i', 1, "ends") < 0) {
        PyBuffer_Release(&self->order);
        PyBuffer_Release(&self->pos);
        return -1;
    }
    self->have = 1;
    Py_ssize_t slots = shm_buffer_len(&self->pos);
    if (slots < 1 || shm_buffer_len(&self->order) != 2 * slots ||
        shm_buffer_len(&self->ends) != 16) {
        PyErr_SetString(PyExc_ValueError, "OrderRing needs order[2n], pos[n] and ends[2, 8]");
        return -1;
    }
    int64_t *e = self->ends.buf;
    self->o = (shm_order){self->order.buf, 2 * slots, self->pos.buf, slots, &e[0], &e[8]};
    return 0;
}

static int ring_ready(OrderRingObject *self) {
    if (!self->have || self->o.order == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "OrderRing is not initialised");
        return 0;
    }
    return 1;
}

typedef int (*order_slots_fn)(shm_order *, const int64_t *, int64_t);

static PyObject *order_call(OrderRingObject *self, PyObject *const *args, Py_ssize_t nargs,
                            order_slots_fn f, const char *name) {
    if (nargs != 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes 1 argument (%zd given)", name, nargs);
        return NULL;
    }
    if (!ring_ready(self))
        return NULL;
    Py_buffer s;
    if (shm_get_array(args[0], &s, 'i', 0, "slots") < 0)
        return NULL;
    int64_t k = shm_buffer_len(&s);
    int rc;
    if (k >= NOGIL_MIN) {
        Py_BEGIN_ALLOW_THREADS rc = f(&self->o, s.buf, k);
        Py_END_ALLOW_THREADS
    } else {
        rc = f(&self->o, s.buf, k);
    }
    PyBuffer_Release(&s);
    if (rc != SHM_ORDER_OK)
        return raise_status(rc, "order ring");
    Py_RETURN_NONE;
}

static PyObject *OrderRing_insert(OrderRingObject *self, PyObject *const *args, Py_ssize_t n) {
    return order_call(self, args, n, shm_order_insert, "insert");
}

static PyObject *OrderRing_remove(OrderRingObject *self, PyObject *const *args, Py_ssize_t n) {
    return order_call(self, args, n, shm_order_remove, "remove");
}

static PyObject *OrderRing_rebuild(OrderRingObject *self, PyObject *const *args, Py_ssize_t n) {
    return order_call(self, args, n, shm_order_rebuild, "rebuild");
}

typedef int (*order_first_fn)(shm_order *, int64_t, int64_t *, int64_t *);

/* first_*(n, out) -> the number of slots written to out[:n]. */
static PyObject *order_first(OrderRingObject *self, PyObject *const *args, Py_ssize_t nargs,
                             order_first_fn f) {
    SHM_CHECK_NARGS("first", 2);
    if (!ring_ready(self))
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[0]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer out;
    if (shm_get_array(args[1], &out, 'i', 1, "out") < 0)
        return NULL;
    if (n < 0 || n > shm_buffer_len(&out)) {
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "first(): n must be in 0..len(out)");
        return NULL;
    }
    int64_t got = 0;
    int rc;
    if (n >= NOGIL_MIN) {
        Py_BEGIN_ALLOW_THREADS rc = f(&self->o, n, out.buf, &got);
        Py_END_ALLOW_THREADS
    } else {
        rc = f(&self->o, n, out.buf, &got);
    }
    PyBuffer_Release(&out);
    if (rc != SHM_ORDER_OK)
        return raise_status(rc, "order ring");
    return PyLong_FromLongLong(got);
}

static PyObject *OrderRing_first_fifo(OrderRingObject *self, PyObject *const *a, Py_ssize_t n) {
    return order_first(self, a, n, shm_order_first_fifo);
}

static PyObject *OrderRing_first_lifo(OrderRingObject *self, PyObject *const *a, Py_ssize_t n) {
    return order_first(self, a, n, shm_order_first_lifo);
}

static PyObject *OrderRing_selector(OrderRingObject *self, PyObject *lifo) {
    if (!ring_ready(self))
        return NULL;
    int is_lifo = PyObject_IsTrue(lifo);
    if (is_lifo < 0)
        return NULL;
    return shm_selector_capsule((PyObject *)self, is_lifo ? SHM_SEL_LIFO : SHM_SEL_FIFO,
                                &self->o);
}

static PyObject *OrderRing_clear(OrderRingObject *self, PyObject *unused) {
    (void)unused;
    if (!ring_ready(self))
        return NULL;
    shm_order_clear(&self->o);
    Py_RETURN_NONE;
}

static PyMethodDef OrderRing_methods[] = {
    {"insert", (PyCFunction)(void (*)(void))OrderRing_insert, METH_FASTCALL,
     "insert(slots): append slots (int64) in order, compacting the ring first if needed."},
    {"remove", (PyCFunction)(void (*)(void))OrderRing_remove, METH_FASTCALL,
     "remove(slots): punch the holes of present, distinct slots."},
    {"rebuild", (PyCFunction)(void (*)(void))OrderRing_rebuild, METH_FASTCALL,
     "rebuild(slots): clear, then insert the items present in insertion order."},
    {"first_fifo", (PyCFunction)(void (*)(void))OrderRing_first_fifo, METH_FASTCALL,
     "first_fifo(n, out) -> int: the n oldest slots into out, dropping leading holes."},
    {"first_lifo", (PyCFunction)(void (*)(void))OrderRing_first_lifo, METH_FASTCALL,
     "first_lifo(n, out) -> int: the n newest slots into out, dropping trailing holes."},
    {"clear", (PyCFunction)OrderRing_clear, METH_NOARGS, "clear(): forget every item."},
    {"_selector", (PyCFunction)OrderRing_selector, METH_O,
     "_selector(lifo) -> capsule: this ring as a Fifo (or Lifo) selector, for "
     "CommitTable.attach."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject OrderRingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.OrderRing",
    .tp_doc = "OrderRing(order, pos, ends): Fifo/Lifo's insertion-order ring over shared arrays.",
    .tp_basicsize = sizeof(OrderRingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)OrderRing_init,
    .tp_dealloc = (destructor)OrderRing_dealloc,
    .tp_methods = OrderRing_methods,
};

/* ---- Heap ----------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    shm_heap h;
    Py_buffer nodes, clock;
    int have; /* buffers held */
    int ready;
} HeapObject;

static void Heap_dealloc(HeapObject *self) {
    if (self->have) {
        PyBuffer_Release(&self->nodes);
        PyBuffer_Release(&self->clock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Heap_init(HeapObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"nodes", "clock", "num_slots", "sign", NULL};
    PyObject *nodes, *clock;
    Py_ssize_t num_slots;
    double sign;
    if (self->have) {
        PyErr_SetString(PyExc_RuntimeError, "Heap is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOnd", kwlist, &nodes, &clock, &num_slots,
                                     &sign))
        return -1;
    if (shm_get_array(nodes, &self->nodes, 'i', 1, "nodes") < 0)
        return -1;
    if (shm_get_array(clock, &self->clock, 'i', 1, "clock") < 0) {
        PyBuffer_Release(&self->nodes);
        return -1;
    }
    self->have = 1;
    Py_ssize_t words = shm_buffer_len(&self->nodes);
    if (words % 3 != 0 || shm_buffer_len(&self->clock) < 1 ||
        shm_heap_init(&self->h, self->nodes.buf, words / 3, self->clock.buf, num_slots, sign) !=
            SHM_ORDER_OK) {
        PyErr_SetString(PyExc_ValueError, "Heap: nodes must be int64[shm_heap_nodes(num_slots), "
                                          "3] and clock int64[>= 1]");
        return -1;
    }
    self->ready = 1;
    return 0;
}

static int heap_ready(HeapObject *self) {
    if (!self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Heap is not initialised");
        return 0;
    }
    return 1;
}

typedef int (*heap_prio_fn)(shm_heap *, const int64_t *, const double *, int64_t);

static PyObject *heap_call(HeapObject *self, PyObject *const *args, Py_ssize_t nargs,
                           heap_prio_fn f, const char *name) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes 2 arguments (%zd given)", name, nargs);
        return NULL;
    }
    if (!heap_ready(self))
        return NULL;
    Py_buffer s, p;
    if (shm_get_array(args[0], &s, 'i', 0, "slots") < 0)
        return NULL;
    if (shm_get_array(args[1], &p, 'd', 0, "priorities") < 0) {
        PyBuffer_Release(&s);
        return NULL;
    }
    int64_t k = shm_buffer_len(&s);
    if (shm_buffer_len(&p) != k) {
        PyBuffer_Release(&s);
        PyBuffer_Release(&p);
        PyErr_Format(PyExc_ValueError, "%s(): slots and priorities differ in length", name);
        return NULL;
    }
    int rc;
    if (k >= NOGIL_MIN || f == shm_heap_rebuild) {
        Py_BEGIN_ALLOW_THREADS rc = f(&self->h, s.buf, p.buf, k);
        Py_END_ALLOW_THREADS
    } else {
        rc = f(&self->h, s.buf, p.buf, k);
    }
    PyBuffer_Release(&s);
    PyBuffer_Release(&p);
    if (rc != SHM_ORDER_OK)
        return raise_status(rc, "heap");
    Py_RETURN_NONE;
}

static PyObject *Heap_insert(HeapObject *self, PyObject *const *args, Py_ssize_t n) {
    return heap_call(self, args, n, shm_heap_insert, "insert");
}

static PyObject *Heap_update(HeapObject *self, PyObject *const *args, Py_ssize_t n) {
    return heap_call(self, args, n, shm_heap_update, "update");
}

static PyObject *Heap_rebuild(HeapObject *self, PyObject *const *args, Py_ssize_t n) {
    return heap_call(self, args, n, shm_heap_rebuild, "rebuild");
}

static PyObject *Heap_remove(HeapObject *self, PyObject *const *args, Py_ssize_t nargs) {
    SHM_CHECK_NARGS("remove", 1);
    if (!heap_ready(self))
        return NULL;
    Py_buffer s;
    if (shm_get_array(args[0], &s, 'i', 0, "slots") < 0)
        return NULL;
    int64_t k = shm_buffer_len(&s);
    int rc;
    if (k >= NOGIL_MIN) {
        Py_BEGIN_ALLOW_THREADS rc = shm_heap_remove(&self->h, s.buf, k);
        Py_END_ALLOW_THREADS
    } else {
        rc = shm_heap_remove(&self->h, s.buf, k);
    }
    PyBuffer_Release(&s);
    if (rc != SHM_ORDER_OK)
        return raise_status(rc, "heap");
    Py_RETURN_NONE;
}

/* first(n, out) -> the number of slots written to out[:n], best first. */
static PyObject *Heap_first(HeapObject *self, PyObject *const *args, Py_ssize_t nargs) {
    SHM_CHECK_NARGS("first", 2);
    if (!heap_ready(self))
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[0]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer out;
    if (shm_get_array(args[1], &out, 'i', 1, "out") < 0)
        return NULL;
    if (n < 0 || n > shm_buffer_len(&out)) {
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "first(): n must be in 0..len(out)");
        return NULL;
    }
    int64_t got = 0;
    int rc;
    if (n >= 64) {
        Py_BEGIN_ALLOW_THREADS rc = shm_heap_first(&self->h, n, out.buf, &got);
        Py_END_ALLOW_THREADS
    } else {
        rc = shm_heap_first(&self->h, n, out.buf, &got);
    }
    PyBuffer_Release(&out);
    if (rc != SHM_ORDER_OK)
        return raise_status(rc, "heap");
    return PyLong_FromLongLong(got);
}

static PyObject *Heap_selector(HeapObject *self, PyObject *unused) {
    (void)unused;
    if (!heap_ready(self))
        return NULL;
    return shm_selector_capsule((PyObject *)self, SHM_SEL_HEAP, &self->h);
}

static PyObject *Heap_clear(HeapObject *self, PyObject *unused) {
    (void)unused;
    if (!heap_ready(self))
        return NULL;
    Py_BEGIN_ALLOW_THREADS shm_heap_clear(&self->h);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef Heap_methods[] = {
    {"insert", (PyCFunction)(void (*)(void))Heap_insert, METH_FASTCALL,
     "insert(slots, priorities): new items, touched in batch order."},
    {"update", (PyCFunction)(void (*)(void))Heap_update, METH_FASTCALL,
     "update(slots, priorities): new priorities; a repeated slot keeps its last one."},
    {"remove", (PyCFunction)(void (*)(void))Heap_remove, METH_FASTCALL,
     "remove(slots): forget items."},
    {"rebuild", (PyCFunction)(void (*)(void))Heap_rebuild, METH_FASTCALL,
     "rebuild(slots, priorities): the tree from the items present, keeping plausible touches."},
    {"first", (PyCFunction)(void (*)(void))Heap_first, METH_FASTCALL,
     "first(n, out) -> int: the n best slots into out, best first."},
    {"clear", (PyCFunction)Heap_clear, METH_NOARGS, "clear(): forget every item."},
    {"_selector", (PyCFunction)Heap_selector, METH_NOARGS,
     "_selector() -> capsule: this heap, for CommitTable.attach."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject HeapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmreplay.engine._native.Heap",
    .tp_doc = "Heap(nodes, clock, num_slots, sign): the tournament tree of MinHeap (sign 1) "
              "and MaxHeap (sign -1) over shared arrays (nodes: int64[n, 3] records of key "
              "(float64 bits), touch, slot).",
    .tp_basicsize = sizeof(HeapObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Heap_init,
    .tp_dealloc = (destructor)Heap_dealloc,
    .tp_methods = Heap_methods,
};

int shm_bind_ordered(PyObject *module) {
    if (PyType_Ready(&OrderRingType) < 0 || PyType_Ready(&HeapType) < 0)
        return -1;
    if (PyModule_AddObjectRef(module, "OrderRing", (PyObject *)&OrderRingType) < 0 ||
        PyModule_AddObjectRef(module, "Heap", (PyObject *)&HeapType) < 0)
        return -1;
    return 0;
}
