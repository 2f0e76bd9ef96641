/* shmreplay.engine._native: the compiled engine, one module assembled from per-concern bindings.
 */
#include "shm_bind.h"

#include "shm_atomics.h"
#include "shm_layout.h"

static PyObject *build_info(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return Py_BuildValue("{s:s,s:i,s:s}", "compiler", __VERSION__, "c_standard",
                         (int)__STDC_VERSION__, "atomics",
                         ATOMIC_LLONG_LOCK_FREE == 2 ? "lock-free" : "not lock-free");
}

/* shm_layout.h, exported: layout.py takes the segment's fixed layout from here (one definition). */
static const struct {
    const char *name;
    long value;
} layout_constants[] = {
    {"LINE", SHM_LINE},
    {"LEASE_CAPACITY", SHM_LEASE_CAPACITY},
    {"PUBLISH_CAPACITY", SHM_PUBLISH_CAPACITY},
    {"LEASE_LOW_WATER", SHM_LEASE_LOW_WATER},
    {"PARAM_SAMPLES_PER_INSERT", SHM_PARAM_SAMPLES_PER_INSERT},
    {"PARAM_MIN_SIZE_TO_SAMPLE", SHM_PARAM_MIN_SIZE_TO_SAMPLE},
    {"PARAM_MIN_DIFF", SHM_PARAM_MIN_DIFF},
    {"PARAM_MAX_DIFF", SHM_PARAM_MAX_DIFF},
    {"PARAM_KIND", SHM_PARAM_KIND},
    {"PARAM_COUNT", SHM_PARAM_COUNT},
    {"CTRL_INSERTS", SHM_CTRL_INSERTS},
    {"CTRL_SAMPLES", SHM_CTRL_SAMPLES},
    {"CTRL_DELETES", SHM_CTRL_DELETES},
    {"CTRL_SIZE", SHM_CTRL_SIZE},
    {"CTRL_SEQ", SHM_CTRL_SEQ},
    {"CTRL_FREE_HEAD", SHM_CTRL_FREE_HEAD},
    {"CTRL_FREE_TAIL", SHM_CTRL_FREE_TAIL},
    {"CTRL_SHUTDOWN", SHM_CTRL_SHUTDOWN},
    {"CTRL_DAEMON_PID", SHM_CTRL_DAEMON_PID},
    {"CTRL_DAEMON_SLEEPING", SHM_CTRL_DAEMON_SLEEPING},
    {"CTRL_TOTAL_INSERTED", SHM_CTRL_TOTAL_INSERTED},
    {"CTRL_TOTAL_SAMPLED", SHM_CTRL_TOTAL_SAMPLED},
    {"CTRL_REPAIRS", SHM_CTRL_REPAIRS},
    {"CTRL_RESETS", SHM_CTRL_RESETS},
    {"CTRL_UNIQUE_SAMPLED", SHM_CTRL_UNIQUE_SAMPLED},
    {"CTRL_COMMITS", SHM_CTRL_COMMITS},
    {"CTRL_READY", SHM_CTRL_READY},
    {"CTRL_TOTAL_EVICTED", SHM_CTRL_TOTAL_EVICTED},
    {"CTRL_SAMPLER_WAITING", SHM_CTRL_SAMPLER_WAITING},
    {"CTRL_EPISODES", SHM_CTRL_EPISODES},
    {"CTRL_DAEMON_START", SHM_CTRL_DAEMON_START},
    {"CTRL_TABLE_STATE", SHM_CTRL_TABLE_STATE},
    {"CTRL_COUNT", SHM_CTRL_COUNT},
    {"CHAN_PID", SHM_CHAN_PID},
    {"CHAN_LEASE_HEAD", SHM_CHAN_LEASE_HEAD},
    {"CHAN_LEASE_TAIL", SHM_CHAN_LEASE_TAIL},
    {"CHAN_PUB_HEAD", SHM_CHAN_PUB_HEAD},
    {"CHAN_PUB_TAIL", SHM_CHAN_PUB_TAIL},
    {"CHAN_WANT_LEASE", SHM_CHAN_WANT_LEASE},
    {"CHAN_WAIT_SAMPLE", SHM_CHAN_WAIT_SAMPLE},
    {"CHAN_WAIT_INSERT", SHM_CHAN_WAIT_INSERT},
    {"CHAN_COUNT", SHM_CHAN_COUNT},
    {"SLOT_FREE", SHM_SLOT_FREE},
    {"SLOT_LEASED", SHM_SLOT_LEASED},
    {"SLOT_READY", SHM_SLOT_READY},
    {"SLOT_RELEASING", SHM_SLOT_RELEASING},
    {"SLEEP_AWAKE", SHM_SLEEP_AWAKE},
    {"SLEEP_NAP", SHM_SLEEP_NAP},
    {"SLEEP_IDLE", SHM_SLEEP_IDLE},
    {"TABLE_OK", SHM_TABLE_OK},
    {"TABLE_QUARANTINED", SHM_TABLE_QUARANTINED},
};

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
    for (size_t i = 0; i < sizeof layout_constants / sizeof layout_constants[0]; i++) {
        if (PyModule_AddIntConstant(m, layout_constants[i].name, layout_constants[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    if (shm_bind_random(m) < 0 || shm_bind_ordered(m) < 0 || shm_bind_writer(m) < 0 ||
        shm_bind_commit(m) < 0 || shm_bind_sample(m) < 0 || shm_bind_trajectory(m) < 0 ||
        shm_bind_ratelimit(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
