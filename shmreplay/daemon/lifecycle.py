"""The daemon's life: start-up, the main loop, shutdown (:class:`Daemon`, :func:`serve`).

One process per instance. Start-up takes the instance lock, adopts what a dead daemon of the
instance left in /dev/shm (or allocates the tables), restores a checkpoint, opens the control
socket and writes the instance record. The main thread then runs the commit loop
(:mod:`shmreplay.daemon.commit_loop`): drain every writer's publish ring, commit, refill the
lease rings, wake waiters, nap or sleep on the instance's semaphore until a writer posts it. A
second thread serves the control socket (:mod:`shmreplay.daemon.control_server`) and notices a
client's death by its connection closing; the main thread then reclaims what that client held
(:mod:`shmreplay.daemon.clients`). SIGTERM and SIGINT shut down cleanly: waiters are woken with
an error, segments and semaphores are unlinked, the socket and the instance record removed.

Faults are contained (see :meth:`Daemon.run`): only a requested stop removes the tables. Every
value the commit loop reads from memory a client can write (ring positions, slots, lease
requests, priorities) is checked first; a client that wrote nonsense is cut off alone
(``Clients.cut_off``). A table whose commit or lease fails is quarantined alone
(``CommitLoop.quarantine``). Any other error ends the daemon with status 1 and leaves every
table in /dev/shm for the next daemon to adopt.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import replace

import numpy as np
import posix_ipc
import psutil

from ..config import (
    RATE_LIMITER_KINDS,
    Config,
    RateLimiterSpec,
    TableSpec,
    parse_rate_limiter,
)
from ..engine.events import Event, sem_path
from ..engine.instance import (
    TABLE_EVENTS,
    InstanceRecord,
    event_name,
    lock_path,
    process_alive,
    record_path,
    segment_name,
    socket_path,
    start_stamp,
)
from ..engine.layout import (
    FORMAT_VERSION,
    Ctrl,
    compute_layout,
)
from ..engine.ownership import in_the_way
from ..engine.shm import SHM_DIR, Segment, format_bytes, shm_free_bytes
from ..engine.table import TableCore, TableEvents
from ..errors import (
    CheckpointError,
    ConfigError,
    InsufficientSharedMemory,
    LockTimeout,
    ShmReplayError,
    TableNotFoundError,
)
from .adoption import leftovers, take_instance_lock
from .clients import Clients, group_id
from .commit_loop import QUARANTINE_S, CommitLoop, ServedTable
from .control_server import CONTROL_LOCK_TIMEOUT_S, ControlServer, progress_update
from .metrics import MetricsServer
from .notify import Notifier

log = logging.getLogger("shmreplay")

LIVENESS_CHECK_S = 0.1  # how often client pids are checked (connection EOF is the fast path)
EVENT_KINDS = TABLE_EVENTS  # shm_objects knows them by name
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, with the terminating NUL
# info() (shmreplay info, metrics scrapes) reuses a big table's priority-extremes and episode
# scan this recent: a scraper at full speed costs O(tables), plus one O(size) scan per second.
STATS_MAX_AGE_S = 1.0
FAULT_ENV = "SHMREPLAY_INJECT_FAULT"  # see _injected_fault


def check_fits(config: Config, present: frozenset[str] = frozenset()) -> int:
    """Total bytes the tables need; raises InsufficientSharedMemory if /dev/shm lacks them.

    Tables in ``present`` already have their segment (adopted after a crash): they need none."""
    sizes = {
        t.name: compute_layout(t, config.server.max_clients).total_size
        for t in config.tables
        if t.name not in present
    }
    need, free = sum(sizes.values()), shm_free_bytes()
    if need > free:
        detail = ", ".join(f"{n}: {format_bytes(s)}" for n, s in sizes.items())
        raise InsufficientSharedMemory(
            f"the tables need {format_bytes(need)} of shared memory ({detail}) but /dev/shm has "
            f"{format_bytes(free)} free; lower max_size or enlarge /dev/shm "
            "(mount -o remount,size=... /dev/shm)"
        )
    return need


class Daemon:
    """One shmreplay instance: ``Daemon(config).run()`` serves until SIGTERM/SIGINT/shutdown."""

    def __init__(
        self,
        config: Config,
        fresh: bool = False,
        restore: str | None = None,
        truncate: bool = False,
        owner_pid: int | None = None,
    ) -> None:
        self.config = config
        # The process whose exit stops us (shmreplay.Server's), as (pid, start time): a pid
        # reused by another process does not keep us alive.
        self._owner = None if owner_pid is None else _owner(owner_pid)
        self.fresh = fresh  # discard what a dead daemon left instead of adopting it
        self.restore = restore  # a checkpoint to restore (default: the latest in checkpoint_dir)
        self.truncate = truncate  # restore the newest items of a checkpoint too big for a table
        self._checkpoint_lock = threading.Lock()  # one checkpoint at a time
        self.notifier = Notifier()  # systemd's notify protocol; does nothing outside systemd
        self.metrics: MetricsServer | None = None
        self._adopted: set[str] = set()  # segment names; kept if we fail before serving
        self._serving = False
        self.name = config.server.name
        self.max_clients = config.server.max_clients
        self.tables: dict[str, ServedTable] = {}
        self.segments: list[Segment] = []
        self.events: list[Event] = []
        self.wake: Event | None = None
        self._stop = threading.Event()
        self._lock_fd: int | None = None
        self._listener: socket.socket | None = None
        # Channels whose rings the commit loop reads: registered, not yet reclaimed or cut off.
        # Only this decides, never the PID a client could write into its channel line.
        self._active = np.zeros(self.max_clients, dtype=bool)
        self.loop = CommitLoop(
            self.tables, self._active, self.max_clients, lambda c, why: self.clients.cut_off(c, why)
        )
        self.clients = Clients(config, self.tables, self._active, self.loop)
        self._serve_started = False  # past start-up: an error now keeps every table
        self._thread: threading.Thread | None = None
        self._owns_files = False
        self._restoring = False  # the control socket answers, the tables are being restored
        self._control = ControlServer(self)

    # -- lifecycle -----------------------------------------------------------------------------

    def run(self, ready: callable | None = None) -> int:
        """Create everything, serve until asked to stop, clean up. Returns an exit status: 0
        after a requested stop (SIGTERM, SIGINT, the ``shutdown`` request), 1 after an
        unexpected error; a failed start raises.

        Only a requested stop removes the tables. Whenever the daemon exits with checkpoint_dir
        set, it first attempts a final checkpoint (none while a table is quarantined, see
        :meth:`_quarantine`). After an unexpected error it logs it and leaves every table in
        /dev/shm for the next daemon to adopt; a failed start (a metrics port taken, a bad
        config, anything) never removes a table it adopted.
        """
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        status = 1
        try:
            self.start()
            self._start_metrics()
            if ready is not None:
                ready()
            # READY only now: every table is allocated (or adopted) and restored.
            self.notifier.ready(f"serving {len(self.tables)} table(s)")
            self._serve_started = True
            try:
                self.serve_forever()
                status = 0
            except Exception:
                log.exception(
                    "instance %r: unexpected error in the commit loop; its tables stay in "
                    "/dev/shm for the next daemon to adopt (start it again)",
                    self.name,
                )
        finally:
            self.notifier.stopping()
            if self._serving:  # every table exists (a failed start may still checkpoint)
                self._final_checkpoint()
            if self.metrics is not None:
                self.metrics.close()
            for s, h in old.items():
                signal.signal(s, h)
            self.cleanup(remove_tables=status == 0)
        return status

    def _start_metrics(self) -> None:
        """Serve [server] metrics_port; if it cannot be bound (another process holds it), the
        tables are served all the same, without metrics, and the log says why."""
        port = self.config.server.metrics_port
        if port is None:
            return
        try:
            self.metrics = MetricsServer(self.info, port).start()
        except ShmReplayError as exc:
            log.warning(
                "serving the tables WITHOUT metrics: %s (free port %d, or set another "
                "[server] metrics_port and restart the daemon)",
                exc,
                port,
            )

    @property
    def state(self) -> str:
        """``restoring`` (a checkpoint is being read into the tables), ``serving``, or
        ``stopping`` (shutting down, maybe writing the final checkpoint)."""
        if self._stop.is_set():
            return "stopping"
        return "restoring" if self._restoring else "serving"

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint(self) -> dict:
        """Write a checkpoint of every table to checkpoint_dir now; returns its report."""
        from .checkpoint import write_checkpoint

        directory = self.config.server.checkpoint_dir
        if directory is None:
            raise ConfigError(
                f"instance {self.name!r} has no checkpoint_dir; set it in [server] of tables.toml"
            )
        broken = self._broken_tables()
        if broken:
            raise CheckpointError(
                f"instance {self.name!r} writes no checkpoint while a table is quarantined: "
                f"{broken}; the latest checkpoint keeps its last sound state. Restart the "
                "daemon: it adopts the table and repairs it from its per-slot metadata"
            )
        with self._checkpoint_lock:
            # Until its first progress line, those waiting hear this, not an older operation's.
            self._control.progress(progress_update("checkpoint: started"))
            report = write_checkpoint(
                {n: t.core for n, t in self.tables.items()},
                directory,
                self.config.server.checkpoint_keep,
                progress=self._progress,
                gid=group_id(self.config.server.group),  # checkpoints as private as the tables
            )
        log.info("%s", report.summary())
        return {
            "path": str(report.path),
            "bytes": report.bytes,
            "seconds": report.seconds,
            "items": dict(report.items),
            "dropped": dict(report.dropped),
            "longest_hold_s": report.max_lock_s,
            "removed": [str(p) for p in report.removed],
        }

    def _final_checkpoint(self) -> None:
        """At exit, with checkpoint_dir set (whatever the reason of the exit): commit what was
        published, then checkpoint. Not while a table is quarantined: its structures are not
        to be trusted, and the latest checkpoint keeps its last sound state."""
        if self.config.server.checkpoint_dir is None:
            return
        broken = self._broken_tables()
        if broken:
            log.error(
                "no final checkpoint: %s; the latest checkpoint in %s stays the newest, and "
                "every table stays in /dev/shm for the next daemon to adopt",
                broken,
                self.config.server.checkpoint_dir,
            )
            return
        for t in self.tables.values():
            t.core.ctrl[Ctrl.SHUTDOWN] = 1  # writers stop here; what they published is kept
            if self._serve_started:
                self.loop.service(t)
        try:
            self.checkpoint()
        except Exception:
            log.exception("the final checkpoint failed; the previous one is intact")

    def _broken_tables(self) -> str:
        return self.loop.broken_tables()

    def _maybe_periodic_checkpoint(self, now: float) -> None:
        interval = self.config.server.checkpoint_interval_s
        if interval is None or self.config.server.checkpoint_dir is None:
            return
        if now < self._next_checkpoint or self._checkpoint_lock.locked():
            return
        if any(t.broken is not None for t in self.tables.values()):
            return  # see checkpoint(): the latest checkpoint keeps the table's sound state
        self._next_checkpoint = now + interval

        def run() -> None:
            try:
                self.checkpoint()
            except Exception:
                log.exception("periodic checkpoint failed; the previous one is intact")

        threading.Thread(target=run, name="checkpoint", daemon=True).start()

    def _restore(self, adopted: set[str]) -> None:
        """Fill the tables just created from a checkpoint: --restore PATH, else the latest
        complete one in checkpoint_dir. Tables adopted after a crash keep what they hold."""
        if self.restore is None and self.config.server.checkpoint_dir is None:
            return
        from .checkpoint import latest_checkpoint, read_checkpoint, restore_table

        path = self.restore
        if path is None:
            path = latest_checkpoint(self.config.server.checkpoint_dir, log=log)
        if path is None:
            return
        ckpt = read_checkpoint(path)
        for name in ckpt.tables.keys() - self.tables.keys():
            log.warning(
                "checkpoint %s holds table %r, which tables.toml lacks: skipped", path, name
            )
        for name, t in self.tables.items():
            if name in adopted:
                log.info("table %r: adopted from /dev/shm, not restored from %s", name, path)
            elif name not in ckpt.tables:
                log.warning("table %r is not in checkpoint %s: it starts empty", name, path)
            else:
                report = restore_table(
                    t.core, ckpt, truncate=self.truncate, progress=self._progress
                )
                log.info("%s", report.summary())

    def _progress(self, line: str) -> None:
        """Progress of a long restore or checkpoint: logged, shown by systemd, and sent to the
        control connections waiting on it (``shmreplay checkpoint``, ``stop``, ``info``)."""
        log.info("%s", line)
        self._control.progress(progress_update(line))
        self.notifier.status(line)
        self.notifier.extend_timeout(60)

    def start(self) -> None:
        self._lock_fd = take_instance_lock(self.name)
        adoptable = leftovers(self.config, self.fresh)
        need = check_fits(self.config, frozenset(adoptable))
        gid = group_id(self.config.server.group)
        mode = 0o660 if gid is not None else 0o600
        self.wake = self.loop.wake = _create_event(event_name(self.name, None, "daemon"), mode, gid)
        self.events.append(self.wake)
        adopted = set(adoptable)
        for spec in self.config.tables:
            self._create_table(spec, mode, gid, adoptable.pop(spec.name, None))
        # The control socket answers during the restore (info says "restoring", with its
        # progress; attach waits for it), so a long restore is not taken for a dead daemon.
        self._restoring = True
        self._control.progress(progress_update("restore: starting"))
        self._listen(mode, gid)
        InstanceRecord(
            name=self.name,
            pid=os.getpid(),
            start_time=psutil.Process().create_time(),
            socket=str(socket_path(self.name)),
            tables=[t.name for t in self.config.tables],
            format_version=FORMAT_VERSION,
        ).write(gid)
        self._owns_files = True
        self._thread = threading.Thread(target=self._serve_control, name="control", daemon=True)
        self._thread.start()
        self._restore(adopted)
        self._restoring = False
        self._next_checkpoint = time.monotonic() + (self.config.server.checkpoint_interval_s or 0)
        self._serving = True
        log.info(
            "instance %r serving %d table(s) in %s of shared memory: %s",
            self.name,
            len(self.tables),
            format_bytes(need),
            ", ".join(
                f"{n} (max_size {t.core.spec.max_size}, "
                f"{format_bytes(t.core.segment.layout.total_size)})"
                for n, t in self.tables.items()
            ),
        )

    def _create_table(
        self, spec: TableSpec, mode: int, gid: int | None, adopt: Segment | None = None
    ) -> None:
        if adopt is None:
            layout = compute_layout(spec, self.max_clients)
            name = segment_name(self.name, spec.name)
            try:
                seg = Segment.create(name, layout, mode, gid)
            except posix_ipc.ExistentialError:  # made since _leftovers looked: not ours
                raise in_the_way(SHM_DIR + name, "a table segment") from None
        else:
            seg = adopt
            self._adopted.add(seg.name)
        self.segments.append(seg)
        evs = {}
        for kind in EVENT_KINDS:
            ev = _create_event(event_name(self.name, spec.name, kind), mode, gid)
            self.events.append(ev)
            evs[kind] = ev
        core = TableCore(seg, TableEvents(daemon=self.wake, **evs))
        state = self.loop.new_table(core)
        # The start time goes in first: a reader that sees our pid sees it too (Ctrl).
        core.ctrl[Ctrl.DAEMON_START] = start_stamp(psutil.Process().create_time())
        if adopt is None:
            core.initialize(os.getpid())
        else:
            try:
                committed, held = core.adopt(os.getpid())
            except Exception as exc:  # a table that cannot be taken over costs only itself
                self.tables[spec.name] = state
                self.loop.quarantine(state, f"adopting it failed: {type(exc).__name__}: {exc}", exc)
                return
            for skipped in core.skipped_at_adoption:
                log.error("table %r: not committed at adoption: %s", spec.name, skipped)
            state.quarantine = (time.monotonic() + QUARANTINE_S, held)
            log.warning(
                "table %r: adopted the segment a dead daemon left: %d item(s) kept, %d published "
                "item(s) committed now, %d slot(s) its clients held freed in %.0f s",
                spec.name,
                int(core.ctrl[Ctrl.SIZE]),
                committed,
                len(held),
                QUARANTINE_S,
            )
        self.tables[spec.name] = state

    def _listen(self, mode: int, gid: int | None) -> None:
        path = str(socket_path(self.name))
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise ConfigError(
                f"the control socket's path {path} is {len(os.fsencode(path))} bytes, more "
                f"than a unix socket allows ({UNIX_PATH_MAX}); choose a shorter --name or set "
                "SHMREPLAY_RUNTIME_DIR to a shorter directory"
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177 if gid is None else 0o117)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        if gid is not None:
            os.chown(path, -1, gid, follow_symlinks=False)
        sock.listen(64)
        sock.setblocking(False)
        self._listener = sock

    def _on_signal(self, signum, frame) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        self.request_stop()

    def request_stop(self) -> None:
        self._stop.set()
        self.loop.attend()

    def cleanup(self, remove_tables: bool = True) -> None:
        """Wake every waiter with an error, unlink the semaphores, remove our files, and the
        tables' segments only if ``remove_tables`` and no table is quarantined. Idempotent.

        Tables that stay are adopted by the next daemon of the instance. A daemon that failed
        before serving removes only the tables it created (empty, or restored from a checkpoint
        that is still there), never one it adopted."""
        keep_all = self._serve_started and (not remove_tables or bool(self._broken_tables()))
        for t in self.tables.values():
            t.core.ctrl[Ctrl.SHUTDOWN] = 1
        for ev in self.events:
            if ev.sem is not None:
                ev.post(self.max_clients + 1)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        for t in self.tables.values():
            if t.core.events is not None:
                t.core.events = None
        self.tables.clear()
        self.loop.close()
        kept = []
        for seg in self.segments:
            if keep_all or (not remove_tables and seg.name in self._adopted):
                kept.append(seg.name)  # for the next daemon to adopt
            else:
                Segment.unlink(seg.name)
            seg.close()
        if kept:
            log.warning(
                "instance %r: left %d table(s) in /dev/shm for the next daemon to adopt: %s",
                self.name,
                len(kept),
                " ".join(kept),
            )
        for ev in self.events:
            Event.unlink(ev.name)
            ev.close()
        self.segments, self.events = [], []
        if self._owns_files:
            for path in (socket_path(self.name), record_path(self.name)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            self._owns_files = False
        if self._lock_fd is not None:
            # Unlinked while still held, so no stale .lock file accumulates; a daemon that
            # opened it meanwhile finds it gone and opens a new one (_take_instance_lock).
            with contextlib.suppress(OSError):
                lock_path(self.name).unlink()
            os.close(self._lock_fd)  # releases the flock: another daemon may start now
            self._lock_fd = None
            if kept:
                log.info("instance %r stopped; its tables stay in /dev/shm", self.name)
            else:
                log.info("instance %r stopped; shared memory released", self.name)

    def serve_forever(self) -> None:
        """The main loop, until a stop is requested: commit rounds, reclaims, liveness checks,
        periodic checkpoints, naps. An exception out of it is a bug of the daemon's own (tables
        and clients are contained in CommitLoop.service and Clients.cut_off): run() then keeps
        every table for the next daemon."""
        next_liveness = time.monotonic() + LIVENESS_CHECK_S
        fault_after = _injected_fault()
        while not self._stop.is_set():
            self.notifier.watchdog_tick()  # here, not in a thread: a stuck loop gets restarted
            if fault_after is not None and self.loop.committed_total() >= fault_after:
                raise RuntimeError(f"{FAULT_ENV}: injected fault after {fault_after} item(s)")
            # Rounds and naps in C until the liveness deadline or something needs Python.
            self.loop.serve(next_liveness)
            self.clients.reclaim_departed()
            now = time.monotonic()
            if now >= next_liveness:
                self.clients.check_alive()
                self._check_owner()
                self.loop.end_quarantines(now)
                self._maybe_periodic_checkpoint(now)
                next_liveness = now + LIVENESS_CHECK_S

    # -- control socket (its own thread) ------------------------------------------------------

    def _check_owner(self) -> None:
        if self._owner is not None and not process_alive(*self._owner):
            log.warning(
                "the process that started this daemon (pid %d, --owner-pid) has exited: "
                "shutting down",
                self._owner[0],
            )
            self._owner = None
            self.request_stop()

    def _serve_control(self) -> None:
        """The control thread: see :mod:`shmreplay.daemon.control_server`."""
        self._control.serve()

    def set_rate_limiter(self, req: dict) -> dict:
        """Reconfigure a table's limiter: ``rate_limiter`` as in tables.toml, or ``spec`` as
        RateLimiterSpec.to_dict() gives it. Validated as tables.toml is."""
        name = req.get("table")
        core = self._table(name).core
        if "spec" in req:
            d = req["spec"]
            checked = RateLimiterSpec.custom(
                d["samples_per_insert"], d["min_size_to_sample"], d["min_diff"], d["max_diff"]
            )
            if d["kind"] not in RATE_LIMITER_KINDS:
                raise ConfigError(f"unknown rate limiter kind {d['kind']!r}")
            spec = replace(checked, kind=d["kind"])
        else:
            spec = parse_rate_limiter(req.get("rate_limiter"), "set_rate_limiter", name)
        core.set_rate_limiter(spec, timeout=CONTROL_LOCK_TIMEOUT_S)
        log.info("table %r: rate limiter set to %s", name, spec)
        return _plain(core.limiter.info().__dict__)

    def _table(self, name: object) -> ServedTable:
        if name not in self.tables:
            raise TableNotFoundError(
                f"no table {name!r} in instance {self.name!r}; tables: {', '.join(self.tables)}"
            )
        return self.tables[name]

    def info(self) -> dict:
        """The instance's state, clients and each table's statistics (O(1) per table) with its
        state ("ok", or "quarantined" and why). Waits at most CONTROL_LOCK_TIMEOUT_S for a
        healthy table's lock, then raises LockTimeout naming the table and the pid holding it.
        While restoring, ``tables`` is empty and ``progress`` tells how far the restore is."""
        clients = self.clients.attached()
        state = self.state
        tables = {}
        if state != "restoring":
            tables = {n: self._table_info(t) for n, t in list(self.tables.items())}
        return {
            "name": self.name,
            "pid": os.getpid(),
            "format_version": FORMAT_VERSION,
            "state": state,
            "progress": self._control.latest_progress() if state == "restoring" else None,
            "clients": clients,
            "tables": tables,
        }

    def _table_info(self, t: ServedTable) -> dict:
        """A table's info, with its state: "ok", or "quarantined" and why. A healthy table whose
        lock stays held past CONTROL_LOCK_TIMEOUT_S raises LockTimeout naming the holder; a
        table whose statistics cannot be read otherwise (its lock corrupt, or quarantined)
        reports its state and ``info_error``."""
        state = {"state": "ok" if t.broken is None else "quarantined"}
        if t.broken is not None:
            state["quarantined_because"] = t.broken
        try:
            stats = t.core.info(timeout=CONTROL_LOCK_TIMEOUT_S, max_age=STATS_MAX_AGE_S)
            return {**_plain(stats.to_dict()), **state}
        except ShmReplayError as exc:
            if t.broken is None and isinstance(exc, LockTimeout):
                raise LockTimeout(
                    f"table {t.core.name!r} of instance {self.name!r}: its lock has been held by "
                    f"pid {t.core.mutex.owner_pid} for more than {CONTROL_LOCK_TIMEOUT_S} s (a "
                    "stopped process, a debugger?); resume or end that process, then ask again"
                ) from None
            # A corrupt lock (the commit loop quarantines the table at its next round): the
            # other tables are still reported.
            return {"name": t.core.name, **state, "info_error": str(exc)}


def _create_event(name: str, mode: int, gid: int | None) -> Event:
    """Create a semaphore; a full /dev/shm (each takes a page there) is reported as such."""
    try:
        return Event.create(name, mode, gid)
    except posix_ipc.ExistentialError:  # made since _leftovers looked: not ours
        raise in_the_way(sem_path(name), "a semaphore of this instance") from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise InsufficientSharedMemory(
            f"cannot create semaphore {SHM_DIR}/sem.{name.lstrip('/')}: {SHM_DIR} has "
            f"{format_bytes(shm_free_bytes())} free (each semaphore takes a page); free space "
            f"there (shmreplay gc removes what dead daemons left) or enlarge it "
            f"(mount -o remount,size=... {SHM_DIR})"
        ) from exc


def _owner(pid: int) -> tuple[int, float | None]:
    """``pid`` and its start time; ConfigError if no such process (it exited already)."""
    try:
        return pid, psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        raise ConfigError(f"--owner-pid {pid}: no such process (has it exited?)") from None


def _injected_fault() -> int | None:
    """For the tests of what an unexpected error keeps: ``SHMREPLAY_INJECT_FAULT=commit-loop:N``
    makes the commit loop raise once N items were committed. Not for production use."""
    value = os.environ.get(FAULT_ENV, "")
    kind, _, count = value.partition(":")
    if kind != "commit-loop":
        return None
    return int(count or 0)


def _plain(obj):
    """Make a value msgpack-able (tuples to lists, numpy scalars to Python numbers)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def serve(
    config: Config,
    fresh: bool = False,
    restore: str | None = None,
    truncate: bool = False,
    owner_pid: int | None = None,
) -> int:
    """Run a daemon for ``config`` in the foreground until SIGTERM/SIGINT (or until process
    ``owner_pid`` exits). Tables a dead daemon of the same instance left in /dev/shm are adopted
    (``fresh``: discarded); the others are restored from ``restore`` or the latest checkpoint in
    checkpoint_dir, if any."""
    daemon = Daemon(config, fresh=fresh, restore=restore, truncate=truncate, owner_pid=owner_pid)
    return daemon.run()
