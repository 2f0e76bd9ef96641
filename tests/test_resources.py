"""Resource limits: a /dev/shm that fills up while the tables run, and processes out of file
descriptors. Each is met with a clear error, and the running tables come to no harm.

The /dev/shm test runs its daemons in a private mount namespace with a small tmpfs of its own
on /dev/shm (``unshare --mount``, root only), so the machine's /dev/shm is never filled; the
namespace and everything in it vanish with its last process.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import shmreplay
from shmreplay.engine.instance import InstanceRecord
from shmreplay.testing import (
    STAMPED_SIGNATURE,
    stamped_batch,
    stamped_row,
    table_toml,
    verify_stamped,
)

TABLE = table_toml(max_size=1000, signature=STAMPED_SIGNATURE)


# -- a full /dev/shm -----------------------------------------------------------------------------


def _fill_dev_shm(path: str = "/dev/shm/filler") -> int:
    """Grow a file in /dev/shm until nothing is left; returns the bytes still free."""
    from shmreplay.engine.shm import shm_free_bytes

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12):  # unbuffered: a failed write leaves nothing
            try:
                while True:
                    os.write(fd, bytes(chunk))
            except OSError:
                pass
    finally:
        os.close(fd)
    return shm_free_bytes()


def _full_dev_shm_scenario(checkpoint_dir: str) -> dict:
    """Run inside the namespace (see test_a_full_dev_shm...); returns what happened."""
    from shmreplay.engine.instance import remove_shm_objects
    from shmreplay.testing import DaemonProcess

    toml = f'[server]\ncheckpoint_dir = "{checkpoint_dir}"\n' + TABLE
    out: dict = {}
    daemons: list[DaemonProcess] = []

    def start(name: str | None = None) -> str:
        """Start a daemon; "started", or the end of its log if it refused to."""
        try:
            daemons.append(DaemonProcess(toml, name=name))
            return "started"
        except RuntimeError as exc:
            return str(exc)[-600:]

    try:
        assert start() == "started"
        d = daemons[0]
        a = shmreplay.attach(d.name)
        t = a.table("replay")
        t.insert_batch(stamped_batch(np.arange(500)))
        t.flush()
        out["free_after_fill"] = _fill_dev_shm()
        # The existing table's pages were reserved at creation (posix_fallocate).
        for lo in range(500, 3500, 100):
            t.insert_batch(stamped_batch(np.arange(lo, lo + 100)))
        t.flush(timeout=10)
        s = t.sample(200, timeout=5)
        out["rows_ok"] = bool(verify_stamped(s.data).all())
        out["size"] = t.info().current_size
        try:  # a new client creates nothing in /dev/shm
            with shmreplay.attach(d.name) as b:
                out["new_client"] = bool(verify_stamped(b.table("replay").sample(10).data).all())
                out["checkpoint_items"] = b.checkpoint()["items"]["replay"]
        except shmreplay.ShmReplayError as exc:
            out["new_client"] = f"{type(exc).__name__}: {exc}"
        out["second_instance"] = start()  # needs room for its table
        t.insert(stamped_row(9999))
        t.flush(timeout=10)
        out["still_serving"] = t.info().current_size
        a.close()

        # Killed; its segments removed; someone takes the space: the restart says so.
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        remove_shm_objects(d.name)
        _fill_dev_shm()
        out["restore_when_full"] = start(d.name)
        os.unlink("/dev/shm/filler")  # space again: it restores the checkpoint
        out["restore_after_freeing"] = start(d.name)
        d = daemons[-1]
        with shmreplay.attach(d.name) as c:
            out["restored_size"] = c.table("replay").info().current_size
            out["restored_ok"] = bool(verify_stamped(c.table("replay").sample(500).data).all())

        # Killed again, its semaphores lost and /dev/shm full: it cannot make new ones.
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        for entry in os.listdir("/dev/shm"):
            if entry.startswith("sem."):
                os.unlink(f"/dev/shm/{entry}")
        _fill_dev_shm()
        out["adopt_when_full"] = start(d.name)
        os.unlink("/dev/shm/filler")
        out["adopt_after_freeing"] = start(d.name)
        out["adopted"] = "adopted the segment" in daemons[-1].log()
        with shmreplay.attach(d.name) as c:
            out["adopted_size"] = c.table("replay").info().current_size
    finally:
        for d in daemons:
            d.close()
        if os.path.exists("/dev/shm/filler"):
            os.unlink("/dev/shm/filler")
    return out


def _namespaces_work() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return r.returncode == 0


@pytest.mark.skipif(not _namespaces_work(), reason="needs root and mount namespaces (unshare)")
def test_a_full_dev_shm_at_run_time_harms_no_running_table(tmp_path):
    """/dev/shm (a private 8 MiB tmpfs) filled to the last page after the table is created:
    inserts (3,000, wrapping the table) and samples go on, a new client attaches, samples and
    checkpoints, the daemon keeps serving. What needs new room fails with a clear error naming
    /dev/shm and its free space: a second instance, a restart from the checkpoint, a restart
    that must create its semaphores. Once space is freed, the restarts restore and adopt."""
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_resources as m; "
        "print(json.dumps(m._full_dev_shm_scenario(sys.argv[2])))"
    )
    shell = 'mount -t tmpfs -o size=8m tmpfs /dev/shm && exec "$0" -c "$1" "$2" "$3"'
    here = str(Path(__file__).parent)
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, sys.executable]
        + [script, here, str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=180,
        start_new_session=True,  # its daemons die with it if the timeout kills it
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(out)
    assert out["free_after_fill"] < 1 << 16
    assert out["rows_ok"] and out["size"] == 1000
    assert out["new_client"] is True and out["checkpoint_items"] == 1000
    assert out["still_serving"] == 1000
    for key in ("second_instance", "restore_when_full"):
        assert "/dev/shm has" in out[key] and "free" in out[key], out[key]
        assert "Traceback" not in out[key], out[key]
    assert "cannot create semaphore /dev/shm/sem." in out["adopt_when_full"]
    assert "Traceback" not in out["adopt_when_full"]
    assert out["restore_after_freeing"] == "started" and out["restored_size"] == 1000
    assert out["restored_ok"]
    assert out["adopt_after_freeing"] == "started" and out["adopted"]
    assert out["adopted_size"] == 1000


# -- file descriptors ----------------------------------------------------------------------------

CHILD_NOFILE = 256  # the client's limit in the test: small, so that filling it is quick


def _take_all_descriptors() -> list[int]:
    fds = []
    try:
        while True:
            fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        return fds


def _attach_with_spare_descriptors(name: str, spares: list[int], out) -> None:
    """In a child under a low RLIMIT_NOFILE: with only ``k`` descriptors free, attach; report
    (k, outcome, message, descriptors free afterwards) for each k."""
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (CHILD_NOFILE, CHILD_NOFILE))
    gc.collect()  # objects of earlier tests inherited through fork: their descriptors close now
    results = []
    for k in spares:
        fds = _take_all_descriptors()
        for _ in range(k):
            os.close(fds.pop())
        try:
            shmreplay.attach(name, timeout=2).close()
            outcome, message = "ok", ""
        except Exception as exc:  # noqa: BLE001 (the parent checks it is the clear one)
            outcome, message = type(exc).__name__, str(exc)
        gc.collect()  # a mapping still viewed by a collectable cycle is closed by the gc
        free = len(_take_all_descriptors_and_close())
        for fd in fds:
            os.close(fd)
        results.append((k, outcome, message, free))
    out.put(results)


def _take_all_descriptors_and_close() -> list[int]:
    fds = _take_all_descriptors()
    for fd in fds:
        os.close(fd)
    return fds


def test_a_client_out_of_descriptors_gets_a_clear_error_at_attach(daemon_factory):
    """With 0, 1, 2, ... descriptors to spare, attach either works or raises TooManyOpenFiles
    (an OSError and a ShmReplayError) giving the limit and how to raise it — at whichever
    step it ran out (record, socket, segment, mapping, semaphore) — and leaks none."""
    d = daemon_factory(TABLE)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    spares = list(range(8))
    p = ctx.Process(target=_attach_with_spare_descriptors, args=(d.name, spares, out))
    p.start()
    try:
        results = out.get(timeout=60)
    finally:
        p.join(10)
    outcomes = {k: outcome for k, outcome, _, _ in results}
    assert outcomes[0] == "TooManyOpenFiles" and outcomes[spares[-1]] == "ok", results
    for k, outcome, message, free in results:
        assert outcome in ("ok", "TooManyOpenFiles"), (k, outcome, message)
        if outcome != "ok":
            assert f"limit {CHILD_NOFILE}" in message and "ulimit -n" in message, message
        assert free == k, (f"attach with {k} spare leaked {k - free} descriptor(s)", results)
    with shmreplay.attach(d.name) as c:  # half-made clients were reclaimed by the daemon
        deadline = time.monotonic() + 10
        while len(c.server_info()["clients"]) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(c.server_info()["clients"]) == 1
    assert d.proc.poll() is None


def test_a_daemon_out_of_descriptors_serves_its_clients_refuses_new_ones_and_recovers(
    daemon_factory,
):
    """The daemon's RLIMIT_NOFILE is lowered under it (prlimit) and 60 connections are made
    and kept idle. It accepts what it can spare, refuses the rest with TooManyOpenFiles
    (closing them) and logs that once; a new attach gets that error at once; the attached
    client inserts, samples and asks for info as before. When the idle connections close it
    accepts again."""
    from shmreplay.daemon.clients import FD_RESERVE

    d = daemon_factory(TABLE)
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert_batch(stamped_batch(np.arange(100)))
        t.flush()
        proc = psutil.Process(d.proc.pid)
        hard = proc.rlimit(psutil.RLIMIT_NOFILE)[1]
        proc.rlimit(psutil.RLIMIT_NOFILE, (proc.num_fds() + FD_RESERVE + 5, hard))
        path = InstanceRecord.read(d.name).socket
        idle = []
        try:
            for _ in range(60):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                idle.append(s)
            refused = 0
            waiting = list(idle)  # the daemon works through its backlog: refusals come in
            deadline = time.monotonic() + 15
            while refused < 50 and time.monotonic() < deadline:
                readable, _, _ = select.select(waiting, [], [], 0.2)
                for s in readable:
                    reply = s.recv(4096)
                    assert b"TooManyOpenFiles" in reply and b"out of file descriptors" in reply
                    waiting.remove(s)
                    refused += 1
            time.sleep(0.5)
            refused += len(select.select(waiting, [], [], 0)[0])
            assert 30 <= refused < 60, refused  # some accepted (and held), the rest refused
            with pytest.raises(shmreplay.errors.TooManyOpenFiles, match="LimitNOFILE"):
                shmreplay.attach(d.name, timeout=2)
            # The attached client goes on as before.
            t.insert_batch(stamped_batch(np.arange(100, 200)))
            t.flush(timeout=10)
            assert verify_stamped(t.sample(50, timeout=5).data).all()
            assert client.server_info()["tables"]["replay"]["current_size"] == 200
            assert d.log().count("out of file descriptors") == 1
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 10
        while True:  # the daemon sees the connections close and accepts again
            try:
                with shmreplay.attach(d.name, timeout=2) as again:
                    assert again.table("replay").info().current_size == 200
                break
            except shmreplay.errors.TooManyOpenFiles:
                assert time.monotonic() < deadline, "the daemon did not recover"
                time.sleep(0.2)
        assert "file descriptors available again" in d.log()
    assert d.proc.poll() is None
