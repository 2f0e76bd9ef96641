"""A control plane no client can stall: real daemons, real peers that misbehave.

Policy under test (see shmreplay/daemon/control_server.py): every connection is served at once and
without blocking; a peer that never reads, sends slowly or holds a table lock costs only itself;
a reply answers the request whose id it carries; long operations report progress and take a
timeout; a restoring daemon says so; attach honours its timeout and says why it gave up.
"""

from __future__ import annotations

import contextlib
import http.client
import multiprocessing as mp
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from test_hostile_input import connect as raw  # a bare control connection

import shmreplay
from shmreplay.control import ControlClient
from shmreplay.control import encode as frame  # a request frame
from shmreplay.engine.instance import InstanceRecord
from shmreplay.errors import DaemonBusy, DaemonNotRunning
from shmreplay.testing import lock_holder, table_toml, unique_name

CTX = mp.get_context("spawn")
ROW = {"obs": [0.0] * 8, "action": 1, "reward": 0.5, "done": False}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "shmreplay", *args], capture_output=True, text=True, timeout=timeout
    )


def closed_by_daemon(s: socket.socket, within: float) -> bool:
    """Whether the daemon closes ``s`` within ``within`` seconds (what it sent is drained)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        s.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            if not s.recv(1 << 16):
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def attach_and_insert(name: str, timeout: float = 3.0) -> float:
    """Attach, insert and flush a row, read server_info; returns the seconds it took."""
    t0 = time.monotonic()
    with shmreplay.attach(name, timeout=timeout) as client:
        t = client.table("replay")
        t.insert(ROW)
        t.flush(timeout=timeout)
        assert client.server_info()["tables"]["replay"]["current_size"] >= 1
    return time.monotonic() - t0


@contextlib.contextmanager
def holding_the_lock(name: str, table: str = "replay"):
    """A process that takes ``table``'s lock and sleeps holding it; killed on exit."""
    ready = CTX.Event()
    p = CTX.Process(target=lock_holder, args=(name, table, ready))
    p.start()
    try:
        assert ready.wait(30)
        yield p
    finally:
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
        p.join(10)


