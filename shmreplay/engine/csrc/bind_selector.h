/* How a selector's binding type hands its C struct to the commit table: a PyCapsule named
 * SHM_SELECTOR_CAPSULE holding a malloc'd shm_selector {kind, impl}, whose context is the
 * selector object (a strong reference: impl points into it, so it lives as long as the
 * capsule, and the commit table holds the capsule). */
#ifndef SHM_BIND_SELECTOR_H
#define SHM_BIND_SELECTOR_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

#include "selector.h"

#define SHM_SELECTOR_CAPSULE "shmreplay.engine.selector"

static void shm_selector_capsule_free(PyObject *capsule) {
    free(PyCapsule_GetPointer(capsule, SHM_SELECTOR_CAPSULE));
    Py_XDECREF((PyObject *)PyCapsule_GetContext(capsule));
}

static inline PyObject *shm_selector_capsule(PyObject *owner, int kind, void *impl) {
    shm_selector *s = malloc(sizeof *s);
    if (s == NULL)
        return PyErr_NoMemory();
    s->kind = kind;
    s->impl = impl;
    PyObject *cap = PyCapsule_New(s, SHM_SELECTOR_CAPSULE, shm_selector_capsule_free);
    if (cap == NULL) {
        free(s);
        return NULL;
    }
    Py_INCREF(owner);
    if (PyCapsule_SetContext(cap, owner) < 0) {
        Py_DECREF(owner);
        Py_DECREF(cap);
        return NULL;
    }
    return cap;
}

#endif
