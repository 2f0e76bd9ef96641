/* shmreplay.engine._native: the compiled engine, one module assembled from per-concern bindings.
 */
#include "shm_bind.h"

#include "shm_atomics.h"

static PyObject *build_info(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("{s:s,s:i,s:s}", "compiler", __VERSION__, "c_standard",
                         (int)__STDC_VERSION__, "atomics",
                         ATOMIC_LLONG_LOCK_FREE == 2 ? "lock-free" : "not lock-free");
}

static PyMethodDef module_methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "build_info() -> dict: the compiler, C standard and atomics the engine was built with."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "shmreplay.engine._native",
    .m_doc = "The compiled shared-memory engine of shmreplay (see shmreplay.engine).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    if (shm_bind_random(m) < 0 || shm_bind_ordered(m) < 0 || shm_bind_writer(m) < 0 ||
        shm_bind_commit(m) < 0 || shm_bind_sample(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
