"""Run a daemon from Python: :class:`Server` starts ``python -m shmreplay serve`` as a child.

For scripts, notebooks and tests that want their replay tables without a service manager::

    with shmreplay.Server([spec]) as server:          # or a tables.toml text, or its path
        client = shmreplay.attach(server.name)
        ...
    # the daemon is stopped and /dev/shm holds nothing of it

Lifecycle: the constructor returns once the daemon serves (its instance record names the
child's pid and its control socket exists), or raises :class:`ServerStartError` with the tail
of the daemon's log if it exits first or is not ready in time. :meth:`Server.stop` sends
SIGTERM (the daemon wakes its clients with an error and removes its shared memory), then
SIGKILL if it does not exit in time, then removes whatever the instance left in /dev/shm.
``stop()`` is idempotent; a server still running when the interpreter exits is stopped by an
``atexit`` hook. The daemon runs in a session of its own, so a Ctrl-C in the terminal does not
reach it: the program decides when it stops. A ``kill -9`` of the parent runs no hook: the
daemon then keeps serving until ``shmreplay stop --name NAME`` (as a daemon started by hand
would).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ..config import TableSpec, check_instance_name, to_toml
from ..engine.instance import (
    InstanceRecord,
    lock_path,
    record_path,
    remove_shm_objects,
    shm_objects,
    socket_path,
)
from ..errors import ConfigError, DaemonNotRunning, ShmReplayError

__all__ = ["Server", "ServerStartError"]

# Lines of the daemon's log quoted in a ServerStartError: enough for a config error or a
# traceback's last frames, short enough to read.
LOG_TAIL_LINES = 25
# Seconds between checks for readiness: the daemon is usually ready within 100-300 ms.
POLL_S = 0.02

_counter = itertools.count()


class ServerStartError(DaemonNotRunning):
    """The daemon a :class:`Server` started exited before it served, or was not ready in time.

    ``returncode`` is its exit status (None if it was still running and was stopped), ``log``
    the tail of its log; the message includes both.
    """

    def __init__(self, message: str, returncode: int | None = None, log: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.log = log


def _default_name() -> str:
    return f"server-{os.getpid()}-{next(_counter)}"


class Server:
    """A ``shmreplay serve`` child process serving ``tables`` as instance ``name``.

    ``tables`` is a tables.toml text (a ``str`` holding a newline), the path of a tables.toml
    file, or a sequence of :class:`~shmreplay.TableSpec`. ``name`` overrides the file's
    ``[server] name``; without either, the instance gets a name unique to this process
    (``server-<pid>-<n>``).
    ``log`` is where the daemon's log goes: None (a private file, quoted in errors and
    returned by :meth:`log`), a path (appended to), or an open file or descriptor such as
    ``sys.stderr`` (inherited; errors then quote nothing). ``extra_args`` are added to the
    ``serve`` command line (``("--fresh",)``, ``("--restore", path)``, ...). Blocks for at most
    ``ready_timeout`` seconds until the daemon serves; attach with ``shmreplay.attach(name)``.

    The daemon lives as long as this process: it stops (as on :meth:`stop`, with a final
    checkpoint if checkpoint_dir is set) within ~0.1 s of this process exiting, even by
    ``kill -9``, so a killed program leaves no daemon and no shared memory behind.
    ``stop_with_owner=False`` lets it outlive this process (stop it with ``shmreplay stop``).
    """

    # Class-level defaults, so that stop() and __del__ are safe on a half-built object.
    proc: subprocess.Popen | None = None
    name = ""
    _tmp: str | None = None
    _log_file: IO[bytes] | None = None
    _log_path: str | None = None
    _stopped = True

    def __init__(
        self,
        tables: str | os.PathLike | Sequence[TableSpec],
        name: str | None = None,
        *,
        log: str | os.PathLike | IO | int | None = None,
        extra_args: Sequence[str] = (),
        ready_timeout: float | None = 30.0,
        stop_with_owner: bool = True,
    ) -> None:
        # Checked here, before anything starts: the daemon would refuse it after a second.
        if name is not None:
            self.name = check_instance_name(name, "Server(name=)")
        self._tmp = tempfile.mkdtemp(prefix="shmreplay-server-")
        try:
            path = self._tables_path(tables)
            if name is None:  # the file's [server] name, if it has one, so attach() finds it
                self.name = _file_name(path) or _default_name()
            stdout = self._open_log(log)
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shmreplay",
                    "serve",
                    "--tables",
                    str(path),
                    "--name",
                    self.name,
                    *(("--owner-pid", str(os.getpid())) if stop_with_owner else ()),
                    *extra_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C in the terminal reaches this program, which stops
                # its clients and then the daemon, instead of the daemon going first.
                start_new_session=True,
            )
            self._stopped = False
            atexit.register(self._stop_at_exit)
            if ready_timeout is not None:
                self.wait_ready(ready_timeout)
        except BaseException:
            self.close()
            raise

    # -- starting ------------------------------------------------------------------------------

    def _tables_path(self, tables: str | os.PathLike | Sequence[TableSpec]) -> Path:
        if isinstance(tables, str) and "\n" in tables:
            path = Path(self._tmp, "tables.toml")
            path.write_text(tables)
            return path
        if isinstance(tables, (str, os.PathLike)):
            path = Path(tables)
            if not path.is_file():
                raise ConfigError(
                    f"{path}: no such file; pass the path of a tables.toml, its text, or a "
                    "list of TableSpec"
                )
            return path.resolve()
        specs = list(tables)
        if not specs or not all(isinstance(t, TableSpec) for t in specs):
            raise ConfigError(
                f"tables must be a tables.toml text or path, or a non-empty sequence of "
                f"TableSpec; got {tables!r}"
            )
        path = Path(self._tmp, "tables.toml")
        path.write_text(to_toml(specs))
        return path

    def _open_log(self, log: str | os.PathLike | IO | int | None) -> IO | int:
        if log is None:
            self._log_path = os.path.join(self._tmp, "daemon.log")
            self._log_file = open(self._log_path, "ab")  # noqa: SIM115 (closed by stop())
            return self._log_file
        if isinstance(log, (str, os.PathLike)):
            self._log_path = os.fspath(log)
            self._log_file = open(self._log_path, "ab")  # noqa: SIM115 (closed by stop())
            return self._log_file
        if isinstance(log, int):
            return log
        return log.fileno() if hasattr(log, "fileno") else log

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the daemon serves (the constructor does, unless ``ready_timeout=None``);
        :class:`ServerStartError` if it exits first or ``timeout`` seconds pass."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            rec = InstanceRecord.read(self.name)
            if (
                rec is not None
                and rec.pid == self.proc.pid
                and os.path.exists(rec.socket)
                and _serving(rec.socket)
            ):
                return
            code = self.proc.poll()
            if code is not None:
                tail = self.log(LOG_TAIL_LINES)
                raise ServerStartError(
                    f"the shmreplay daemon for instance {self.name!r} exited with status "
                    f"{code} before it served" + _quote(tail, self._log_path),
                    code,
                    tail,
                )
            if time.monotonic() >= deadline:
                tail = self.log(LOG_TAIL_LINES)
                raise ServerStartError(
                    f"the shmreplay daemon for instance {self.name!r} was not serving after "
                    f"{timeout} s (pass a longer ready_timeout for large tables)"
                    + _quote(tail, self._log_path),
                    None,
                    tail,
                )
            time.sleep(POLL_S)

    # -- running -------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.proc.pid if self.proc is not None else -1

    def running(self) -> bool:
        """Whether the daemon process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def log(self, lines: int | None = None) -> str:
        """The daemon's log (its last ``lines`` lines), when it goes to a file; else ``""``."""
        if self._log_path is None:
            return ""
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.flush()
        try:
            with open(self._log_path, errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return ""
        if lines is None:
            return text
        return "\n".join(text.splitlines()[-lines:])

    def wait(self, timeout: float | None = None) -> int:
        """Block until the daemon exits (``shmreplay stop``, a signal); returns its status."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    # -- stopping ------------------------------------------------------------------------------

    def terminate(self, timeout: float = 15.0) -> int | None:
        """End the daemon: SIGTERM, wait up to ``timeout`` s, SIGKILL. Removes nothing (what
        it left stays for inspection; :meth:`stop` removes it). Returns its exit status."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return None if proc is None else proc.returncode

    def stop(self, timeout: float = 15.0) -> int | None:
        """Stop the daemon (:meth:`terminate`); then remove what the instance left in /dev/shm
        and the runtime directory. Idempotent; returns the daemon's exit status (None if it
        never started)."""
        proc = self.proc
        if not self._stopped:
            self._stopped = True
            atexit.unregister(self._stop_at_exit)
            self.terminate(timeout)
            # A killed daemon removed nothing: its segments, semaphores, record and socket
            # would otherwise stay until `shmreplay gc`. A clean exit left none of them. Only
            # what our daemon's record claims is ours: a daemon that failed to start (another
            # one serves the name, or it refused to adopt a dead one's tables) leaves those
            # objects to their owner, or to `serve --fresh`.
            try:
                rec = InstanceRecord.read(self.name)
            except ShmReplayError:  # an unsafe runtime directory, a planted record: not ours
                rec = None
            ours = proc is not None and rec is not None and rec.pid == proc.pid
            if ours and shm_objects(self.name):
                remove_shm_objects(self.name)
            if ours:
                for p in (record_path(self.name), socket_path(self.name), lock_path(self.name)):
                    with contextlib.suppress(OSError):
                        p.unlink()
        if self._log_file is not None:
            self._log_file.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            if self._log_path is not None and not os.path.exists(self._log_path):
                self._log_path = None  # it was our private file
        return None if proc is None else proc.returncode

    def _stop_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def close(self, timeout: float = 15.0) -> int | None:
        """The same as :meth:`stop`."""
        return Server.stop(self, timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"<shmreplay.Server {self.name!r} pid {self.pid} {state}>"


def _file_name(path: Path) -> str | None:
    """The ``[server] name`` a tables.toml sets, or None (a file the daemon will refuse is
    refused there, with its full report)."""
    try:
        with open(path, "rb") as f:
            name = tomllib.load(f).get("server", {}).get("name")
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        return None
    return name if isinstance(name, str) else None


def _quote(tail: str, log_path: str | None) -> str:
    if not tail.strip():
        return "; it logged nothing" if log_path else " (its log went to the terminal)"
    return f"; the end of its log:\n{tail}"


def _serving(socket_path: str) -> bool:
    """Whether the daemon behind ``socket_path`` serves its tables: its control socket answers
    during a restore too, with state "restoring"."""
    from ..control import ControlClient

    try:
        ctl = ControlClient(socket_path, timeout=POLL_S * 20)
    except OSError:
        return False
    try:
        return ctl.request("info").get("state", "serving") == "serving"
    except (ShmReplayError, OSError):
        return False
    finally:
        ctl.close()
