/* Bindings of the writer concern (filled in by its implementation). */
#include "shm_bind.h"

int shm_bind_writer(PyObject *module) {
    (void)module;
    return 0;
}
