"""RobustMutex over real shared memory between real (forked) processes, kill -9 included."""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

import shmreplay
from shmreplay.engine.mutex import MUTEX_NBYTES, RobustMutex

# Forked children inherit the anonymous MAP_SHARED mapping at the same address.
CTX = multiprocessing.get_context("fork")
COUNTER = slice(MUTEX_NBYTES, MUTEX_NBYTES + 8)  # an int64 next to the mutex


@pytest.fixture
def shm():
    """A fresh robust mutex at the start of a 4 KiB anonymous shared mapping."""
    mm = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: no name, nothing to clean up
    buf = np.frombuffer(mm, dtype=np.uint8)
    RobustMutex.initialize(buf[:MUTEX_NBYTES])
    return buf


@contextlib.contextmanager
def running(*procs):
    """Start the processes; whatever happens, none is left running afterwards."""
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)


def _hold(buf, locked, release):
    """Child: take the lock, say so, keep it until told to let go (or until killed)."""
    m = RobustMutex(buf[:MUTEX_NBYTES])
    m.acquire()
    locked.set()
    release.wait(30)
    m.release()


def _count(buf, go, n):
    """Child: n non-atomic increments of the shared counter, each under the lock."""
    m = RobustMutex(buf[:MUTEX_NBYTES])
    counter = buf[COUNTER].view(np.int64)
    go.wait(10)
    for i in range(n):
        m.acquire(timeout=10)
        v = int(counter[0])
        if i % 8 == 0:
            time.sleep(0)  # widen the race window: a broken lock would now lose updates
        counter[0] = v + 1
        m.release()


def test_acquire_release_and_owner(shm):
    """A free mutex is taken and given back; owner_pid names the holder, 0 when free."""
    m = RobustMutex(shm[:MUTEX_NBYTES])
    assert m.owner_pid == 0
    m.acquire()
    assert m.owner_pid == os.getpid() == threading.get_native_id()
    m.release()
    assert m.owner_pid == 0
    m.acquire(timeout=0.1)
    m.release()
    with m as entered:
        assert entered is m and m.owner_pid == os.getpid()
    assert m.owner_pid == 0
    with pytest.raises(KeyError), m:
        raise KeyError("x")
    assert m.owner_pid == 0  # released on the way out of an exception
    assert m.repairs == 0


def test_owner_is_the_holding_process(shm):
    """While a child holds the lock, owner_pid read here is the child's pid."""
    m = RobustMutex(shm[:MUTEX_NBYTES])
    locked, release = CTX.Event(), CTX.Event()
    p = CTX.Process(target=_hold, args=(shm, locked, release))
    with running(p):
        assert locked.wait(10)
        assert m.owner_pid == p.pid
        release.set()
        p.join(10)
        assert p.exitcode == 0
    assert m.owner_pid == 0
    m.acquire(timeout=1)
    m.release()


