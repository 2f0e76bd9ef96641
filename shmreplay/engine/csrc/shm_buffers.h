/* Thin-binding helpers: borrow a numpy array's memory through the buffer protocol, checked.
 *
 * A binding takes its arrays as objects exporting the buffer protocol (numpy arrays, views of a
 * shared-memory segment), checks item size and contiguity once, and hands plain pointers to the
 * plain C functions. No numpy C API: the extension builds without numpy's headers.
 */
#ifndef SHM_BUFFERS_H
#define SHM_BUFFERS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Fill ``view`` with the C-contiguous memory of ``obj`` whose items are ``itemsize`` bytes
 * (``writable``: it will be written). On failure sets a TypeError/ValueError naming ``what``
 * and returns -1 (nothing to release). Release with PyBuffer_Release. */
static inline int shm_get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize,
                                 int writable, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s array", what,
                     writable ? " writable" : "");
        return -1;
    }
    if (view->itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s must have %zd-byte items, got %zd-byte items", what,
                     itemsize, view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* Items in a buffer filled by shm_get_buffer. */
static inline Py_ssize_t shm_buffer_len(const Py_buffer *view) {
    return view->len / view->itemsize;
}

/* Like shm_get_buffer, for 8-byte items of one kind: 'i' int64 or 'd' float64 (numpy's buffer
 * formats "l"/"q" and "d", with or without a byte-order prefix). */
static inline int shm_get_array(PyObject *obj, Py_buffer *view, char kind, int writable,
                                const char *what) {
    if (shm_get_buffer(obj, view, 8, writable, what) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    int ok = kind == 'd' ? strcmp(f, "d") == 0 : (strcmp(f, "l") == 0 || strcmp(f, "q") == 0);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s must be %s", what, kind == 'd' ? "float64" : "int64");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* shmreplay.engine.selectors.base.CorruptStructure (looked up once per binding file, borrowed), or NULL
 * with an exception set: what a selector binding raises when its shared arrays contradict
 * themselves, so that the table rebuilds them. */
static inline PyObject *shm_corrupt_structure(void) {
    static PyObject *cls = NULL;
    if (cls == NULL) {
        PyObject *mod = PyImport_ImportModule("shmreplay.engine.selectors.base");
        if (mod == NULL)
            return NULL;
        cls = PyObject_GetAttrString(mod, "CorruptStructure");
        Py_DECREF(mod);
    }
    return cls;
}

/* A METH_FASTCALL function's argument count, checked. */
#define SHM_CHECK_NARGS(name, want)                                                          \
    if (nargs != (want)) {                                                                   \
        PyErr_Format(PyExc_TypeError, name "() takes %d arguments (%zd given)", (want), nargs); \
        return NULL;                                                                         \
    }

#endif
