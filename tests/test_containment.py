"""Fault containment: no exception, bad value or client churn costs the tables.

Each test here failed on c7003f0: a bad value a client wrote into shared memory, or a table whose
structures broke, took the whole daemon down and unlinked every table; clients that attached and
closed in a loop had their fresh channel wiped by the reclaim of the previous one and starved.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import shmreplay
from shmreplay.engine.instance import remove_shm_objects, segment_name
from shmreplay.engine.layout import LEASE_CAPACITY, PUBLISH_CAPACITY, Chan, Ctrl, Param, SlotState
from shmreplay.engine.shm import SHM_DIR
from shmreplay.errors import (
    CheckpointError,
    ClientCutOff,
    DaemonNotRunning,
    InvalidArgumentError,
    ShmReplayError,
    TableQuarantined,
)
from shmreplay.testing import (
    STAMPED_SIGNATURE,
    DaemonProcess,
    stamped_batch,
    stamped_row,
    table_toml,
    verify_stamped,
)

CTX = mp.get_context("spawn")


def _churner(instance: str, worker: int, cycles: int, batch: int, results) -> None:
    """attach -> insert_batch -> flush -> close, ``cycles`` times; reports timeouts and uids."""
    timeouts = 0
    inserted = 0
    try:
        for cycle in range(cycles):
            uids = np.arange(batch) + (worker * cycles + cycle) * batch
            with shmreplay.attach(instance) as client:
                t = client.table("replay")
                try:
                    t.insert_batch(stamped_batch(uids), timeout=3)
                    t.flush(timeout=3)
                    inserted += batch
                except shmreplay.RateLimiterTimeout:
                    timeouts += 1
        results.put(("ok", worker, timeouts, inserted))
    except BaseException as exc:
        results.put(("error", worker, repr(exc), inserted))


def test_clients_attaching_and_closing_under_load_neither_starve_nor_lose_items(daemon_factory):
    """4 processes x 40 cycles of attach -> insert_batch(20) -> flush -> close. On c7003f0 the
    reclaim of a closed client wiped the channel just handed to the next one (its WANT_LEASE and
    PID): that client's insert waited for a lease that never came (tens of timeouts per run)."""
    workers, cycles, batch = 4, 40, 20
    d = daemon_factory(
        table_toml(
            max_size=1_000_000,
            rate_limiter='{ kind = "min_size", min_size = 1000 }',
            signature=STAMPED_SIGNATURE,
        )
    )
    results = CTX.Queue()
    procs = [
        CTX.Process(target=_churner, args=(d.name, w, cycles, batch, results))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [r for r in reports if r[0] != "ok"]
    assert errors == []
    assert sum(r[2] for r in reports) == 0, f"inserts timed out: {reports}"
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        info = t.info()
        assert info.current_size == workers * cycles * batch
        assert info.total_inserted == workers * cycles * batch
        s = t.sample(4000, timeout=5)
        assert verify_stamped(s.data).all()
        assert set(s.data["uid"].tolist()) <= set(range(workers * cycles * batch))


def _wait_until(predicate, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def _segment(d: DaemonProcess, table: str = "replay") -> Path:
    return Path(SHM_DIR) / segment_name(d.name, table).lstrip("/")


# -- a client that writes nonsense into its channel -----------------------------------------------


def _slot_out_of_range(t) -> None:
    _publish_raw(t, np.array([10**9]))


def _slot_of_another_client(t, other) -> None:
    _publish_raw(t, np.array([int(other.insert(stamped_row(5)) & 0xFFFFFFFF)]))


def _slot_twice(t) -> None:
    slot = t._take_one(None)
    _publish_raw(t, np.array([slot, slot]))


def _nan_priority(t) -> None:
    slot = t._take_one(None)
    t.core.priority[slot] = np.nan
    _publish_raw(t, np.array([slot]))


def _tail_far_ahead(t) -> None:
    t._chan[Chan.PUB_TAIL] += PUBLISH_CAPACITY + 1
    t.core.events.daemon.post(1)


def _tail_behind_head(t) -> None:
    t._chan[Chan.PUB_TAIL] = int(t._chan[Chan.PUB_HEAD]) - 5
    t.core.events.daemon.post(1)


def _negative_lease_request(t) -> None:
    t._chan[Chan.WANT_LEASE] = -7
    t.core.events.daemon.post(1)


def _lease_head_far_behind(t) -> None:
    t._chan[Chan.LEASE_HEAD] = int(t._chan[Chan.LEASE_TAIL]) - LEASE_CAPACITY - 100
    t._chan[Chan.WANT_LEASE] = 1
    t.core.events.daemon.post(1)


def _publish_raw(t, slots: np.ndarray) -> None:
    """What a buggy writer does: put ``slots`` in its publish ring, move its tail, wake."""
    tail = int(t._chan[Chan.PUB_TAIL])
    for i, s in enumerate(slots):
        t._publish[(tail + i) % PUBLISH_CAPACITY] = s
    t._chan[Chan.PUB_TAIL] = tail + len(slots)
    t.core.events.daemon.post(1)


BAD_WRITES = {
    "slot index out of range": (_slot_out_of_range, False),
    "a slot leased to another client": (_slot_of_another_client, True),
    "the same slot twice": (_slot_twice, False),
    "a NaN priority": (_nan_priority, False),
    "publish tail far ahead of its head": (_tail_far_ahead, False),
    "publish tail behind its head": (_tail_behind_head, False),
    "a negative lease request": (_negative_lease_request, False),
    "lease head far behind its tail": (_lease_head_far_behind, False),
}


@pytest.mark.parametrize("case", list(BAD_WRITES))
def test_a_client_writing_nonsense_into_its_channel_is_cut_off_alone(daemon_factory, case):
    """Every value the daemon reads from a writer's channel is checked before use. On c7003f0
    an out-of-range slot killed the daemon, which unlinked every table (IndexError in commit);
    the other values were used as they were (a NaN priority entered the sum-tree, a slot was
    committed twice, a ring was read past its end)."""
    d = daemon_factory(
        table_toml(
            sampler='{ kind = "prioritized", priority_exponent = 1.0 }',
            signature=STAMPED_SIGNATURE,
        )
    )
    corrupt, needs_other = BAD_WRITES[case]
    with shmreplay.attach(d.name) as good, shmreplay.attach(d.name) as bad:
        g, b = good.table("replay"), bad.table("replay")
        g.insert_batch(stamped_batch(np.arange(100)))
        b.insert_batch(stamped_batch(np.arange(100, 110)))  # it holds leased slots now
        g.flush(timeout=5)
        b.flush(timeout=5)
        if needs_other:
            corrupt(b, g)
        else:
            corrupt(b)
        _wait_until(lambda: b._chan[Chan.PID] == 0, what="the daemon to cut the client off")
        with pytest.raises(ClientCutOff, match="cut this client off"):
            b.insert(stamped_row(1))
        with pytest.raises(ClientCutOff):
            b.sample(1, timeout=1)
        with pytest.raises(DaemonNotRunning):  # its control connection was closed
            bad.server_info()
        core = g.core  # what it held was taken back: no slot is left leased to its channel
        assert np.count_nonzero((core.owner == bad.channel) & (core.state == SlotState.LEASED)) == 0
        # Everyone else goes on, with every item.
        g.insert_batch(stamped_batch(np.arange(200, 250)))
        g.flush(timeout=5)
        info = g.info()
        expected = 160 + (1 if case == "a slot leased to another client" else 0)
        assert info.current_size == expected
        s = g.sample(500, timeout=5)
        assert verify_stamped(s.data).all()
        assert np.isfinite(s.info.probability).all() and (s.info.probability > 0).all()
        assert d.running()
        log = d.log()
        assert f"client pid {os.getpid()} (channel {bad.channel}) cut off" in log
    with shmreplay.attach(d.name) as again:  # a new client gets a working channel
        t = again.table("replay")
        t.insert(stamped_row(999))
        t.flush(timeout=5)
        assert t.info().current_size == expected + 1


# -- a table that cannot go on ---------------------------------------------------------------------


def test_a_corrupt_table_lock_quarantines_that_table_only_and_it_is_kept(daemon_factory, tmp_path):
    """Garbage in a table's mutex bytes (pthread says EINVAL). On c7003f0 the daemon died at its
    next commit and unlinked every table. Now: that table is quarantined (writes raise
    TableQuarantined, info() says so), the other table goes on, no checkpoint is written over
    the last sound one, a stop leaves the tables in /dev/shm, and the next daemon adopts the
    table with a fresh lock and every item."""
    toml = (
        f'[server]\ncheckpoint_dir = "{tmp_path}"\n'
        + table_toml(signature=STAMPED_SIGNATURE)
        + table_toml(name="b", signature=STAMPED_SIGNATURE)
    )
    d = daemon_factory(toml)
    with shmreplay.attach(d.name) as client:
        t, b = client.table("replay"), client.table("b")
        t.insert_batch(stamped_batch(np.arange(100)))
        t.flush(timeout=5)
        client.checkpoint()
        checkpoints = sorted(p.name for p in tmp_path.iterdir())
        t.core.segment.arrays["mutex"][:40] = 0xFF
        t.insert(stamped_row(100))  # published; the daemon's commit finds the lock corrupt
        _wait_until(
            lambda: client.server_info()["tables"]["replay"]["state"] == "quarantined",
            what="the table to be quarantined",
        )
        info = client.server_info()["tables"]
        assert "pthread_mutex_lock" in info["replay"]["quarantined_because"]
        assert info["b"]["state"] == "ok"
        with pytest.raises(TableQuarantined, match="quarantined"):
            t.insert(stamped_row(101))
        b.insert_batch(stamped_batch(np.arange(50)))
        b.flush(timeout=5)
        assert verify_stamped(b.sample(20, timeout=5).data).all()
        with pytest.raises(CheckpointError, match="quarantined"):
            client.checkpoint()
    assert d.stop() == 0  # a requested stop
    assert sorted(p.name for p in tmp_path.iterdir()) == checkpoints  # none over the sound one
    assert "no final checkpoint" in d.log()
    assert _segment(d).exists() and _segment(d, "b").exists()
    again = daemon_factory(toml, name=d.name)
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        assert t.info().current_size == 101  # the one published at the corruption too
        assert verify_stamped(t.sample(200, timeout=5).data).all()
        t.insert(stamped_row(102))
        t.flush(timeout=5)
        assert client.table("b").info().current_size == 50
    assert again.running()


def test_a_weight_sum_overflow_costs_neither_the_daemon_nor_the_other_tables(daemon_factory):
    """A prioritized remover and two valid priorities of 1.7e308: on c7003f0 the weight sum
    overflowed at the first eviction, the daemon died and unlinked every table. Either the
    priorities are refused (at insert, or by the daemon: the writer is cut off) or the table is
    quarantined; the daemon, the other table and the items already in this one stay."""
    toml = table_toml(
        max_size=10,
        remover='{ kind = "prioritized", priority_exponent = 1.0 }',
        signature=STAMPED_SIGNATURE,
    ) + table_toml(name="b", signature=STAMPED_SIGNATURE)
    d = daemon_factory(toml)
    with shmreplay.attach(d.name) as client:
        t, b = client.table("replay"), client.table("b")
        t.insert_batch(stamped_batch(np.arange(9)))
        t.flush(timeout=5)
        try:
            t.insert_batch(stamped_batch(np.arange(9, 11)), priorities=[1.7e308, 1.7e308])
            t.insert_batch(stamped_batch(np.arange(11, 13)))
            t.flush(timeout=5)
        except (InvalidArgumentError, ClientCutOff, TableQuarantined) as exc:
            print(f"refused: {exc!r}")  # else: accepted, and evicted without overflowing
        assert d.running()
        b.insert_batch(stamped_batch(np.arange(30)))
        b.flush(timeout=5)
        assert b.info().current_size == 30
    try:
        with shmreplay.attach(d.name) as client:  # the items that were in it can still be read
            s = client.table("replay").sample(50, timeout=5)
            assert verify_stamped(s.data).all()
            assert set(range(9)) & set(s.data["uid"].tolist())
        assert _segment(d).exists()
        assert d.stop() == 0
    finally:
        remove_shm_objects(d.name)  # a quarantined table outlives its daemon's stop


def _garbage_count(core) -> None:
    core.sampler.items._count[0] = 10**12
    core.ctrl[Ctrl.FREE_HEAD] = -(10**9)


def _garbage_positions(core) -> None:
    core.sampler.items.pos[:] = -5


def _garbage_fifo_head(core) -> None:
    core.remover.ends[0] = 10**12


def _garbage_free_ring(core) -> None:
    head = int(core.ctrl[Ctrl.FREE_HEAD]) % len(core.free)
    core.free[head : head + 64] = 50  # a slot holding an item, over and over


@pytest.mark.parametrize(
    "corrupt", [_garbage_count, _garbage_positions, _garbage_fifo_head, _garbage_free_ring]
)
def test_garbage_in_the_samplers_dense_set_is_repaired(daemon_factory, corrupt):
    """The uniform sampler's dense set (its count, its positions), the free ring (its ends,
    its entries) and the Fifo remover's ends are in memory every sampler can write. On c7003f0
    a garbage count made the next commit raise and the daemon unlink every table, garbage
    positions made evictions scramble the set, a garbage Fifo head stopped evictions, a free
    ring listing a full slot had it leased and overwritten. Now the commit and the lease check
    the counts, the lease the slots it hands out, the removal the positions, and the
    structures are rebuilt from the per-slot metadata."""
    d = daemon_factory(table_toml(max_size=100, signature=STAMPED_SIGNATURE))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert_batch(stamped_batch(np.arange(100)))
        t.flush(timeout=5)
        corrupt(t.core)
        t.insert_batch(stamped_batch(np.arange(100, 400)), timeout=10)  # several leases
        t.flush(timeout=5)
        assert t.info().current_size == 100
        assert t.core.sampler.items.count == 100
        s = t.sample(3000, timeout=5)  # each item is missed with probability 1e-13
        assert verify_stamped(s.data).all()
        assert set(s.data["uid"].tolist()) == set(range(300, 400))
    assert "rebuilt its structures from the per-slot metadata" in d.log()
    assert d.running()


@pytest.mark.parametrize("kind", ["fifo", "lifo", "min_heap", "prioritized"])
def test_garbage_in_the_samplers_own_arrays_is_repaired_at_the_next_sample(daemon_factory, kind):
    """The compiled selectors refuse to walk arrays that contradict themselves (an order ring
    or a heap naming slots outside the table, a sum-tree whose sums do not add up) and raise
    CorruptStructure, changing nothing: the sample rebuilds them from the per-slot metadata
    and draws again, and returns only intact items of the table."""
    sampler = (
        '{ kind = "prioritized", priority_exponent = 1.0 }'
        if kind == "prioritized"
        else (f'{{ kind = "{kind}" }}')
    )
    d = daemon_factory(table_toml(max_size=100, sampler=sampler, signature=STAMPED_SIGNATURE))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert_batch(stamped_batch(np.arange(50)))
        t.flush(timeout=5)
        repairs = t.info().repairs
        sel = t.core.sampler
        if kind in ("fifo", "lifo"):
            sel.order[:] = 10**9
        elif kind == "min_heap":
            sel.slot[:] = 10**9
        else:  # a total that is not a number
            sel.tree.tree[1] = np.nan
        s = t.sample(20, timeout=5)
        assert verify_stamped(s.data).all()
        assert set(s.data["uid"].tolist()) <= set(range(50))
        assert t.info().repairs > repairs
    assert d.running()


@pytest.mark.parametrize("tail", [-1, -(2**63), 2**63 - 1])
def test_a_free_ring_tail_that_does_not_fit_is_rebuilt_and_loses_no_slot(daemon_factory, tail):
    """FREE_TAIL is shared memory any client can write. Every push of the free ring (a delete
    here, a sampler's release of items max_times_sampled exhausted) refuses a tail that does not
    fit before it changes a slot, and the ring is rebuilt from the slots' states: the deleted
    and exhausted slots come back, and the table keeps taking inserts up to max_size."""
    d = daemon_factory(
        table_toml(max_size=40, signature=STAMPED_SIGNATURE, extra="max_times_sampled = 1")
    )
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        keys = t.insert_batch(stamped_batch(np.arange(40)))
        t.flush(timeout=5)
        repairs = t.info().repairs
        core = t.core
        core.ctrl[Ctrl.FREE_TAIL] = tail
        t.delete(keys[:1])  # the delete's push (in Python) meets the corrupt tail
        assert t.info().repairs > repairs
        core.ctrl[Ctrl.FREE_TAIL] = tail
        s = t.sample(5, timeout=5)  # five exhausted, released through a corrupt tail (C)
        assert verify_stamped(s.data).all()
        info = t.info()
        assert info.repairs > repairs + 1 and info.current_size == 34
        free = int(core.ctrl[Ctrl.FREE_TAIL]) - int(core.ctrl[Ctrl.FREE_HEAD])
        assert int(core.ctrl[Ctrl.FREE_HEAD]) >= 0 and free >= 6
        t.insert_batch(stamped_batch(np.arange(100, 106)))  # room for all six again
        t.flush(timeout=5)
        assert t.info().current_size == 40
    assert d.running()


def test_an_update_that_finds_a_selector_corrupt_repairs_it_and_keeps_the_update(
    daemon_factory,
):
    """update_priorities stores the priorities, then updates the selectors; a heap whose clock
    was overwritten refuses the update (CorruptStructure). The learner's call must not fail
    for it: the table rebuilds the selectors from the per-slot metadata, which holds the new
    priorities, so the update takes effect."""
    d = daemon_factory(
        table_toml(max_size=100, sampler='{ kind = "max_heap" }', signature=STAMPED_SIGNATURE)
    )
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        keys = t.insert_batch(stamped_batch(np.arange(50)))
        t.flush(timeout=5)
        repairs = t.info().repairs
        t.core.sampler._clock[0] = -5
        assert t.update_priorities(keys[7:8], [1e6]) == 0
        assert t.info().repairs > repairs
        assert int(t.sample(1, timeout=5).info.key[0]) == int(keys[7])
    assert d.running()


# -- start-up failures and exits -------------------------------------------------------------------


def test_a_taken_metrics_port_at_a_restart_keeps_the_adopted_tables(daemon_factory):
    """Kill -9, then a restart whose metrics port is taken. On c7003f0 the failed start unlinked
    the tables it had just adopted (700 items became 0). Whether a later version refuses to start
    or serves without metrics, the items stay."""
    toml = table_toml(signature=STAMPED_SIGNATURE)
    d = daemon_factory(toml)
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert_batch(stamped_batch(np.arange(700)))
        t.flush(timeout=5)
    os.kill(d.pid, signal.SIGKILL)
    d.wait(10)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        try:
            second = daemon_factory(f"[server]\nmetrics_port = {port}\n" + toml, name=d.name)
            # Its record is out before the metrics port is bound: give the failure time.
            with contextlib.suppress(subprocess.TimeoutExpired):
                second.wait(3)
            failed = not second.running()
        except RuntimeError:
            failed = True
    if failed:
        assert _segment(d).exists()
        second = daemon_factory(toml, name=d.name)
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        assert t.info().current_size == 700
        assert verify_stamped(t.sample(100, timeout=5).data).all()
    assert second.running()


def test_an_unexpected_error_keeps_every_table_and_writes_a_final_checkpoint(
    daemon_factory, tmp_path, monkeypatch
):
    """An exception out of the commit loop itself (injected: the daemon's own bug, not a
    table's or a client's). On c7003f0 the daemon unlinked every table and wrote no final
    checkpoint. Now it exits with status 1 after a final checkpoint, leaves the tables in
    /dev/shm, and the next daemon adopts them with every item."""
    monkeypatch.setenv("SHMREPLAY_INJECT_FAULT", "commit-loop:300")
    toml = f'[server]\ncheckpoint_dir = "{tmp_path}"\n' + table_toml(signature=STAMPED_SIGNATURE)
    d = daemon_factory(toml)
    monkeypatch.delenv("SHMREPLAY_INJECT_FAULT")
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert_batch(stamped_batch(np.arange(300)))
        with contextlib.suppress(ShmReplayError):
            t.flush(timeout=10)
    assert d.wait(10) == 1
    log = d.log()
    assert "unexpected error in the commit loop" in log and "injected fault" in log
    assert "left 1 table(s) in /dev/shm for the next daemon to adopt" in log
    assert _segment(d).exists()
    checkpoints = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1
    daemon_factory(toml, name=d.name)
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        assert t.info().current_size == 300
        s = t.sample(3000, timeout=5)
        assert verify_stamped(s.data).all()
        assert set(s.data["uid"].tolist()) == set(range(300))


@pytest.mark.parametrize("garbage", [-1.0, 99.0, float("nan"), float("inf"), 0.5])
def test_garbage_in_the_limiters_kind_and_min_size_lines_still_reports(daemon_factory, garbage):
    """The limiter's kind and min_size_to_sample are parameter lines any process of the group
    can write: info() reports them as they are instead of indexing with them or raising."""
    d = daemon_factory(table_toml())
    with shmreplay.attach(d.name) as client:
        core = client.table("replay").core
        core.params[Param.KIND] = garbage
        core.params[Param.MIN_SIZE_TO_SAMPLE] = garbage
        info = core.limiter.info()
        assert info.kind.startswith("corrupt"), info.kind
    assert d.running()