def test_too_small_buffer_is_refused():
    with pytest.raises(shmreplay.SegmentError, match=str(MUTEX_NBYTES)):
        RobustMutex(np.zeros(MUTEX_NBYTES - 1, dtype=np.uint8))
    with pytest.raises(shmreplay.SegmentError):
        RobustMutex(np.zeros(MUTEX_NBYTES // 8, dtype=np.int64))


def test_timeout_while_another_process_holds_it(shm):
    """acquire(timeout=0.2) against a live holder raises LockTimeout after ≈0.2 s, naming it."""
    m = RobustMutex(shm[:MUTEX_NBYTES])
    locked, release = CTX.Event(), CTX.Event()
    p = CTX.Process(target=_hold, args=(shm, locked, release))
    with running(p):
        assert locked.wait(10)
        t0 = time.monotonic()
        with pytest.raises(shmreplay.LockTimeout) as ei:
            m.acquire(timeout=0.2)
        elapsed = time.monotonic() - t0
        assert 0.2 <= elapsed < 2.0
        assert isinstance(ei.value, TimeoutError)
        assert isinstance(ei.value, shmreplay.ShmReplayError)
        assert str(p.pid) in str(ei.value)
        t0 = time.monotonic()
        with pytest.raises(shmreplay.LockTimeout):
            m.acquire(timeout=0)  # 0 means: do not wait at all
        assert time.monotonic() - t0 < 0.1
        assert m.owner_pid == p.pid  # the failed attempts took nothing
        release.set()
        p.join(10)
        assert p.exitcode == 0
    m.acquire(timeout=1)
    assert m.owner_pid == os.getpid()
    m.release()
    assert m.repairs == 0


def test_mutual_exclusion_between_processes(shm):
    """2 processes × 2000 locked read-modify-writes of a shared counter give exactly 4000."""
    counter = shm[COUNTER].view(np.int64)
    counter[0] = 0
    go = CTX.Event()
    procs = [CTX.Process(target=_count, args=(shm, go, 2000)) for _ in range(2)]
    with running(*procs):
        go.set()
        deadline = time.monotonic() + 15
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            assert not p.is_alive(), "counting children did not finish in 15 s"
            assert p.exitcode == 0
    assert int(counter[0]) == 4000
    assert RobustMutex(shm[:MUTEX_NBYTES]).owner_pid == 0


def test_owner_killed_while_holding(shm):
    """kill -9 of the holder: a waiter gets it within 1 s, repairs once, then all is normal."""
    calls = []
    m = RobustMutex(shm[:MUTEX_NBYTES], on_owner_died=lambda: calls.append(time.monotonic()))
    locked, release = CTX.Event(), CTX.Event()
    p = CTX.Process(target=_hold, args=(shm, locked, release))
    killed_at = []

    def kill_soon():
        time.sleep(0.3)
        killed_at.append(time.monotonic())
        os.kill(p.pid, signal.SIGKILL)

    with running(p):
        assert locked.wait(10)
        assert m.owner_pid == p.pid
        killer = threading.Thread(target=kill_soon)
        killer.start()
        try:
            m.acquire(timeout=10)  # waits for the holder, which dies meanwhile
            acquired_at = time.monotonic()
        finally:
            killer.join()
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
    assert acquired_at - killed_at[0] < 1.0
    assert len(calls) == 1 and killed_at[0] <= calls[0] <= acquired_at
    assert m.repairs == 1
    assert m.owner_pid == os.getpid()  # held by us, and consistent again
    m.release()
    assert m.owner_pid == 0
    for _ in range(3):  # usable as normal: no second repair
        m.acquire(timeout=1)
        m.release()
    assert len(calls) == 1 and m.repairs == 1


def test_owner_killed_before_anyone_waits(shm):
    """An owner that died while nobody waited is noticed by the next acquire, even a trylock."""
    calls = []
    m = RobustMutex(shm[:MUTEX_NBYTES], on_owner_died=lambda: calls.append(1))
    locked, release = CTX.Event(), CTX.Event()
    p = CTX.Process(target=_hold, args=(shm, locked, release))
    with running(p):
        assert locked.wait(10)
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    t0 = time.monotonic()
    m.acquire(timeout=0)
    assert time.monotonic() - t0 < 1.0
    assert calls == [1] and m.repairs == 1
    m.release()
    with m:
        pass
    assert calls == [1] and m.repairs == 1


def test_failing_repair_propagates(shm):
    """If on_owner_died raises, acquire raises it; the lock is not left held by this process."""

    def repair():
        raise RuntimeError("repair failed")

    m = RobustMutex(shm[:MUTEX_NBYTES], on_owner_died=repair)
    locked, release = CTX.Event(), CTX.Event()
    p = CTX.Process(target=_hold, args=(shm, locked, release))
    with running(p):
        assert locked.wait(10)
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    with pytest.raises(RuntimeError, match="repair failed"):
        m.acquire(timeout=1)
    assert m.repairs == 0
    # Unrepaired state is never handed out as consistent: the mutex is now unrecoverable.
    with pytest.raises(shmreplay.SegmentError, match="ENOTRECOVERABLE"):
        m.acquire(timeout=1)
