"""The systemd notify protocol and the unit file.

A fake service manager is a Unix datagram socket bound in a private directory (or in the abstract
namespace, as systemd itself does for some managers) with ``SO_PASSCRED`` on, so each message
comes with the sender's pid, which is what ``NotifyAccess=main`` checks.
"""

from __future__ import annotations

import configparser
import itertools
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shmreplay.daemon import notify
from shmreplay.daemon.notify import Notifier, watchdog_interval
from shmreplay.engine.instance import InstanceRecord, shm_objects
from shmreplay.testing import table_toml

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "shmreplay@.service"
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
_names = itertools.count()


class FakeManager:
    """The receiving end of ``$NOTIFY_SOCKET``: ``env`` is the value to put in the variable."""

    def __init__(self, kind: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: str | None = None
        try:
            if kind == "path":
                # Under /tmp, not tmp_path: sun_path holds 108 bytes and pytest's paths are long.
                self._dir = tempfile.mkdtemp(prefix="shmr-notify-", dir="/tmp")
                address: str | bytes = os.path.join(self._dir, "notify.sock")
                self.env = address
            else:
                name = f"shmreplay-test-{os.getpid()}-{next(_names)}"
                address, self.env = b"\0" + name.encode(), "@" + name
            self.sock.bind(address)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        except BaseException:
            self.close()
            raise

    def recv(self, timeout: float = 2.0) -> tuple[str, int] | None:
        """The next message and its sender's pid, or None after ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        return data.decode(), pid

    def drain(self) -> list[str]:
        out = []
        while (msg := self.recv(timeout=0.01)) is not None:
            out.append(msg[0])
        return out

    def close(self) -> None:
        self.sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@pytest.fixture(params=["path", "abstract"])
def manager(request) -> Iterator[FakeManager]:
    m = FakeManager(request.param)
    yield m
    m.close()


@pytest.fixture
def path_manager() -> Iterator[FakeManager]:
    m = FakeManager("path")
    yield m
    m.close()


# -- messages ----------------------------------------------------------------------------------

MESSAGES = [
    (lambda n: n.ready(), "READY=1"),
    (lambda n: n.ready("serving 2 tables"), "READY=1\nSTATUS=serving 2 tables"),
    (lambda n: n.status("3 clients"), "STATUS=3 clients"),
    (lambda n: n.status("line one\nline two"), "STATUS=line one line two"),  # no injection
    (lambda n: n.stopping(), "STOPPING=1"),
    (lambda n: n.stopping("checkpointing"), "STOPPING=1\nSTATUS=checkpointing"),
    (lambda n: n.mainpid(4242), "MAINPID=4242"),
    (lambda n: n.mainpid(), f"MAINPID={os.getpid()}"),
    (lambda n: n.extend_timeout(2.5), "EXTEND_TIMEOUT_USEC=2500000"),
    (lambda n: n.notify("A=1", "B=2"), "A=1\nB=2"),
]


@pytest.mark.parametrize(("call", "expected"), MESSAGES)
def test_exact_messages(manager: FakeManager, call, expected: str) -> None:
    n = Notifier({"NOTIFY_SOCKET": manager.env})
    assert n.enabled
    assert call(n) is True
    assert manager.recv() == (expected, os.getpid())
    assert manager.drain() == []  # one datagram per call


def test_reads_the_process_environment(manager: FakeManager, monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", manager.env)
    assert Notifier().ready()
    assert manager.recv() == ("READY=1", os.getpid())
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not Notifier().enabled


def test_no_socket_means_no_op() -> None:
    n = Notifier({"WATCHDOG_USEC": "30000000"})  # a watchdog without a socket is no watchdog
    assert not n.enabled
    assert n.watchdog_interval is None
    for call in (n.ready, n.watchdog, n.stopping, n.mainpid, n.watchdog_tick):
        assert call() is False
    assert n.status("x") is False
    assert n.extend_timeout(1) is False


# -- watchdog ----------------------------------------------------------------------------------

WATCHDOG_CASES = [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),  # WATCHDOG_PID unset: meant for us
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # our parent's, inherited
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "1000"}, 0.0005),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "30s"}, None),
    ({"WATCHDOG_USEC": ""}, None),
]


@pytest.mark.parametrize(("env", "expected"), WATCHDOG_CASES)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


def test_watchdog_interval_reads_the_process_environment(monkeypatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 2.0


def test_watchdog_pings_when_due(manager: FakeManager) -> None:
    n = Notifier({"NOTIFY_SOCKET": manager.env, "WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval == 15.0
    assert n.watchdog() is True
    assert manager.recv() == ("WATCHDOG=1", os.getpid())
    now = time.monotonic()
    assert n.watchdog_tick(now + 1.0) is False  # not due: no datagram at all
    assert manager.drain() == []
    assert n.watchdog_tick(now + 16.0) is True
    assert manager.recv() == ("WATCHDOG=1", os.getpid())
    assert n.watchdog_tick(time.monotonic() + 1.0) is False  # the ping restarted the interval
    assert manager.drain() == []


def test_no_watchdog_no_ping(manager: FakeManager) -> None:
    n = Notifier({"NOTIFY_SOCKET": manager.env})
    assert n.watchdog_interval is None
    assert n.watchdog() is False
    assert n.watchdog_tick(time.monotonic() + 1e6) is False
    assert manager.drain() == []


# -- failures never reach the daemon -----------------------------------------------------------


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "shmreplay" and r.levelno == logging.WARNING]


def test_unreachable_manager_warns_once(caplog) -> None:
    gone = FakeManager("path")
    env = gone.env
    gone.close()  # the socket file is gone: every send fails
    n = Notifier({"NOTIFY_SOCKET": env, "WATCHDOG_USEC": "2000000"})
    with caplog.at_level(logging.WARNING, logger="shmreplay"):
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.status("still here") is False
    warnings = _warnings(caplog)
    assert len(warnings) == 1
    assert env in warnings[0].getMessage()


def test_unsupported_address_is_ignored_with_one_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="shmreplay"):
        n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "2000000"})
        assert not n.enabled and n.watchdog_interval is None
        assert n.ready() is False
    assert len(_warnings(caplog)) == 1


def test_a_manager_that_does_not_read_stalls_us_for_at_most_the_timeout(
    manager: FakeManager, monkeypatch, caplog
) -> None:
    """The kernel queues a few datagrams (net.unix.max_dgram_qlen), then a send blocks: it must
    give up after SEND_TIMEOUT_S instead of freezing the serve loop."""
    monkeypatch.setattr(notify, "SEND_TIMEOUT_S", 0.05)
    n = Notifier({"NOTIFY_SOCKET": manager.env})
    with caplog.at_level(logging.WARNING, logger="shmreplay"):
        for _ in range(10_000):
            if not n.status("x"):
                break
        else:
            pytest.fail("10000 datagrams queued without a reader; expected the queue to fill")
        t0 = time.monotonic()
        assert n.status("y") is False
        assert time.monotonic() - t0 < 1.0
    assert len(_warnings(caplog)) == 1


# -- the daemon, end to end --------------------------------------------------------------------


def test_daemon_sends_ready_after_its_tables_exist(
    daemon_factory, path_manager: FakeManager, monkeypatch
) -> None:
    """``shmreplay serve`` under a fake systemd: READY=1 from the daemon's own pid once every
    table's segment and the instance record exist, WATCHDOG=1 at the interval systemd asks
    for, STOPPING=1 on SIGTERM.

    "After" is checked at the moment READY arrives: a daemon that created a table after
    signalling readiness could slip through only if it did so within that instant.
    """
    monkeypatch.setenv("NOTIFY_SOCKET", path_manager.env)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    d = daemon_factory(table_toml("replay") + table_toml("other"), wait=False)

    seen: list[str] = []
    serving_since: float | None = None
    deadline = time.monotonic() + 30.0
    while True:
        msg = path_manager.recv(timeout=0.05)
        if msg is not None:
            text, pid = msg
            seen.append(text)
            if "READY=1" in text.splitlines():
                objects = shm_objects(d.name)
                rec = InstanceRecord.read(d.name)
                assert pid == d.proc.pid, "READY=1 must come from the main pid (NotifyAccess=main)"
                for table in ("replay", "other"):
                    assert f"shmreplay.{d.name}.{table}" in objects, (table, objects)
                assert rec is not None and rec.pid == d.proc.pid
                assert os.path.exists(rec.socket)
                break
        if d.proc.poll() is not None:
            pytest.fail(f"daemon exited with {d.proc.returncode}:\n{d.log()}")
        now = time.monotonic()
        rec = InstanceRecord.read(d.name)
        if serving_since is None and rec is not None and rec.pid == d.proc.pid:
            serving_since = now
        if serving_since is not None and now - serving_since > 5.0:
            pytest.fail(f"serving for 5 s without READY=1 (got {seen})")
        assert now < deadline, f"daemon neither served nor signalled readiness:\n{d.log()}"

    pings = 0
    deadline = time.monotonic() + 5.0
    while pings < 3 and time.monotonic() < deadline:
        msg = path_manager.recv(timeout=0.2)
        if msg is not None and "WATCHDOG=1" in msg[0].splitlines():
            assert msg[1] == d.proc.pid
            pings += 1
    assert pings >= 3, f"expected WATCHDOG=1 every 0.1 s after READY=1; got {path_manager.drain()}"

    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=15) == 0, d.log()
    after = [line for m in path_manager.drain() for line in m.splitlines()]
    assert "STOPPING=1" in after, after


# -- the unit file ------------------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(UNIT)
    return parser


UNIT_SETTINGS = [
    ("Service", "Type", "notify"),
    ("Service", "NotifyAccess", "main"),
    ("Service", "WatchdogSec", "30"),
    ("Service", "Restart", "on-failure"),
    ("Service", "User", "shmreplay"),
    ("Service", "Group", "shmreplay"),
    ("Service", "RemoveIPC", "no"),
    ("Service", "RuntimeDirectory", "shmreplay"),
    ("Service", "RuntimeDirectoryPreserve", "yes"),
    ("Service", "Environment", "SHMREPLAY_RUNTIME_DIR=%t/shmreplay"),
    ("Service", "StateDirectory", "shmreplay/%i"),
    ("Service", "ProtectSystem", "strict"),
    ("Service", "ReadWritePaths", "/dev/shm"),
    ("Service", "PrivateTmp", "yes"),
    ("Service", "NoNewPrivileges", "yes"),
    ("Service", "ProtectHome", "yes"),
    ("Service", "RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
    ("Service", "KillSignal", "SIGTERM"),
    ("Service", "KillMode", "mixed"),
    ("Install", "WantedBy", "multi-user.target"),
]


@pytest.mark.parametrize(("section", "key", "value"), UNIT_SETTINGS)
def test_unit_setting(section: str, key: str, value: str) -> None:
    assert _unit().get(section, key, fallback=None) == value


def test_unit_runs_the_instance_from_its_own_file() -> None:
    assert _unit().get("Service", "ExecStart") == (
        "/usr/bin/env shmreplay serve --tables /etc/shmreplay/%i.toml --name %i"
    )


def test_unit_leaves_time_for_a_final_checkpoint() -> None:
    stop = _unit().get("Service", "TimeoutStopSec")
    assert int(stop) >= 120  # seconds: ~1 GB/s to disk, tables of tens of GB


def test_unit_keeps_what_the_daemon_needs() -> None:
    """Settings that would break the daemon in ways a static check can see."""
    service = _unit()["Service"]
    assert service.get("DynamicUser", "no") == "no"  # implies RemoveIPC=yes
    assert service.get("ProtectProc", "default") != "invisible"  # clients' /proc must be readable
    assert service.get("PrivateIPC", "no") == "no"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    # verify instantiates the template itself; its warnings name the file, errors fail it.
    result = subprocess.run(
        [exe, "verify", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "shmreplay@" in line
    ]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
