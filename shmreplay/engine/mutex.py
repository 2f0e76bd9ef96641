"""A process-shared, robust pthread mutex living in shared memory.

Robust means that when its owner dies (even by ``kill -9``), the kernel hands the mutex to the
next waiter with ``EOWNERDEAD`` (the owner's thread registered it on its robust list). That waiter
then repairs whatever the dead owner was half-way through changing (the ``on_owner_died``
callback) and marks the mutex consistent. Other schemes DESIGN.md §3 lists (flock per table,
a spin lock with a pid) either need a syscall per acquisition or a watchdog to detect death; the
robust futex costs one uncontended atomic and detects death in the kernel.

ctypes releases the GIL around foreign calls, so a thread waiting for the lock does not stall the
other threads of its process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from ..errors import LockTimeout, SegmentError

# glibc's pthread_mutex_t is 40 bytes on x86-64 and 48 on aarch64; keep a full cache line.
MUTEX_NBYTES = 64
_OWNER_OFFSET = (
    8  # glibc: struct __pthread_mutex_s { int __lock; unsigned __count; int __owner; ..}
)
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1
_WAIT_SLICE_S = 0.1  # a timed wait wakes this often, so that a Python signal handler can run
# Holders keep the lock for microseconds, while sleeping in the kernel and being woken costs
# a futex syscall and, on a virtual machine, an inter-processor interrupt (~200 µs measured):
# try again this many times (~0.3 µs each) and then yield this many times before sleeping.
_SPIN_TRIES = 64
_YIELD_TRIES = 16

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


for _fn in (
    "pthread_mutex_lock",
    "pthread_mutex_trylock",
    "pthread_mutex_unlock",
    "pthread_mutex_consistent",
    "pthread_mutex_destroy",
    "pthread_mutexattr_init",
    "pthread_mutexattr_destroy",
):
    getattr(_libc, _fn).argtypes = [ctypes.c_void_p]
    getattr(_libc, _fn).restype = ctypes.c_int
_libc.pthread_mutex_timedlock.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Timespec)]
_libc.pthread_mutex_timedlock.restype = ctypes.c_int
_libc.pthread_mutex_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libc.pthread_mutex_init.restype = ctypes.c_int
for _fn in ("pthread_mutexattr_setpshared", "pthread_mutexattr_setrobust"):
    getattr(_libc, _fn).argtypes = [ctypes.c_void_p, ctypes.c_int]
    getattr(_libc, _fn).restype = ctypes.c_int


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise SegmentError(f"{what} failed: {errno.errorcode.get(rc, rc)} ({rc})")


class RobustMutex:
    """The table mutex. ``buf`` is a uint8 view of MUTEX_NBYTES bytes in shared memory.

    ``on_owner_died`` runs with the mutex held when this process inherits it from a dead owner;
    it must leave the protected structures consistent.
    """

    def __init__(
        self,
        buf: np.ndarray,
        on_owner_died: Callable[[], None] | None = None,
        name: str = "table lock",
    ) -> None:
        if buf.nbytes < MUTEX_NBYTES or buf.dtype != np.uint8:
            raise SegmentError(f"mutex needs a uint8 buffer of {MUTEX_NBYTES} bytes")
        self._buf = buf  # keeps the mapping alive as long as the pointer is in use
        self._ptr = ctypes.c_void_p(buf.ctypes.data)
        self._owner = buf[_OWNER_OFFSET : _OWNER_OFFSET + 4].view(np.int32)
        self.on_owner_died = on_owner_died
        self.name = name  # for messages
        self.repairs = 0  # times this process repaired after a dead owner

    @staticmethod
    def initialize(buf: np.ndarray) -> None:
        """Make ``buf`` a fresh process-shared robust mutex (only before anyone else uses it)."""
        buf[:MUTEX_NBYTES] = 0
        attr = ctypes.create_string_buffer(64)
        _check(_libc.pthread_mutexattr_init(attr), "pthread_mutexattr_init")
        try:
            _check(_libc.pthread_mutexattr_setpshared(attr, _PTHREAD_PROCESS_SHARED), "setpshared")
            _check(_libc.pthread_mutexattr_setrobust(attr, _PTHREAD_MUTEX_ROBUST), "setrobust")
            _check(_libc.pthread_mutex_init(ctypes.c_void_p(buf.ctypes.data), attr), "mutex_init")
        finally:
            _libc.pthread_mutexattr_destroy(attr)

    @property
    def owner_pid(self) -> int:
        """Thread id of the holder (its pid for a single-threaded holder), 0 if free.

        While a dead owner's mutex is being repaired glibc shows 0x7fffffff here."""
        return int(self._owner[0])

    def acquire(self, timeout: float | None = None) -> None:
        """Take the mutex; raise :class:`LockTimeout` if ``timeout`` seconds pass first."""
        rc = _libc.pthread_mutex_trylock(self._ptr)
        if rc == errno.EBUSY:
            rc = self._spin()
            if rc == errno.EBUSY:
                rc = self._wait(timeout)
        if rc == errno.EOWNERDEAD:
            self.recover_from_dead_owner()
        elif rc == errno.EINVAL:
            raise SegmentError(
                f"{self.name} is corrupt (pthread_mutex_lock failed: EINVAL): its bytes in "
                "shared memory are not a mutex any more; restart the daemon, which adopts the "
                "table and makes it a new lock"
            )
        elif rc != 0:
            _check(rc, "pthread_mutex_lock")

    def _spin(self) -> int:
        trylock, ptr = _libc.pthread_mutex_trylock, self._ptr
        for _ in range(_SPIN_TRIES):
            rc = trylock(ptr)
            if rc != errno.EBUSY:
                return rc
        for _ in range(_YIELD_TRIES):
            os.sched_yield()  # the holder may be waiting for our CPU
            rc = trylock(ptr)
            if rc != errno.EBUSY:
                return rc
        return rc

    def _wait(self, timeout: float | None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        ts = _Timespec()
        while True:
            slice_s = _WAIT_SLICE_S
            if deadline is not None:
                slice_s = min(slice_s, deadline - time.monotonic())
                if slice_s <= 0:
                    raise LockTimeout(
                        f"{self.name} held by pid {self.owner_pid} for more than {timeout} s; "
                        "is that process stopped (SIGSTOP) or stuck while sampling?"
                    )
            until = time.time() + slice_s  # timedlock takes a CLOCK_REALTIME deadline
            ts.tv_sec = int(until)
            ts.tv_nsec = int((until - int(until)) * 1e9)
            rc = _libc.pthread_mutex_timedlock(self._ptr, ctypes.byref(ts))
            if rc != errno.ETIMEDOUT:
                return rc

    def recover_from_dead_owner(self) -> None:
        """This process holds the mutex, inherited from an owner that died holding it
        (EOWNERDEAD, from this class or from the compiled commit round's own trylock): run
        ``on_owner_died`` to repair what it protects, then mark the mutex consistent. The
        caller still holds it and releases it as usual."""
        try:
            if self.on_owner_died is not None:
                self.on_owner_died()
        except BaseException:
            # Leave the mutex inconsistent-but-owned; releasing it makes it unrecoverable,
            # which is the honest state if the repair failed.
            _libc.pthread_mutex_unlock(self._ptr)
            raise
        self.repairs += 1
        _check(_libc.pthread_mutex_consistent(self._ptr), "pthread_mutex_consistent")

    def release(self) -> None:
        _check(_libc.pthread_mutex_unlock(self._ptr), "pthread_mutex_unlock")

    @contextmanager
    def held(self, timeout: float | None) -> Iterator[None]:
        """``with mutex.held(t):`` takes the mutex waiting at most ``t`` seconds (None: forever)."""
        self.acquire(timeout)
        try:
            yield
        finally:
            self.release()

    def __enter__(self) -> RobustMutex:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
