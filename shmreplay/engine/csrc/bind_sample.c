/* Bindings of the sample concern (filled in by its implementation). */
#include "shm_bind.h"

int shm_bind_sample(PyObject *module) {
    (void)module;
    return 0;
}
