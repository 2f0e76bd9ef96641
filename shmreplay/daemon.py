"""The daemon: owns the tables' shared memory, commits what writers publish, leases free slots.

One process per instance. The main thread runs the commit loop: drain every writer's publish
ring, commit the slots under the table mutex in one vectorised batch, refill the writers' lease
rings, wake the processes waiting on it, then sleep on the instance's semaphore until a writer
posts it. A second thread serves the control socket (``hello``/``bye``/``info``/``shutdown``) and
notices a client's death by its connection closing; the main thread then reclaims what that
client held. SIGTERM and SIGINT shut down cleanly: waiters are woken with an error, segments and
semaphores are unlinked, the socket and the instance record removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import queue
import resource
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, replace

import numpy as np
import posix_ipc
import psutil

from .config import (
    RATE_LIMITER_KINDS,
    Config,
    RateLimiterSpec,
    TableSpec,
    parse_rate_limiter,
)
from .control import encode
from .control_server import CONTROL_LOCK_TIMEOUT_S, ControlServer, progress_update
from .errors import (
    ConfigError,
    DaemonAlreadyRunning,
    DaemonNotRunning,
    InsufficientSharedMemory,
    LockTimeout,
    SegmentError,
    ShmReplayError,
    TableNotFoundError,
)
from .events import Event, sem_path
from .instance import (
    TABLE_EVENTS,
    InstanceRecord,
    check_owner,
    event_name,
    in_the_way,
    is_out_of_descriptors,
    lock_path,
    process_alive,
    record_path,
    recorded_daemon_alive,
    remove_shm_objects,
    runtime_dir,
    segment_name,
    shm_objects,
    socket_path,
    start_stamp,
)
from .layout import (
    FORMAT_VERSION,
    LEASE_CAPACITY,
    Chan,
    Ctrl,
    Sleep,
    compute_layout,
)
from .metrics import MetricsServer
from .notify import Notifier
from .rings import ring_get, ring_put
from .shm import SHM_DIR, Segment, format_bytes, shm_free_bytes
from .table import TableCore, TableEvents

log = logging.getLogger("shmreplay")

# With writers active the daemon never sleeps longer than this: it bounds the delay of a wake-up
# lost to store/load reordering between a writer's publish and the daemon's sleeping flag.
ACTIVE_SLEEP_S = 0.002  # a nap: bounds the delay from publish to sampleable
# Descriptors the daemon keeps free for its own work (a checkpoint opens a file per field at
# once, the lock file, directories to fsync; /proc reads; the metrics server): a connection
# that would eat into them is refused with TooManyOpenFiles instead.
FD_RESERVE = 32
ACCEPT_PAUSE_S = 0.1  # no descriptor even to refuse a connection: look again this much later
STALL_WARN_S = 2.0  # the commit loop says who holds a table lock this long
QUARANTINE_S = 1.0  # far longer than any client takes to write a row or copy a sample
ACTIVE_WINDOW_S = 0.05  # writers quiet for this long: sleep until woken instead of napping
IDLE_SLEEP_S = 0.1
LIVENESS_CHECK_S = 0.1  # how often client pids are checked (connection EOF is the fast path)
EVENT_KINDS = TABLE_EVENTS  # shm_objects knows them by name
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, with the terminating NUL
# info() (shmreplay info, metrics scrapes) reuses a big table's priority-extremes and episode
# scan this recent: a scraper at full speed costs O(tables), plus one O(size) scan per second.
STATS_MAX_AGE_S = 1.0


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


@dataclass
class _Client:
    channel: int
    pid: int
    start_time: float | None
    conn: socket.socket | None = None


@dataclass
class _TableState:
    core: TableCore
    outstanding: np.ndarray  # per channel: slots leased and not yet committed
    # Slots a dead daemon's clients held, and when to free them (see TableCore.adopt).
    quarantine: tuple[float, np.ndarray] | None = None
    rotation: int = 0  # which wanting writer is served first next time
    # The rate limiter left nothing to lease to the writers that wait. Only a sample (or a
    # delete, reset or limiter change) can change that, and each of those posts the daemon:
    # no need to nap and re-check every ACTIVE_SLEEP_S meanwhile.
    starved: bool = False


class Daemon:
    """One shmreplay instance: ``Daemon(config).run()`` serves until SIGTERM/SIGINT/shutdown."""

    def __init__(
        self,
        config: Config,
        fresh: bool = False,
        restore: str | None = None,
        truncate: bool = False,
    ) -> None:
        self.config = config
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
        self.tables: dict[str, _TableState] = {}
        self.segments: list[Segment] = []
        self.events: list[Event] = []
        self.wake: Event | None = None
        self._stop = threading.Event()
        self._lock_fd: int | None = None
        self._listener: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._clients_lock = threading.Lock()
        self._dead: queue.Queue[tuple[int, str]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._owns_files = False
        self._fd_refusing = False  # refusing connections for want of descriptors (logged once)
        self._restoring = False  # the control socket answers, the tables are being restored
        self._control = ControlServer(self)

    # -- lifecycle -----------------------------------------------------------------------------

    def run(self, ready: callable | None = None) -> int:
        """Create everything, serve until asked to stop, clean up. Returns an exit status."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            self._start_metrics()
            if ready is not None:
                ready()
            # READY only now: every table is allocated (or adopted) and restored.
            self.notifier.ready(f"serving {len(self.tables)} table(s)")
            self.serve_forever()
            self.notifier.stopping()
            self._final_checkpoint()
        finally:
            self.notifier.stopping()
            if self.metrics is not None:
                self.metrics.close()
            for s, h in old.items():
                signal.signal(s, h)
            self.cleanup()
        return 0

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
        with self._checkpoint_lock:
            # Until its first progress line, those waiting hear this, not an older operation's.
            self._control.progress(progress_update("checkpoint: started"))
            report = write_checkpoint(
                {n: t.core for n, t in self.tables.items()},
                directory,
                self.config.server.checkpoint_keep,
                progress=self._progress,
                gid=_group_id(self.config.server.group),  # checkpoints as private as the tables
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
        """At shutdown, with checkpoint_dir set: commit what was published, then checkpoint."""
        if self.config.server.checkpoint_dir is None:
            return
        for t in self.tables.values():
            t.core.ctrl[Ctrl.SHUTDOWN] = 1  # writers stop here; what they published is kept
            self._service(t)
        try:
            self.checkpoint()
        except Exception:
            log.exception("the final checkpoint failed; the previous one is intact")

    def _maybe_periodic_checkpoint(self, now: float) -> None:
        interval = self.config.server.checkpoint_interval_s
        if interval is None or self.config.server.checkpoint_dir is None:
            return
        if now < self._next_checkpoint or self._checkpoint_lock.locked():
            return
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
        self._take_instance_lock()
        adoptable = self._leftovers()
        need = check_fits(self.config, frozenset(adoptable))
        gid = _group_id(self.config.server.group)
        mode = 0o660 if gid is not None else 0o600
        self.wake = _create_event(event_name(self.name, None, "daemon"), mode, gid)
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

    def _take_instance_lock(self) -> None:
        """Hold ``<name>.lock`` in the runtime directory (checked: this user's, closed to
        others) for as long as the daemon runs. ``shmreplay gc`` removes a lock file nobody
        holds (while holding it): if ours was unlinked between open and flock, open again."""
        runtime_dir(daemon=True)
        path = lock_path(self.name)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                rec = InstanceRecord.read(self.name)
                if rec is None or not rec.alive():
                    raise DaemonAlreadyRunning(
                        f"{path} is locked by another process (a daemon of instance "
                        f"{self.name!r} starting, or shmreplay gc cleaning up); try again in "
                        "a moment"
                    ) from None
                who = f" (pid {rec.pid})"
                raise DaemonAlreadyRunning(
                    f"a shmreplay daemon already serves instance {self.name!r}{who}; stop it "
                    f"(shmreplay stop --name {self.name}) or choose another --name"
                ) from None
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # gc removed the file we opened: lock the one at the path now
        self._lock_fd = fd

    def _leftovers(self) -> dict[str, Segment]:
        """What a dead daemon of this instance left (we hold the lock): its table segments,
        checked against tables.toml, to adopt (or, with ``fresh``, nothing: all removed). Its
        semaphores, socket and record are removed either way.

        Only objects of this daemon's user are adopted or removed: another user's object under
        our name is refused (PermissionDenied naming it, its owner and what to do), never
        trusted (its owner could read and write our rows) nor deleted. Segments whose recorded
        daemon (pid and start time, Ctrl.DAEMON_START) is alive are refused with
        DaemonAlreadyRunning before anything is touched: that daemon may use another runtime
        directory, so our lock does not see it."""
        me = os.geteuid()
        stem = segment_name(self.name, "")[1:]
        entries = shm_objects(self.name)
        segments: dict[str, Segment] = {}
        sems: list[str] = []
        try:
            for entry in entries:
                path = os.path.join(SHM_DIR, entry)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                is_sem = entry.startswith("sem.")
                what = "a semaphore of this instance" if is_sem else "a table segment"
                check_owner(path, st, me, what, daemon=True)
                if is_sem:
                    sems.append(entry)
                    continue
                try:
                    seg = Segment.attach("/" + entry, owner=me, daemon=True)
                except DaemonNotRunning:
                    continue  # gone since it was listed
                except SegmentError as exc:
                    if self.fresh:
                        continue  # not a table: removed below
                    raise SegmentError(
                        f"{path} is not a shmreplay table ({exc}); remove it (rm {path}) or "
                        "start with --fresh to discard it"
                    ) from exc
                segments[entry[len(stem) :]] = seg
                pid = recorded_daemon_alive(seg)
                if pid is not None and pid != os.getpid():
                    raise DaemonAlreadyRunning(
                        f"a shmreplay daemon (pid {pid}) serves instance {self.name!r}: its "
                        f"table {path} says so (that daemon may use another runtime "
                        f"directory than {lock_path(self.name).parent}); stop it (kill -TERM "
                        f"{pid}) or choose another --name"
                    )
            for path in (socket_path(self.name), record_path(self.name)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            if self.fresh:
                for seg in segments.values():
                    seg.close()
                segments = {}
                if entries:
                    remove_shm_objects(self.name)
                    log.warning(
                        "--fresh: discarded %d object(s) a dead daemon of instance %r left: %s",
                        len(entries),
                        self.name,
                        " ".join(entries),
                    )
                return {}
            specs = {t.name: t for t in self.config.tables}
            for table, seg in segments.items():
                if table not in specs:
                    raise ConfigError(
                        f"a dead daemon of instance {self.name!r} left table {table!r} in "
                        f"/dev/shm, which tables.toml does not define; serve the tables.toml it "
                        f"ran with, or start with --fresh to discard its items"
                    )
                expected = compute_layout(specs[table], self.max_clients)
                if seg.layout.digest != expected.digest:
                    raise ConfigError(
                        f"table {table!r} left in /dev/shm by a dead daemon was made for another "
                        f"definition ({seg.layout.spec.to_dict()}) than tables.toml's "
                        f"({specs[table].to_dict()}); serve the old definition to keep its "
                        "items, or start with --fresh to discard them"
                    )
            for entry in sems:
                Event.unlink("/" + entry[len("sem.") :])
        except BaseException:
            for seg in segments.values():
                seg.close()
            raise
        return segments

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
        state = _TableState(core, np.zeros(self.max_clients, np.int64))
        # The start time goes in first: a reader that sees our pid sees it too (Ctrl).
        core.ctrl[Ctrl.DAEMON_START] = start_stamp(psutil.Process().create_time())
        if adopt is None:
            core.initialize(os.getpid())
        else:
            committed, held = core.adopt(os.getpid())
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
        if self.wake is not None and self.wake.sem is not None:
            self.wake.sem.release()

    def cleanup(self) -> None:
        """Wake every waiter with an error, unlink every object, remove our files. Idempotent."""
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
        for seg in self.segments:
            if self._serving or seg.name not in self._adopted:
                Segment.unlink(seg.name)  # else a failed start must not destroy adopted items
            seg.close()
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
            os.close(self._lock_fd)  # releases the flock: another daemon may start now
            self._lock_fd = None
            log.info("instance %r stopped; shared memory released", self.name)

    # -- the commit loop -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        next_liveness = time.monotonic() + LIVENESS_CHECK_S
        last_work = 0.0
        while not self._stop.is_set():
            self.notifier.watchdog_tick()  # here, not in a thread: a stuck loop gets restarted
            worked = False
            for t in self.tables.values():
                worked |= self._service(t)
            while not self._dead.empty():
                self._reclaim(*self._dead.get())
            now = time.monotonic()
            if now >= next_liveness:
                self._check_clients()
                self._end_quarantines(now)
                self._maybe_periodic_checkpoint(now)
                next_liveness = now + LIVENESS_CHECK_S
            if worked:
                last_work = now
            else:
                self._sleep(active=now - last_work < ACTIVE_WINDOW_S)

    @contextlib.contextmanager
    def _locked(self, t: _TableState, what: str):
        """The table's lock, for the commit loop. A process stopped (SIGSTOP) while holding it
        cannot be told from a slow one and its lock cannot be taken from it: wait, and say
        every STALL_WARN_S who holds it."""
        waited = 0.0
        while True:
            try:
                t.core.mutex.acquire(STALL_WARN_S)
                break
            except LockTimeout:
                waited += STALL_WARN_S
                log.warning(
                    "table %r: its lock has been held by pid %d for %.0f s (a stopped process?);"
                    " %s waits",
                    t.core.name,
                    t.core.mutex.owner_pid,
                    waited,
                    what,
                )
        try:
            yield
        finally:
            t.core.mutex.release()

    def _end_quarantines(self, now: float) -> None:
        for name, t in self.tables.items():
            if t.quarantine is not None and now >= t.quarantine[0]:
                freed = t.core.release_quarantined(t.quarantine[1])
                t.quarantine = None
                if freed:
                    log.info("table %r: %d slot(s) held before the restart freed", name, freed)

    def _sleep(self, active: bool) -> None:
        """Nap while writers are busy (they need not wake us per item); sleep long once they
        have been quiet for ACTIVE_WINDOW_S (the next publish wakes us)."""
        writers = active and any(
            not t.starved and bool(t.core.chan[:, Chan.WANT_LEASE].any())
            for t in self.tables.values()
        )
        for t in self.tables.values():
            t.core.ctrl[Ctrl.DAEMON_SLEEPING] = Sleep.NAP if writers else Sleep.IDLE
        # Re-check after raising the flag: a writer that published before seeing it did not post.
        if not any(self._has_work(t) for t in self.tables.values()):
            self.wake.wait(ACTIVE_SLEEP_S if writers else IDLE_SLEEP_S)
        for t in self.tables.values():
            t.core.ctrl[Ctrl.DAEMON_SLEEPING] = Sleep.AWAKE

    @staticmethod
    def _has_work(t: _TableState) -> bool:
        chan = t.core.chan
        return bool((chan[:, Chan.PUB_TAIL] != chan[:, Chan.PUB_HEAD]).any())

    def _service(self, t: _TableState) -> bool:
        """Commit what was published, refill leases, wake waiters. True if anything happened."""
        core = t.core
        chan = core.chan
        tails = chan[:, Chan.PUB_TAIL].copy()
        heads = chan[:, Chan.PUB_HEAD]
        pending = np.flatnonzero(tails != heads)
        committed = 0
        if len(pending):
            parts = [
                ring_get(core.publish_ring[c], int(heads[c]), int(tails[c] - heads[c]))
                for c in pending
            ]
            slots = parts[0] if len(parts) == 1 else np.concatenate(parts)
            with self._locked(t, "committing"):
                committed = core.commit(slots)
            for c in pending:
                t.outstanding[c] -= tails[c] - heads[c]
                chan[c, Chan.PUB_HEAD] = tails[c]
        if committed:  # before refilling leases: a waiting sampler is on the critical path
            waiting = int(np.count_nonzero(chan[:, Chan.WAIT_SAMPLE]))
            core.events.sample.post(waiting)
        leased = self._refill(t)
        if core.ctrl[Ctrl.SAMPLER_WAITING]:
            # Clear the hint, then re-check: a sampler sets its flag before the hint.
            core.ctrl[Ctrl.SAMPLER_WAITING] = 0
            if chan[:, Chan.WAIT_SAMPLE].any():
                core.ctrl[Ctrl.SAMPLER_WAITING] = 1
        if committed or leased or len(pending):
            core.events.insert.post(int(np.count_nonzero(chan[:, Chan.WAIT_INSERT])))
        return bool(len(pending) or leased)

    def _refill(self, t: _TableState) -> int:
        core = t.core
        chan = core.chan
        wanting = np.flatnonzero((chan[:, Chan.WANT_LEASE] > 0) & (chan[:, Chan.PID] != 0))
        t.starved = False
        if len(wanting) == 0:
            return 0
        limited = core.limiter.blocks_inserts
        if limited and core.limiter.insert_allowance(1, int(t.outstanding.sum())) == 0:
            # Read without the lock, as a hint: counters only move towards more budget through
            # a sample, delete or reset, each of which posts us (see t.starved).
            t.starved = True
            return 0
        # Scalars in Python, not numpy: this runs at every wake-up of the commit loop.
        headroom = min(max(int(core.spec.headroom) // (2 * len(wanting)), 1), LEASE_CAPACITY)
        have = chan[wanting, Chan.LEASE_TAIL] - chan[wanting, Chan.LEASE_HEAD]
        if not limited:  # keep every writer's lease ring filled, refilling at half
            need = np.where(have <= headroom // 2, headroom - have, 0)
            if not need.any():
                return 0
        if len(wanting) > 1:
            # Writers served first get the limiter's budget (or the last free slots) first:
            # rotate who that is.
            t.rotation += 1
            shift = -(t.rotation % len(wanting))
            wanting, have = np.roll(wanting, shift), np.roll(have, shift)
            if not limited:
                need = np.roll(need, shift)
        total = 0
        with self._locked(t, "leasing slots"):
            pending = int(t.outstanding.sum())
            if limited:
                # What each writer asked for (see Table._wait_for_lease), and more ahead of
                # need only out of a wide budget: at most a quarter of what the limiter
                # allows now is shared out ahead, so a writer going idle cannot hoard it.
                free = core.limiter.insert_allowance(LEASE_CAPACITY * len(wanting), pending)
                ahead = min(headroom, free // (4 * len(wanting)))
                asked = np.minimum(chan[wanting, Chan.WANT_LEASE], LEASE_CAPACITY)
                need = np.maximum(np.maximum(asked, ahead) - have, 0)
            budget = core.limiter.insert_allowance(int(need.sum()), pending)
            t.starved = limited and budget <= 0 < int(need.sum())
            for c, n in zip(wanting, need, strict=True):
                n = min(int(n), budget)
                if n <= 0:
                    continue
                slots = core.lease(int(c), n)
                k = len(slots)
                if k == 0:
                    break
                tail = int(chan[c, Chan.LEASE_TAIL])
                ring_put(core.lease_ring[c], tail, slots)
                chan[c, Chan.LEASE_TAIL] = tail + k
                t.outstanding[c] += k
                budget -= k
                total += k
        return total

    # -- clients ---------------------------------------------------------------------------------

    def _register(self, pid: int, conn: socket.socket) -> int:
        with self._clients_lock:
            used = set(self._clients)
            free = [c for c in range(self.max_clients) if c not in used]
            if not free:
                raise ShmReplayError(
                    f"instance {self.name!r} already has {self.max_clients} clients attached; "
                    "raise max_clients in [server] or close unused clients"
                )
            c = free[0]
            try:
                start = psutil.Process(pid).create_time()
            except psutil.Error:
                start = None
            self._clients[c] = _Client(c, pid, start, conn)
        for t in self.tables.values():
            t.core.chan[c, :] = 0
            t.outstanding[c] = 0
            t.core.chan[c, Chan.PID] = pid
        log.info("client pid %d attached (channel %d)", pid, c)
        return c

    def _check_clients(self) -> None:
        with self._clients_lock:
            clients = list(self._clients.values())
        for cl in clients:
            if not process_alive(cl.pid, cl.start_time):
                self._reclaim(cl.channel, reason="died")

    def _reclaim(self, channel: int, reason: str = "disconnected") -> None:
        with self._clients_lock:
            client = self._clients.pop(channel, None)
        if client is None:
            return
        freed = 0
        for name, t in self.tables.items():
            self._service(t)  # commit what it published before it went away: nothing is lost
            t.core.chan[channel, Chan.WANT_LEASE] = 0
            repairs = int(t.core.ctrl[Ctrl.REPAIRS])
            with t.core.mutex:  # a holder that died is detected here, and repaired first
                freed += t.core.reclaim_channel(channel)
            t.outstanding[channel] = 0
            if int(t.core.ctrl[Ctrl.REPAIRS]) != repairs:
                log.warning(
                    "table %r: a process died holding its lock; rebuilt its structures from "
                    "the per-slot metadata",
                    name,
                )
        log.info(
            "client pid %d (channel %d) %s; %d unused leased slot(s) returned",
            client.pid,
            channel,
            reason,
            freed,
        )

    # -- control socket (its own thread) ------------------------------------------------------

    def _serve_control(self) -> None:
        """The control thread: see :mod:`shmreplay.control_server`."""
        self._control.serve()

    def _accept(self) -> tuple[socket.socket | None, bool]:
        """Accept one control connection, or refuse it with an error reply and close it: a
        peer not allowed (SO_PEERCRED), or no descriptor to spare (the daemon keeps
        FD_RESERVE free for its own work: checkpoints, /proc). Returns the connection (None
        if none was accepted) and whether accept() itself found no descriptor."""
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return None, False
        except OSError as exc:
            if not is_out_of_descriptors(exc):
                return None, False
            self._fd_shortage(None)
            return None, True
        short = self._fd_shortage(conn)
        if short is not None:
            _refuse(conn, "TooManyOpenFiles", short)
            return None, False
        refused = self._peer_refused(conn)
        if refused is not None:
            _refuse(conn, "PermissionDenied", refused)
            return None, False
        return conn, False

    def _fd_shortage(self, conn: socket.socket | None) -> str | None:
        """A message if the daemon has fewer than FD_RESERVE descriptors to spare (``conn``
        counted as spent), else None. The first refusal is logged, and the recovery."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        try:
            used = len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
        except OSError:
            used = soft
        if conn is not None and used + FD_RESERVE <= soft:
            if self._fd_refusing:
                self._fd_refusing = False
                log.info("file descriptors available again (%d of %d in use)", used, soft)
            return None
        message = (
            f"the shmreplay daemon of instance {self.name!r} (pid {os.getpid()}) is out of file "
            f"descriptors ({used} in use, limit {soft}, {FD_RESERVE} kept for itself) and "
            "refuses new connections until some close; close unused clients, or raise its "
            "limit (LimitNOFILE= in its systemd unit, ulimit -n before shmreplay serve), then "
            "attach again"
        )
        if not self._fd_refusing:
            self._fd_refusing = True
            with self._clients_lock:
                attached = len(self._clients)
            log.warning(
                "out of file descriptors: %d in use of a limit of %d (%d clients attached); "
                "refusing new control connections until some close (logged once)",
                used,
                soft,
                attached,
            )
        return message

    def _peer_refused(self, conn: socket.socket) -> str | None:
        """The socket's mode already keeps others out; the kernel's word on the peer (its uid,
        SO_PEERCRED) is checked too: our user, root, or a member of [server] group. Returns
        why the peer is refused, or None."""
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        if uid in (0, os.getuid()):
            return None
        group = _group_id(self.config.server.group)
        if group is not None and (gid == group or _user_in_group(uid, group)):
            return None
        log.warning("refused a control connection from pid %d (uid %d): not allowed", pid, uid)
        if group is None:
            return (
                f"uid {uid} may not use instance {self.name!r}: its daemon (uid {os.getuid()}) "
                "admits only its own user and root; to admit others, set group in [server] of "
                "its tables.toml and add them to that group"
            )
        g = self.config.server.group
        return (
            f"uid {uid} may not use instance {self.name!r}: its daemon (uid {os.getuid()}) "
            f"admits its own user, root and the members of group {g!r}; add this user to it "
            f"(usermod -aG {g} <user>) and log in again"
        )

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

    def _table(self, name: object) -> _TableState:
        if name not in self.tables:
            raise TableNotFoundError(
                f"no table {name!r} in instance {self.name!r}; tables: {', '.join(self.tables)}"
            )
        return self.tables[name]

    def info(self) -> dict:
        """The instance's state, clients and each table's statistics (O(1) per table). Waits
        at most CONTROL_LOCK_TIMEOUT_S for a table's lock, then raises LockTimeout naming the
        table and the pid holding it. While restoring, ``tables`` is empty and ``progress``
        tells how far the restore is."""
        with self._clients_lock:
            clients = [{"pid": c.pid, "channel": c.channel} for c in self._clients.values()]
        state = self.state
        tables = {}
        if state != "restoring":
            for n, t in list(self.tables.items()):
                try:
                    stats = t.core.info(timeout=CONTROL_LOCK_TIMEOUT_S, max_age=STATS_MAX_AGE_S)
                    tables[n] = _plain(stats.to_dict())
                except LockTimeout:
                    raise LockTimeout(
                        f"table {n!r} of instance {self.name!r}: its lock has been held by pid "
                        f"{t.core.mutex.owner_pid} for more than {CONTROL_LOCK_TIMEOUT_S} s (a "
                        "stopped process, a debugger?); resume or end that process, then ask "
                        "again"
                    ) from None
        return {
            "name": self.name,
            "pid": os.getpid(),
            "format_version": FORMAT_VERSION,
            "state": state,
            "progress": self._control.latest_progress() if state == "restoring" else None,
            "clients": clients,
            "tables": tables,
        }


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


def _error(kind: str, message: str) -> dict:
    return {"ok": False, "type": kind, "error": message}


def _refuse(conn: socket.socket, kind: str, message: str) -> None:
    """Answer a connection's first request in advance with an error, and close it. The
    client reads the reply even if its request arrives after the close (see ControlClient)."""
    try:
        conn.settimeout(0.5)  # the reply fits in any socket buffer; never wait on the peer
        conn.sendall(encode(_error(kind, message)))
    except OSError:
        pass
    finally:
        conn.close()


def _plain(obj):
    """Make a value msgpack-able (tuples to lists, numpy scalars to Python numbers)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _user_in_group(uid: int, gid: int) -> bool:
    import grp
    import pwd

    try:
        user = pwd.getpwuid(uid)
        return user.pw_gid == gid or user.pw_name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


def _group_id(group: str | None) -> int | None:
    if group is None:
        return None
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ShmReplayError(f"[server] group = {group!r}: no such group on this machine") from None


def serve(
    config: Config, fresh: bool = False, restore: str | None = None, truncate: bool = False
) -> int:
    """Run a daemon for ``config`` in the foreground until SIGTERM/SIGINT. Tables a dead daemon
    of the same instance left in /dev/shm are adopted (``fresh``: discarded); the others are
    restored from ``restore`` or the latest checkpoint in checkpoint_dir, if any."""
    return Daemon(config, fresh=fresh, restore=restore, truncate=truncate).run()
