"""kill -9 at the worst moments: holding the table lock, halfway through writing a slot."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

import shmreplay
from shmreplay.engine.layout import SlotState
from shmreplay.testing import (
    STAMPED_SIGNATURE,
    half_writer,
    lock_holder,
    stamped_batch,
    table_toml,
    verify_stamped,
)

CTX = mp.get_context("spawn")


def _kill(p) -> None:
    if p.is_alive():
        os.kill(p.pid, signal.SIGKILL)
    p.join(10)


def test_killed_while_holding_the_table_lock(daemon_factory):
    d = daemon_factory(
        table_toml(
            sampler='{ kind = "prioritized", priority_exponent = 0.6 }', signature=STAMPED_SIGNATURE
        )
    )
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert_batch(stamped_batch(np.arange(100)))
        t.flush()
        ready = CTX.Event()
        p = CTX.Process(target=lock_holder, args=(d.name, "replay", ready))
        p.start()
        try:
            assert ready.wait(30)
            t.insert_batch(stamped_batch(np.arange(100, 150)))  # published; commit must wait
            assert t.core.mutex.owner_pid == p.pid
            os.kill(p.pid, signal.SIGKILL)
            killed = time.monotonic()
            s = t.sample(32, timeout=5)
            resumed = time.monotonic() - killed
        finally:
            _kill(p)
        print(f"sampling resumed {resumed * 1e3:.1f} ms after the kill")
        assert resumed < 1.0  # the requirement is 100 ms; leave room for a loaded CI machine
        assert verify_stamped(s.data).all()
        t.flush(timeout=10)  # the daemon's blocked commit went through too
        info = t.info()
        assert info.repairs == 1
        assert info.current_size == 150 and info.total_inserted == 150
        s = t.sample(1000, timeout=5)
        assert verify_stamped(s.data).all()
        assert set(s.data["uid"].tolist()) <= set(range(150))


def test_a_lock_left_by_a_killed_holder_is_repaired_by_the_daemons_compiled_commit(
    daemon_factory,
):
    """The holder dies before anything is published, so the first to lock next is the daemon's
    compiled commit round (its own trylock gets EOWNERDEAD, not RobustMutex.acquire): it must
    repair the table, mark the lock consistent, release it and commit, without a sampler's
    help."""
    d = daemon_factory(table_toml(signature=STAMPED_SIGNATURE))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert_batch(stamped_batch(np.arange(100)))
        t.flush()
        ready = CTX.Event()
        p = CTX.Process(target=lock_holder, args=(d.name, "replay", ready))
        p.start()
        try:
            assert ready.wait(30)
            assert t.core.mutex.owner_pid == p.pid
        finally:
            _kill(p)
        t.insert_batch(stamped_batch(np.arange(100, 150)))
        t.flush(timeout=10)
        info = t.info()
        assert info.repairs == 1
        assert info.current_size == 150 and info.total_inserted == 150
        s = t.sample(1000, timeout=5)
        assert verify_stamped(s.data).all()
    assert d.running()


def test_killed_halfway_through_a_reserved_slot(daemon_factory):
    d = daemon_factory(table_toml(max_size=50, signature=STAMPED_SIGNATURE))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert_batch(stamped_batch(np.arange(20)))
        t.flush()
        ready = CTX.Event()
        p = CTX.Process(target=half_writer, args=(d.name, "replay", 777, ready))
        p.start()
        try:
            assert ready.wait(30)
            core = t.core
            child_pid = p.pid
            chan = [c for c in range(core.max_clients) if core.chan[c, 0] == child_pid]
            assert len(chan) == 1
            held = (core.owner == chan[0]) & (core.state == SlotState.LEASED)
            assert held.any()
            os.kill(p.pid, signal.SIGKILL)
            killed = time.monotonic()
            deadline = killed + 5
            while time.monotonic() < deadline:
                if not ((core.owner == chan[0]) & (core.state == SlotState.LEASED)).any():
                    break
                time.sleep(0.005)
            reclaimed = time.monotonic() - killed
        finally:
            _kill(p)
        print(f"daemon reclaimed the dead writer's slots {reclaimed * 1e3:.1f} ms after the kill")
        assert reclaimed < 1.0
        assert not ((core.owner == chan[0]) & (core.state == SlotState.LEASED)).any()
        pids = [c["pid"] for c in client.server_info()["clients"]]
        assert child_pid not in pids
        # The half-written item never becomes visible, and writing goes on.
        t.insert_batch(stamped_batch(np.arange(20, 60)))
        t.flush()
        info = t.info()
        assert info.total_inserted == 60 and info.current_size == 50
        for _ in range(20):
            s = t.sample(256, timeout=5)
            assert verify_stamped(s.data).all()
            assert 777 not in s.data["uid"]


def test_a_stopped_lock_holder_makes_callers_time_out_naming_it(daemon_factory):
    """Policy for a holder that is stopped (SIGSTOP), not dead: its lock cannot be taken from a
    live process, so samplers (and priority updates, deletes, resets, info given a timeout) wait
    no longer than their timeout and get a LockTimeout naming the pid, and the daemon's commit
    loop waits and logs who holds the lock. SIGCONT (or its death) lets everything go on."""
    d = daemon_factory(table_toml(signature=STAMPED_SIGNATURE))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert_batch(stamped_batch(np.arange(50)))
        t.flush()
        ready = CTX.Event()
        p = CTX.Process(target=lock_holder, args=(d.name, "replay", ready))
        p.start()
        try:
            assert ready.wait(30)
            os.kill(p.pid, signal.SIGSTOP)
            t.insert_batch(stamped_batch(np.arange(50, 60)))  # the daemon's commit must wait
            t0 = time.monotonic()
            try:
                t.sample(1, timeout=0.5)
            except shmreplay.LockTimeout as exc:
                assert str(p.pid) in str(exc) and "'replay'" in str(exc)
                assert isinstance(exc, TimeoutError)
            else:
                raise AssertionError("sampling went past a stopped lock holder")
            assert 0.5 <= time.monotonic() - t0 < 3
            keys = np.arange(3, dtype=np.uint64)
            for call in (
                lambda: t.update_priorities(keys, [2.0, 2.0, 2.0], timeout=0.3),
                lambda: t.delete(keys, timeout=0.3),
                lambda: t.reset(timeout=0.3),
                lambda: t.info(timeout=0.3),
            ):
                t0 = time.monotonic()
                with pytest.raises(shmreplay.LockTimeout, match=str(p.pid)):
                    call()
                assert 0.3 <= time.monotonic() - t0 < 3
            deadline = time.monotonic() + 10
            while "held by pid" not in d.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert f"held by pid {p.pid}" in d.log()
            os.kill(p.pid, signal.SIGCONT)
            os.kill(p.pid, signal.SIGKILL)  # it would hold the lock forever: let it die
            s = t.sample(8, timeout=5)
            assert verify_stamped(s.data).all()
            t.flush(timeout=10)
            assert t.info().current_size == 60
        finally:
            if p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
            _kill(p)
