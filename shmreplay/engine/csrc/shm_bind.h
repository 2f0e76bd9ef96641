/* Each concern's binding file adds its functions and types to the one extension module. */
#ifndef SHM_BIND_H
#define SHM_BIND_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Each returns 0, or -1 with an exception set. Defined in bind_<concern>.c. */
int shm_bind_random(PyObject *module);   /* sum-tree, dense set, Uniform, Prioritized */
int shm_bind_ordered(PyObject *module);  /* Fifo/Lifo order ring, Min/MaxHeap */
int shm_bind_writer(PyObject *module);   /* a client's lease and publish rings, row copies */
int shm_bind_commit(PyObject *module);   /* the daemon's commit round: drain, check, commit, lease */
int shm_bind_sample(PyObject *module);   /* sample bookkeeping, row copies with seqlock */
int shm_bind_trajectory(PyObject *module); /* the trajectory writer's batch gather */
int shm_bind_ratelimit(PyObject *module);  /* the rate limiter's allowances */

#endif
