"""The daemon's life: clean shutdown wakes waiters and leaves nothing; one daemon per name;
what a killed daemon left is cleaned by the next one."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys

import pytest

import shmreplay
from shmreplay.engine.instance import InstanceRecord, shm_objects, socket_path
from shmreplay.testing import (
    STAMPED_SIGNATURE,
    DaemonProcess,
    blocked_sampler,
    stamped_row,
    table_toml,
)

CTX = mp.get_context("spawn")


def test_sigterm_wakes_waiters_with_an_error_and_removes_everything(daemon_factory):
    d = daemon_factory(
        table_toml(signature=STAMPED_SIGNATURE) + table_toml(name="b", signature=STAMPED_SIGNATURE)
    )
    assert len(d.leftovers()) == 1 + 2 * 3  # the daemon sem; per table: segment + 2 sems
    started, results = CTX.Event(), CTX.Queue()
    p = CTX.Process(target=blocked_sampler, args=(d.name, "replay", 1, None, started, results))
    p.start()
    try:
        assert started.wait(30)
        import time

        time.sleep(0.3)  # let it block
        assert d.stop() == 0
        kind, cls, message, _ = results.get(timeout=10)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    assert (kind, cls) == ("error", "DaemonNotRunning")
    assert "shut down" in message
    assert d.leftovers() == []
    assert not socket_path(d.name).exists()
    assert InstanceRecord.read(d.name) is None
    assert "stopped; shared memory released" in d.log()


def test_a_second_daemon_with_the_same_name_is_refused(daemon_factory):
    d = daemon_factory(table_toml())
    second = subprocess.run(
        [sys.executable, "-m", "shmreplay", "serve", "--tables", d.path, "--name", d.name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 1
    assert "already serves instance" in second.stderr and str(d.proc.pid) in second.stderr
    with shmreplay.attach(d.name) as client:  # the first one is untouched
        assert client.tables == ["replay"]


def test_a_killed_daemons_tables_are_adopted_with_every_committed_item(daemon_factory):
    """kill -9 under a writer: the next daemon adopts the segment, keeps every item committed or
    published (in Fifo order, with counters), and the old client is told to re-attach."""
    toml = table_toml(max_size=500, sampler='{ kind = "fifo" }', signature=STAMPED_SIGNATURE)
    d = daemon_factory(toml)
    old = shmreplay.attach(d.name)
    t = old.table("replay")
    for u in range(300):
        t.insert(stamped_row(u))
    t.flush()
    for u in range(300, 320):
        t.insert(stamped_row(u))  # published; maybe not yet committed when the daemon dies
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    assert shm_objects(d.name)  # a kill -9 leaves its segments behind
    d2 = daemon_factory(toml, name=d.name)
    assert "adopted the segment a dead daemon left" in d2.log()
    with pytest.raises(shmreplay.DaemonNotRunning, match="attach"):
        t.insert(stamped_row(999))
    old.close()
    with shmreplay.attach(d.name) as client:
        t2 = client.table("replay")
        info = t2.info()
        assert info.current_size == 320
        assert info.rate_limiter.inserts == 320
        s = t2.sample(320, timeout=5, partial=False)
        assert s.data["uid"].tolist() == [0] * 320  # fifo sampler: the oldest, every time
        t2.delete(s.info.key[:1])
        assert t2.sample(1).data["uid"].tolist() == [1]
        t2.insert(stamped_row(1000))  # the adopted table takes new items
        t2.flush()
        assert t2.info().current_size == 320


def test_a_changed_definition_is_refused_and_fresh_discards(daemon_factory):
    d = daemon_factory(table_toml())
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    with pytest.raises(RuntimeError, match="--fresh"):
        daemon_factory(table_toml(max_size=10), name=d.name)
    assert any(not e.startswith("sem.") for e in shm_objects(d.name))  # items still there
    d3 = daemon_factory(table_toml(max_size=10), name=d.name, args=("--fresh",))
    assert "--fresh: discarded" in d3.log()
    with shmreplay.attach(d.name) as client:
        assert client.table("replay").info().max_size == 10


def test_clients_of_a_killed_daemon_get_a_clear_error(daemon_factory):
    d = daemon_factory(table_toml(signature=STAMPED_SIGNATURE))
    client = shmreplay.attach(d.name)
    t = client.table("replay")
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    with pytest.raises(shmreplay.DaemonNotRunning, match="died"):
        t.sample(1, timeout=2)
    client.close()


def test_serve_refuses_a_bad_file_before_allocating(tmp_path):
    bad = tmp_path / "tables.toml"
    bad.write_text(
        '[[table]]\nname = "x"\nmax_size = -1\n[table.signature]\na = { dtype = "uint8" }\n'
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "shmreplay",
            "serve",
            "--tables",
            str(bad),
            "--name",
            f"t{os.getpid()}-bad",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "max_size" in r.stderr and "Traceback" not in r.stderr
    assert shm_objects(f"t{os.getpid()}-bad") == []


def test_a_table_larger_than_dev_shm_is_refused_with_both_sizes(tmp_path):
    huge = tmp_path / "tables.toml"
    huge.write_text(
        '[[table]]\nname = "huge"\nmax_size = 100_000_000\n'
        '[table.signature]\nobs = { shape = [84, 84, 4], dtype = "uint8" }\n'
    )
    name = f"t{os.getpid()}-huge"
    r = subprocess.run(
        [sys.executable, "-m", "shmreplay", "serve", "--tables", str(huge), "--name", name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "TiB" in r.stderr and "free" in r.stderr and "/dev/shm" in r.stderr
    assert shm_objects(name) == []


def test_daemon_process_helper_cleans_up_even_when_the_daemon_is_killed():
    d = DaemonProcess(table_toml())
    os.kill(d.proc.pid, signal.SIGKILL)
    d.close()
    assert d.leftovers() == []


def test_sigint_stops_the_daemon_cleanly_too(daemon_factory):
    d = daemon_factory(table_toml())
    with shmreplay.attach(d.name) as client:
        client.table("replay").insert({"obs": [0.0] * 8, "action": 1, "reward": 0.5, "done": False})
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(timeout=15) == 0
    assert d.leftovers() == []
    assert "received SIGINT" in d.log()


def test_segments_and_semaphores_are_private_to_the_owner(daemon_factory):
    d = daemon_factory(table_toml())
    objects = d.leftovers()
    assert objects, "the daemon should have created its segment and semaphores"
    for name in objects:
        mode = os.stat(os.path.join("/dev/shm", name)).st_mode & 0o777
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
