"""The client: ``attach()`` and :class:`Client`, the connection to an instance's daemon.

A client process maps the tables' segments and moves item data itself, through the
:class:`Table <shmreplay.client.table.Table>` handles it hands out. Writing takes no lock: the
daemon leases each client a block of free slots through the client's channel; the client fills
a slot (generation odd → data and priority → generation even) and publishes the slot index on
its single-producer ring; the daemon commits published slots in batches. Sampling takes the
table mutex for the selection only and copies rows after releasing it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import numpy as np
import posix_ipc
import psutil

from ..config import RateLimiterSpec, check_instance_name, parse_rate_limiter
from ..control import DEFAULT_TIMEOUT_S, PROTOCOL_VERSION, ControlClient
from ..engine.events import Event, sem_path
from ..engine.instance import (
    InstanceRecord,
    check_peer,
    pid_namespace_hint,
    record_path,
)
from ..engine.ownership import access_denied, is_out_of_descriptors, out_of_descriptors
from ..engine.shm import Segment
from ..engine.table import Sample, SampleInfo, TableCore, TableEvents, TableInfo
from ..errors import (
    ClientClosedError,
    DaemonBusy,
    DaemonNotRunning,
    InvalidArgumentError,
    RateLimiterTimeout,
    ShmReplayError,
    SignatureError,
    TableNotFoundError,
    TableQuarantined,
)
from ..values import check_priority
from .table import ReservedSlot, Table, _check_timeout
from .trajectory import TrajectoryWriter

__all__ = ["attach", "Client", "Table", "ReservedSlot", "Sample", "SampleInfo", "TableInfo"]

BYE_TIMEOUT_S = 1.0  # close() waits this long for the daemon to acknowledge a detach
# attach() waits at least this long for the daemon's answer, even with a timeout already spent.
MIN_ANSWER_S = 0.05


def attach(
    name: str = "default",
    timeout: float = 5.0,
    *,
    seed: int | None = None,
    prefault: bool = True,
) -> Client:
    """Attach to the running daemon of instance ``name``.

    Waits up to ``timeout`` seconds for the daemon to come up (so a script may start it and
    attach right away) and answer, then raises :class:`DaemonNotRunning` if none serves
    ``name``, or :class:`~shmreplay.errors.DaemonBusy` (a ``TimeoutError``) if one is running
    but did not let us attach in time: it is restoring a checkpoint (with its progress), or is
    stopped or stuck (with its pid and state). A client
    belongs to the process that attached it: attach again in each process (after ``fork`` too).
    ``seed`` seeds this client's sampling random generator (for reproducible runs).
    ``prefault`` maps every page of the tables in a background thread right away, which is
    several times cheaper than faulting them in one by one while writing or sampling; turn it
    off for a short-lived process that touches little of a large table.

    Raises :class:`~shmreplay.errors.PermissionDenied` (a ``PermissionError``) at once when an
    object of the instance belongs to another user, naming it, its owner and ``[server]
    group``; :class:`~shmreplay.errors.TooManyOpenFiles` (an ``OSError``) when this process or
    the daemon has no file descriptor left, with the limit and how to raise it.

    Trusts nothing another user could plant: the runtime directory must be closed to others
    (see :func:`shmreplay.engine.instance.runtime_dir`), the record must belong to this user,
    root or the directory's owner, the control socket's peer must be the record's daemon (pid and
    uid, SO_PEERCRED) and every segment and semaphore must belong to the daemon's user; else
    PermissionDenied saying which object and why. A daemon that runs in a PID namespace this
    process cannot see is reported at once (DaemonNotRunning saying so), not as absent.
    ``name`` is checked as ``[server] name`` is (InvalidArgumentError).
    """
    check_instance_name(name, "attach(name)", InvalidArgumentError)
    timeout = _check_timeout(timeout, "attach(timeout)")
    if timeout is None:
        raise InvalidArgumentError(
            "attach(timeout) must be a number of seconds (the wait for the daemon to come up "
            "and answer), got None"
        )
    deadline = time.monotonic() + timeout
    busy: DaemonBusy | None = None
    while True:
        hint = None
        try:
            rec = InstanceRecord.read(name)
            if rec is not None and rec.alive():
                # The daemon's answer is awaited only as long as our own timeout allows.
                remaining = max(deadline - time.monotonic(), MIN_ANSWER_S)
                return Client(rec, seed=seed, prefault=prefault, timeout=remaining)
            if rec is not None:
                hint = pid_namespace_hint(rec)  # alive, but its pid is not visible from here
        except DaemonBusy as exc:
            # Restoring, or not answering: try again until the deadline. A daemon that said it
            # is restoring and then did not answer in time is still restoring, most likely.
            if busy is None or not _restoring(busy) or _restoring(exc):
                busy = _busy_daemon(name, rec, timeout, exc)
        except (FileNotFoundError, ConnectionRefusedError, DaemonNotRunning):
            pass  # starting up or going away: try again until the deadline
        except ShmReplayError:
            raise  # PermissionDenied, TooManyOpenFiles, ...: clear already
        except PermissionError:  # the record: the runtime directory is another user's
            raise access_denied(record_path(name), f"the record of instance {name!r}") from None
        except OSError as exc:
            if is_out_of_descriptors(exc):
                raise out_of_descriptors(f"attaching to instance {name!r}") from exc
            raise
        if hint is not None:
            raise DaemonNotRunning(f"cannot attach to instance {name!r}: {hint}")
        if time.monotonic() >= deadline:
            if busy is not None:
                raise busy
            where = record_path(name)
            raise DaemonNotRunning(
                f"no shmreplay daemon named {name!r} is running (no live record at {where}); "
                f"start one with: shmreplay serve --tables tables.toml --name {name}"
            )
        time.sleep(0.05)


def _restoring(exc: DaemonBusy) -> bool:
    return (getattr(exc, "reply", None) or {}).get("state") == "restoring"


def _busy_daemon(name: str, rec: InstanceRecord, timeout: float, exc: DaemonBusy) -> DaemonBusy:
    """What attach() says of a daemon that is alive but did not let it attach in time."""
    if _restoring(exc):
        return exc  # the daemon's own words, with the restore's progress
    try:
        status = psutil.Process(rec.pid).status()
    except psutil.Error:
        status = "unknown"
    hint = (
        f"it is stopped: resume it with kill -CONT {rec.pid}"
        if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
        else "it is busy or stuck; look at its log, or attach with a longer timeout"
    )
    return DaemonBusy(
        f"the shmreplay daemon of instance {name!r} (pid {rec.pid}, {status}) is running but "
        f"did not answer within {timeout} s; {hint}"
    )


def _open_event(name: str, owner: int | None = None) -> Event:
    """Open one of the daemon's semaphores, with a clear error for the two ways it fails on a
    live daemon: another user's semaphore, or no file descriptor left. With ``owner`` (the
    daemon's uid), a semaphore of anyone else is refused (PermissionDenied)."""
    try:
        return Event.open(name, owner)
    except posix_ipc.PermissionsError:
        raise access_denied(sem_path(name), "a semaphore of the daemon") from None
    except OSError as exc:
        if is_out_of_descriptors(exc):
            raise out_of_descriptors(f"opening the daemon's semaphore {name}") from exc
        raise


