/* Bindings of the trajectory concern: the batch gather of TrajectoryWriter._send_table.
 *
 * gather(ring, rows, starts, length, out) copies item i's ``length`` steps from ``starts[i]``
 * out of a column's history ring into out[i]: one call per field per batch, in place of the
 * numpy index arithmetic and take. ``starts`` is the list of Python ints the writer keeps.
 */
#include "shm_bind.h"

#include "shm_status.h"
#include "trajectory.h"

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
    if (!PyList_CheckExact(starts_obj)) {
        PyErr_SetString(PyExc_TypeError, "gather: starts must be a list of ints");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(starts_obj);
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
        long long s = PyLong_AsLongLong(PyList_GET_ITEM(starts_obj, i));
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

static PyMethodDef traj_methods[] = {
    {"traj_gather", (PyCFunction)(void (*)(void))traj_gather, METH_FASTCALL,
     "traj_gather(ring, rows, starts, length, out): item i's length steps from starts[i] "
     "(ring row = step % rows, wrapping) copied into out[i]; out holds exactly the items."},
    {NULL, NULL, 0, NULL},
};

int shm_bind_trajectory(PyObject *module) { return PyModule_AddFunctions(module, traj_methods); }
