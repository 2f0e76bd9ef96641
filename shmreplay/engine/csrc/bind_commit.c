/* Bindings of the commit concern (filled in by its implementation). */
#include "shm_bind.h"

int shm_bind_commit(PyObject *module) {
    (void)module;
    return 0;
}
