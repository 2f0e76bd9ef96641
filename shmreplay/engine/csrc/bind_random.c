/* Bindings of the random concern (filled in by its implementation). */
#include "shm_bind.h"

int shm_bind_random(PyObject *module) {
    (void)module;
    return 0;
}