@contextlib.contextmanager
def stopped(pid: int):
    """The process stopped (SIGSTOP) for the block. The signal is delivered asynchronously: on a
    loaded machine the process can still answer a request or two after kill() returns, so wait
    until the kernel reports it stopped (state T)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while psutil.Process(pid).status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
        time.sleep(0.001)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# -- connections served concurrently and without blocking ----------------------------------------


def test_a_peer_that_never_reads_its_replies_stalls_nobody(daemon_factory):
    """On c7003f0 the control thread blocked in sendall to this peer: attach, info and stop
    failed for everyone ("no daemon is running"). Now it costs only its own connection: past
    OUTPUT_PAUSE bytes of unread replies its requests wait, and with nothing read for FRAME_S
    the daemon closes it."""
    d = daemon_factory(table_toml())
    hostile = raw(d.name)
    try:
        hostile.sendall(b"".join(frame({"op": "info", "id": i}) for i in range(4000)))
        time.sleep(0.5)  # let the daemon's socket buffer towards the peer fill up
        assert attach_and_insert(d.name) < 3.0
        r = cli("info", "--name", d.name, "--timeout", "5")
        assert r.returncode == 0, r.stderr
        # Not a byte read: after FRAME_S without progress the daemon gives up on this peer.
        deadline = time.monotonic() + 15
        while "does not read its replies" not in d.log(200):
            assert time.monotonic() < deadline, d.log(20)
            time.sleep(0.1)
        assert closed_by_daemon(hostile, within=5.0)
    finally:
        hostile.close()
    r = cli("stop", "--name", d.name, "--timeout", "10")
    assert r.returncode == 0, r.stderr


def test_a_client_stopped_holding_a_table_lock_stalls_only_what_needs_that_lock(daemon_factory):
    """On c7003f0 one `shmreplay info` froze the control thread on the lock of a stopped client:
    nobody could attach any more. Now info answers LockTimeout naming the holder within about a
    second, and attaching, other requests and stop go on."""
    d = daemon_factory(table_toml() + table_toml("other"))
    with holding_the_lock(d.name) as holder, stopped(holder.pid):
        t0 = time.monotonic()
        r = cli("info", "--name", d.name, "--timeout", "5")
        took = time.monotonic() - t0
        assert r.returncode == 1 and took < 5.0, (took, r.stderr)
        assert f"pid {holder.pid}" in r.stderr and "'replay'" in r.stderr, r.stderr
        # The control server is not stuck: a client attaches and uses the other table.
        with shmreplay.attach(d.name, timeout=3) as client:
            t = client.table("other")
            t.insert(ROW)
            t.flush(timeout=3)
            assert client.set_rate_limiter("other", {"kind": "min_size", "min_size": 2})
        r = cli("limiter", "replay", "--name", d.name, "--kind", "min_size", "--min-size", "2")
        assert r.returncode == 1 and f"pid {holder.pid}" in r.stderr, r.stderr
    r = cli("info", "--name", d.name, "--timeout", "5")
    assert r.returncode == 0, r.stderr


def test_a_checkpoint_waits_a_bounded_time_for_a_stopped_lock_holder(daemon_factory, tmp_path):
    """On c7003f0 a checkpoint waited without limit for the lock of a stopped client (and so
    did a stop's final checkpoint). Now it gives up after checkpoint.LOCK_TIMEOUT_S, naming the
    holder; the previous checkpoint stays the latest, and once the holder is gone a checkpoint
    succeeds."""
    from shmreplay.daemon.checkpoint import LOCK_TIMEOUT_S

    d = daemon_factory(f'[server]\ncheckpoint_dir = "{tmp_path}"\n' + table_toml())
    assert cli("checkpoint", "--name", d.name).returncode == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    with holding_the_lock(d.name) as holder, stopped(holder.pid):
        t0 = time.monotonic()
        r = cli("checkpoint", "--name", d.name, "--timeout", str(LOCK_TIMEOUT_S + 20))
        took = time.monotonic() - t0
        assert r.returncode == 1, r.stderr
        assert LOCK_TIMEOUT_S <= took < LOCK_TIMEOUT_S + 10, took
        assert f"pid {holder.pid}" in r.stderr and "checkpoint" in r.stderr, r.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    r = cli("checkpoint", "--name", d.name)
    assert r.returncode == 0, r.stderr
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")]) == 2


def test_slow_and_silent_peers_are_closed_and_cost_little_memory(daemon_factory):
    """On c7003f0 each connection could hold a partial frame of up to 1 MiB forever (300 of
    them took the daemon from 43 to 344 MiB). Now a request frame is at most 64 KiB (a bigger
    announced length closes the connection at once), a frame begun must complete within
    FRAME_S and a connection must send its first request within FIRST_FRAME_S; an attached
    client's idle connection is never closed for being idle."""
    d = daemon_factory(table_toml())
    daemon = psutil.Process(d.proc.pid)
    client = shmreplay.attach(d.name)
    try:
        before = daemon.memory_info().rss
        big = []
        for _ in range(100):
            s = raw(d.name)
            big.append(s)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(struct.pack(">I", (1 << 20) - 8) + bytes(200 << 10))  # closed midway
        try:
            assert all(closed_by_daemon(s, within=5.0) for s in big)
            grown = daemon.memory_info().rss - before
            assert grown < 16 << 20, f"daemon grew by {grown >> 20} MiB"
        finally:
            for s in big:
                s.close()
        silent, partial = raw(d.name), raw(d.name)
        try:
            partial.sendall(frame({"op": "info", "id": 1})[:7])
            t0 = time.monotonic()
            assert closed_by_daemon(silent, within=10.0)
            assert closed_by_daemon(partial, within=10.0)
            assert 3.0 < time.monotonic() - t0 < 10.0
        finally:
            silent.close()
            partial.close()
        # The attached client, idle all along, still works.
        t = client.table("replay")
        t.insert(ROW)
        t.flush(timeout=3)
        assert client.server_info()["clients"] == [{"pid": os.getpid(), "channel": 0}]
    finally:
        client.close()


# -- request ids ---------------------------------------------------------------------------------


def test_a_late_reply_is_discarded_not_taken_for_the_next_one(daemon_factory):
    """On c7003f0, after one request timed out, every later reply answered the previous
    request (server_info() returned a limiter). Replies now carry their request's id."""
    d = daemon_factory(table_toml())
    ctl = ControlClient(InstanceRecord.read(d.name).socket, timeout=0.5)
    try:
        with (
            stopped(d.proc.pid),
            pytest.raises(DaemonBusy, match="did not answer 'info' within 0.5 s"),
        ):
            ctl.request("info")
        reply = ctl.request(
            "set_rate_limiter", timeout=5, table="replay", rate_limiter={"kind": "queue", "size": 7}
        )
        assert reply["rate_limiter"]["kind"] == "queue" and "tables" not in reply
        assert "tables" in ctl.request("info", timeout=5)
    finally:
        ctl.close()


# -- long operations -----------------------------------------------------------------------------


def test_checkpoint_takes_a_timeout_and_shows_progress(daemon_factory, tmp_path):
    """On c7003f0 `shmreplay checkpoint` failed after 10 s with "lost the control connection"
    while the daemon went on with it. Now --timeout bounds the wait (DaemonBusy, the daemon goes
    on), and without one the CLI waits as long as the daemon reports progress, with a bar."""
    d = daemon_factory(f'[server]\ncheckpoint_dir = "{tmp_path}"\n' + table_toml())
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert(ROW)
        t.flush()
        with holding_the_lock(d.name) as holder:  # the checkpoint waits for this lock
            t0 = time.monotonic()
            r = cli("checkpoint", "--name", d.name, "--timeout", "1.5")
            assert r.returncode == 1 and "within 1.5 s" in r.stderr, r.stderr
            assert 1.4 < time.monotonic() - t0 < 8.0
            assert "lost the control connection" not in r.stderr
            waiting = subprocess.Popen(
                [sys.executable, "-m", "shmreplay", "checkpoint", "--name", d.name],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            time.sleep(2.5)  # heartbeats reach the CLI meanwhile
            assert waiting.poll() is None
            os.kill(holder.pid, signal.SIGKILL)
            out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err
        assert "checkpoint " in out and "longest table lock hold" in out
        assert "checkpoint: started" in err  # the daemon's progress, in the tqdm bar on stderr
        assert client.checkpoint(timeout=30)["items"] == {"replay": 1}
    assert len(list(tmp_path.glob("checkpoint-*"))) == 3  # the one that timed out went on


def test_stop_follows_the_final_checkpoint(daemon_factory, tmp_path):
    """On c7003f0 `stop` reported failure while the final checkpoint ran. Now it shows the
    final checkpoint's progress and returns once the daemon has exited."""
    d = daemon_factory(f'[server]\ncheckpoint_dir = "{tmp_path}"\n' + table_toml())
    attach_and_insert(d.name)
    with holding_the_lock(d.name) as holder:  # the final checkpoint waits for this lock
        stopping = subprocess.Popen(
            [sys.executable, "-m", "shmreplay", "stop", "--name", d.name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.5)
        assert stopping.poll() is None and d.proc.poll() is None
        os.kill(holder.pid, signal.SIGKILL)
        out, err = stopping.communicate(timeout=60)
    assert stopping.returncode == 0, err
    assert "stopped" in out and "final checkpoint" in err
    assert d.proc.wait(10) == 0
    assert len(list(tmp_path.glob("checkpoint-*"))) == 1


def test_info_during_a_restore_says_so_and_attach_waits_for_it(daemon_factory, tmp_path):
    """On c7003f0 `info` during a restore said no daemon was running. Now the control socket
    answers during the restore: info's state is "restoring", attach waits for it (within its
    timeout) or says that the daemon is restoring."""
    n = 1_000_000
    toml = table_toml(
        max_size=n,
        signature='[table.signature]\nobs = { shape = [64], dtype = "uint8" }\n',
    )
    name = unique_name()
    first = daemon_factory(f'[server]\ncheckpoint_dir = "{tmp_path}"\n' + toml, name=name)
    with shmreplay.attach(name, prefault=False) as client:
        t = client.table("replay")
        for start in range(0, n, 100_000):
            t.insert_batch({"obs": np.full((100_000, 64), start % 251, np.uint8)})
        t.flush(timeout=60)
        client.checkpoint(timeout=120)
    first.close()
    second = daemon_factory(
        f'[server]\ncheckpoint_dir = "{tmp_path}"\n' + toml, name=name, wait=False
    )
    states, progress, busy = [], [], None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and second.proc.poll() is None:
        rec = InstanceRecord.read(name)
        if rec is None or not rec.alive():
            time.sleep(0.01)
            continue
        ctl = ControlClient(rec.socket, timeout=10)
        try:
            info = ctl.request("info")
        finally:
            ctl.close()
        states.append(info["state"])
        if states[-1] == "serving":
            break
        progress.append(info["progress"]["line"])
        if busy is None:
            try:
                shmreplay.attach(name, timeout=0.5).close()
                busy = False
            except DaemonBusy as exc:
                busy = str(exc)
    assert "restoring" in states, states
    assert progress[0].startswith("restore"), progress
    assert busy is False or "is restoring a checkpoint" in busy, busy
    with shmreplay.attach(name, timeout=60) as client:
        assert client.table("replay").info().current_size == n


# -- attach's timeout ----------------------------------------------------------------------------


def test_attach_honours_its_timeout_and_says_the_daemon_is_stopped(daemon_factory):
    """On c7003f0 attach(timeout=3) to a stopped daemon took 10 s and then said no daemon was
    running. Now it gives up on time and says the daemon is alive but stopped."""
    d = daemon_factory(table_toml())
    with stopped(d.proc.pid):
        t0 = time.monotonic()
        with pytest.raises(DaemonBusy) as err:
            shmreplay.attach(d.name, timeout=1.0)
        took = time.monotonic() - t0
    assert took < 3.0, took
    assert not isinstance(err.value, DaemonNotRunning)
    assert f"pid {d.proc.pid}" in str(err.value) and "kill -CONT" in str(err.value)
    assert attach_and_insert(d.name) < 3.0
    with pytest.raises(DaemonNotRunning, match="no shmreplay daemon"):
        shmreplay.attach(unique_name(), timeout=0.2)


# -- metrics -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_taken_metrics_port_does_not_keep_the_tables_from_being_served(daemon_factory):
    """On c7003f0 any user holding 127.0.0.1:<metrics_port> kept the daemon from starting.
    Now it serves the tables without metrics and logs why, naming the port."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        d = daemon_factory(f"[server]\nmetrics_port = {port}\n" + table_toml())
        assert attach_and_insert(d.name) < 3.0
        log = d.log(200)
        assert "WITHOUT metrics" in log and str(port) in log, log


def test_idle_scrape_connections_do_not_delay_a_scrape(daemon_factory):
    """On c7003f0 the metrics server had one thread: three idle connections delayed a scrape by
    15 s. Each connection now has a thread of its own."""
    port = _free_port()
    d = daemon_factory(f"[server]\nmetrics_port = {port}\n" + table_toml())
    attach_and_insert(d.name)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        time.sleep(0.2)  # accepted: on c7003f0 the first one now holds the only thread
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read().decode()
        conn.close()
        took = time.monotonic() - t0
    finally:
        for s in idle:
            s.close()
    assert resp.status == 200 and "shmreplay_table_current_size" in body
    assert took < 2.0, took  # c7003f0: 5 s (REQUEST_TIMEOUT_S) at least


def test_big_tables_statistics_scans_are_reused_by_the_daemon():
    """TableCore.info(max_age=...) (what the daemon's info and metrics call) reuses a recent
    scan of a big table's priorities and episodes instead of scanning every slot per call;
    info() without max_age (Table.info) always scans."""
    from shmreplay.config import load_config
    from shmreplay.engine import table as table_mod
    from shmreplay.engine.layout import Ctrl, SlotState
    from shmreplay.testing import local_table

    def spec(max_size: int):
        toml = table_toml(
            max_size=max_size, signature='[table.signature]\nx = { dtype = "int8" }\n'
        )
        path = os.path.join(os.environ["SHMREPLAY_RUNTIME_DIR"], f"{unique_name()}.toml")
        with open(path, "w") as f:
            f.write(toml)
        try:
            return load_config(path).tables[0]
        finally:
            os.unlink(path)

    for max_size in (table_mod.SCAN_REUSE_SLOTS, 1000):
        with local_table(spec(max_size)) as core:
            core.state[:10] = SlotState.READY
            core.priority[:10] = np.arange(1, 11)
            core.ctrl[Ctrl.SIZE] = 10
            assert core.info(max_age=60).max_priority == 10.0
            core.priority[9] = 99.0
            big = max_size >= table_mod.SCAN_REUSE_SLOTS
            assert core.info(max_age=60).max_priority == (10.0 if big else 99.0)  # reused if big
            assert core.info().max_priority == 99.0  # Table.info: always exact
            assert core.info(max_age=0.0).max_priority == 99.0