class Client:
    """A process's connection to one shmreplay instance. Use :func:`attach` to make one."""

    _closed = True
    _control: ControlClient | None = None

    def __init__(
        self,
        record: InstanceRecord,
        seed: int | None = None,
        prefault: bool = True,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.instance = record.name
        self._pid = os.getpid()
        self._control = ControlClient(record.socket, timeout=timeout)
        self._tables: dict[str, Table] = {}
        self._segments: list[Segment] = []
        self._events: list[Event] = []
        try:
            # Trust nothing the daemon names before knowing that the socket's peer is the daemon
            # of the record, whose user must own every segment and semaphore we open.
            check_peer(self._control.sock, record)
            hello = self._control.request("hello", pid=self._pid, protocol=PROTOCOL_VERSION)
            self._control.timeout = DEFAULT_TIMEOUT_S  # attach's deadline was for the hello
            self.channel = int(hello["channel"])
            self.daemon_pid = int(hello["pid"])
            wake = _open_event(hello["wake"], record.uid)
            self._events.append(wake)
            for tname, seg_name in hello["tables"].items():
                seg = Segment.attach(seg_name, owner=record.uid)
                self._segments.append(seg)
                if prefault:
                    seg.prefault()
                evs = {k: _open_event(v, record.uid) for k, v in hello["events"][tname].items()}
                self._events.extend(evs.values())
                core = TableCore(seg, TableEvents(daemon=wake, **evs))
                core.daemon_pid = self.daemon_pid
                core.channel = self.channel
                core.rng = np.random.default_rng(
                    None if seed is None else [seed, len(self._tables)]
                )
                self._tables[tname] = Table(self, core)
        except BaseException:
            self._release()
            raise
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise ClientClosedError(
                f"this client of instance {self.instance!r} is closed; call shmreplay.attach()"
            )
        if os.getpid() != self._pid:
            raise ShmReplayError(
                f"this client was attached by process {self._pid}, not by this one "
                f"({os.getpid()}); call shmreplay.attach() in each process"
            )

    @property
    def tables(self) -> list[str]:
        """Names of the instance's tables."""
        return list(self._tables)

    def table(self, name: str) -> Table:
        """The handle of table ``name``; :class:`TableNotFoundError` lists the tables there are."""
        self._check()
        try:
            return self._tables[name]
        except KeyError:
            raise TableNotFoundError(
                f"instance {self.instance!r} has no table {name!r}; its tables are: "
                + ", ".join(repr(t) for t in self._tables)
            ) from None

    def insert(
        self,
        step: Mapping[str, object],
        priorities: Mapping[str, float],
        timeout: float | None = None,
    ) -> dict[str, int]:
        """Insert one step into several tables, each taking the fields of its signature.

        ``priorities`` maps table name to priority. Returns the new key in each table. Every
        table's data is validated before anything is written. The tables are written in the
        order ``priorities`` names them, each waiting up to ``timeout`` seconds for a slot; if
        one times out, the :class:`RateLimiterTimeout` names the tables already written and its
        ``keys`` holds their keys, in that order (a retry should skip those tables).
        """
        self._check()
        timeout = _check_timeout(timeout)
        if not priorities:
            raise InvalidArgumentError("priorities must name at least one table")
        tables = [self.table(t) for t in priorities]
        used = set()
        prepared = []
        for table in tables:
            fields = {f.name: step[f.name] for f in table.spec.signature if f.name in step}
            used.update(fields)
            row = table._validate_row(fields)
            prio = check_priority(priorities[table.name], table.core.max_priority, table.name)
            prepared.append((table, row, prio))
        unknown = set(step) - used
        if unknown:
            raise SignatureError(
                f"field(s) {sorted(unknown)} belong to none of the tables {list(priorities)}"
            )
        written: dict[str, int] = {}
        for t, row, p in prepared:
            try:
                written[t.name] = t._write_row(row, p, timeout)
            except RateLimiterTimeout as exc:
                if not written:
                    raise
                raise RateLimiterTimeout(
                    f"{exc}; the step was already written to {', '.join(map(repr, written))} "
                    "(keys in this error's .keys, in that order): retry without those tables",
                    keys=list(written.values()),
                ) from None
        return written

    def set_rate_limiter(self, table: str, rate_limiter: RateLimiterSpec | dict) -> dict:
        """Change a table's rate limiter now, for every process (counters are kept; blocked
        callers re-check at once). ``rate_limiter`` is a :class:`RateLimiterSpec` (e.g.
        ``RateLimiterSpec.min_size(1)`` to pre-fill a table) or a dict written as in tables.toml.
        Returns the limiter's new state."""
        self._check()
        if isinstance(rate_limiter, RateLimiterSpec):
            reply = self._control.request(
                "set_rate_limiter", table=table, spec=rate_limiter.to_dict()
            )
        else:
            rate_limiter = dict(rate_limiter)
            # checked here too: a value the control protocol cannot carry (min_size 10**30)
            # must be a ConfigError, not an OverflowError of the encoder
            parse_rate_limiter(rate_limiter, "set_rate_limiter", table)
            reply = self._control.request(
                "set_rate_limiter", table=table, rate_limiter=rate_limiter
            )
        return reply["rate_limiter"]

    def trajectory_writer(self, num_keep_alive_refs: int, **kw) -> TrajectoryWriter:
        """A Reverb-style trajectory writer over this client: ``append`` steps, then
        ``create_item`` from ``history`` selections (see :class:`TrajectoryWriter`)."""
        return TrajectoryWriter(self, num_keep_alive_refs, **kw)

    def checkpoint(self, timeout: float | None = None) -> dict:
        """Have the daemon write a checkpoint of every table (into [server] checkpoint_dir);
        returns its report once it is complete on disk. Waits at most ``timeout`` seconds
        (None: as long as the daemon reports progress, which it does every second), then
        raises :class:`~shmreplay.errors.DaemonBusy`; the checkpoint goes on in the daemon."""
        self._check()
        return self._control.request("checkpoint", timeout=timeout)["checkpoint"]

    def server_info(self) -> dict:
        """The daemon's view of the instance: tables, their statistics, attached clients."""
        self._check()
        return self._control.request("info")

    def attach_another(self, timeout: float = DEFAULT_TIMEOUT_S, seed: int | None = None) -> Client:
        """A new client of the same instance, for another thread or a prefetcher (a client
        must not be used from two threads at once); ``seed`` seeds its sampling."""
        return attach(self.instance, timeout=timeout, seed=seed)

    def close(self, timeout: float | None = 10.0) -> None:
        """Flush what this client published, detach and unmap. Idempotent."""
        if self._closed:
            return
        try:
            if os.getpid() == self._pid:
                for t in self._tables.values():
                    try:
                        t.flush(timeout=timeout)
                    except (DaemonNotRunning, RateLimiterTimeout, TableQuarantined):
                        pass  # nothing to wait for any more, or the caller's deadline passed
                try:
                    # Not worth a long wait on a busy or stopped daemon: closing our end of
                    # the connection tells it too.
                    self._control.request("bye", timeout=BYE_TIMEOUT_S)
                except (DaemonNotRunning, DaemonBusy):
                    pass  # its EOF tells the daemon all the same
        finally:
            self._closed = True
            self._release()

    def _release(self) -> None:
        for t in self._tables.values():
            t._closed = True
            t.core = None
        self._tables = {}
        if self._control is not None:
            self._control.close()
            self._control = None
        for ev in self._events:
            ev.close()
        for seg in self._segments:
            seg.close()
        self._events, self._segments = [], []

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._closed and os.getpid() == getattr(self, "_pid", None):
            try:
                self.close(timeout=1.0)
            except Exception:
                pass


# An episode id is stored as an int64 and its first/last steps as int32 (meta.episode*).
