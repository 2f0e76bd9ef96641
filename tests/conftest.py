"""Shared fixtures: a private runtime directory per test session, daemons that always stop, and
a check that nothing the tests started is left in /dev/shm or running."""

from __future__ import annotations

import os
import signal
import tempfile

import psutil
import pytest

from shmreplay.engine.instance import shm_objects
from shmreplay.testing import DaemonProcess


def pytest_configure(config):
    """A run ended by SIGTERM (``timeout``, a CI time limit) tears down as Ctrl-C does: every
    fixture's daemons are stopped and their objects removed, instead of being left running
    (they run in their own session, so the signal does not reach them)."""
    main_pid = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() != main_pid:  # a forked child of a test: die of the signal as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")

    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session", autouse=True)
def _private_runtime_dir():
    """Records and sockets of the tests' daemons live in a directory of their own."""
    with tempfile.TemporaryDirectory(prefix="shmreplay-rt-") as d:
        old = os.environ.get("SHMREPLAY_RUNTIME_DIR")
        os.environ["SHMREPLAY_RUNTIME_DIR"] = d
        yield d
        if old is None:
            os.environ.pop("SHMREPLAY_RUNTIME_DIR", None)
        else:
            os.environ["SHMREPLAY_RUNTIME_DIR"] = old


@pytest.fixture(autouse=True)
def _no_leaks():
    """Fail a test that leaves shmreplay objects of this pytest process in /dev/shm, or children."""
    stem = f"t{os.getpid()}-"
    yield
    me = psutil.Process()
    for child in me.children(recursive=True):
        try:
            if any("resource_tracker" in a or "forkserver" in a for a in child.cmdline()):
                continue  # multiprocessing's own helpers live for the whole session
            child.kill()
        except psutil.NoSuchProcess:
            pass
    left = [e for e in shm_objects() if stem in e]
    if left:
        from shmreplay.engine.instance import remove_shm_objects

        for inst in {e.removeprefix("sem.").split(".")[1] for e in left}:
            remove_shm_objects(inst)
        pytest.fail(f"test left objects in /dev/shm: {left}")


@pytest.fixture
def daemon_factory():
    """Start daemons from tables.toml text; every one is stopped and cleaned up afterwards."""
    started: list[DaemonProcess] = []

    def start(tables_toml: str, **kw) -> DaemonProcess:
        d = DaemonProcess(tables_toml, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()
