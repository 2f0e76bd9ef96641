"""The daemon: owns the tables' shared memory, commits what writers publish, leases free slots.

One process per instance. The main thread runs the commit loop: drain every writer's publish
ring, commit the slots under the table mutex in one vectorised batch, refill the writers' lease
rings, wake the processes waiting on it, then sleep on the instance's semaphore until a writer
posts it. A second thread serves the control socket (``hello``/``bye``/``info``/``shutdown``) and
notices a client's death by its connection closing; the main thread then reclaims what that
client held. SIGTERM and SIGINT shut down cleanly: waiters are woken with an error, segments and
semaphores are unlinked, the socket and the instance record removed.

Faults are contained (see :meth:`Daemon.run`): only a requested stop removes the tables. Every
value the commit loop reads from memory a client can write (ring positions, slots, lease
requests, priorities) is checked first; a client that wrote nonsense is cut off alone
(:meth:`Daemon._cut_off`). A table whose commit or lease fails is quarantined alone
(:meth:`Daemon._quarantine`). Any other error ends the daemon with status 1 and leaves every
table in /dev/shm for the next daemon to adopt.
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
from .engine import _native
from .errors import (
    CheckpointError,
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
    PUBLISH_CAPACITY,
    Chan,
    Ctrl,
    TableState,
    compute_layout,
)
from .metrics import MetricsServer
from .notify import Notifier
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
FAULT_ENV = "SHMREPLAY_INJECT_FAULT"  # see _injected_fault
_ROUND = object()  # Daemon._service: no round result given, run one


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


class _Reports(queue.Queue):
    """The control thread's reports of closed connections (channel, reason). Each report also
    sets the commit loop's attention word (the poster then posts the wake event): the loop,
    running in C without the GIL, comes back to Python to reclaim the channel at once."""

    def __init__(self, attention: np.ndarray) -> None:
        super().__init__()
        self._attention = attention

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._attention[0] = 1


@dataclass
class _Client:
    channel: int
    pid: int
    start_time: float | None
    conn: socket.socket | None = None
    # What it held was taken back (it died, or was cut off); its channel stays reserved until
    # the control thread reports its connection closed (see Daemon._reclaim).
    reclaimed: bool = False
    leaving: bool = False  # the control thread reported its connection closed (bye, EOF)


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
    # The daemon's own copies of the ring indices it owns (the copies in shared memory are only
    # published for the writers: a client may overwrite them, the daemon never reads them back).
    pub_head: np.ndarray | None = None
    lease_tail: np.ndarray | None = None
    # Why the table was quarantined (see Daemon._quarantine), None while it is sound.
    broken: str | None = None
    # The compiled round over the table's channels (Daemon._round_for): drain, finish, lease.
    round: _native.CommitRound | None = None
    out_slots: np.ndarray | None = None  # where the round drains to (slots, priorities)
    out_prios: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.pub_head is None:
            self.pub_head = np.zeros(len(self.outstanding), np.int64)
        if self.lease_tail is None:
            self.lease_tail = np.zeros(len(self.outstanding), np.int64)


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
        # Set (then the wake event posted) when the commit loop must come back to Python: a
        # stop, a departed client, a new one (see serve_forever).
        self._attention = np.zeros(1, np.int64)
        self._dead: queue.Queue[tuple[int, str]] = _Reports(self._attention)
        self._loop: _native.Loop | None = None  # the commit loop in C (serve_forever)
        # Channels whose rings the commit loop reads: registered, not yet reclaimed or cut off.
        # Only this decides, never the PID a client could write into its channel line.
        self._active = np.zeros(self.max_clients, dtype=bool)
        self._serve_started = False  # past start-up: an error now keeps every table
        self._thread: threading.Thread | None = None
        self._owns_files = False
        self._fd_refusing = False  # refusing connections for want of descriptors (logged once)
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
                self._service(t)
        try:
            self.checkpoint()
        except Exception:
            log.exception("the final checkpoint failed; the previous one is intact")

    def _broken_tables(self) -> str:
        """Which tables are quarantined and why, as a phrase ('' if none)."""
        return "; ".join(
            f"table {n!r} is quarantined ({t.broken})"
            for n, t in self.tables.items()
            if t.broken is not None
        )

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
        state.round = self._round_for(state)
        # The start time goes in first: a reader that sees our pid sees it too (Ctrl).
        core.ctrl[Ctrl.DAEMON_START] = start_stamp(psutil.Process().create_time())
        if adopt is None:
            core.initialize(os.getpid())
        else:
            try:
                committed, held = core.adopt(os.getpid())
            except Exception as exc:  # a table that cannot be taken over costs only itself
                self.tables[spec.name] = state
                self._quarantine(state, f"adopting it failed: {type(exc).__name__}: {exc}", exc)
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
        self._attend()

    def _attend(self) -> None:
        """Bring the commit loop (in C, without the GIL) back to Python at once."""
        self._attention[0] = 1
        if self.wake is not None and self.wake.sem is not None:
            self.wake.sem.release()

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
        self._loop = None  # its semaphore handles are closed with it
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

    # -- the commit loop -------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """The commit loop, until a stop is requested. An exception out of it is a bug of the
        daemon's own (tables and clients are contained in _service and _cut_off): run() then
        keeps every table for the next daemon.

        The steady state runs in C without the GIL (``_native.Loop.serve``, csrc/commit.c):
        per table, drain and commit, refill the writers' leases, post the waiters; then
        settle and nap (see _loop_for). It comes back here when Python is needed: a table's
        round that needs it (a refused run, a busy or orphaned lock, a repair, a writer to
        cut off: _service with that round's result), the attention word (a stop, a client
        attached or gone), a signal, or the liveness timer (LIVENESS_CHECK_S): about ten
        times a second when nothing unusual happens."""
        next_liveness = time.monotonic() + LIVENESS_CHECK_S
        fault_after = _injected_fault()
        loop = self._loop_for()
        order = list(self.tables.values())
        while not self._stop.is_set():
            self.notifier.watchdog_tick()  # here, not in a thread: a stuck loop gets restarted
            if fault_after is not None and self._committed_total() >= fault_after:
                raise RuntimeError(f"{FAULT_ENV}: injected fault after {fault_after} item(s)")
            self._attention[0] = 0  # before looking at what asked for it
            for i, t in enumerate(order):
                loop.set_broken(i, t.broken is not None)
            code, i, res = loop.serve(next_liveness)
            if code == _native.LOOP_TABLE:
                self._service(order[i], res)
            while not self._dead.empty():
                self._reclaim(*self._dead.get())
            now = time.monotonic()
            if now >= next_liveness:
                self._check_clients()
                self._end_quarantines(now)
                self._maybe_periodic_checkpoint(now)
                next_liveness = now + LIVENESS_CHECK_S

    def _committed_total(self) -> int:
        return sum(int(t.core.ctrl[Ctrl.TOTAL_INSERTED]) for t in self.tables.values())

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
        """Free the slots a dead daemon's clients held, once they must have noticed (the
        post-adoption hold, not a quarantined table: see _quarantine)."""
        for name, t in self.tables.items():
            if t.quarantine is not None and t.broken is None and now >= t.quarantine[0]:
                try:
                    freed = t.core.release_quarantined(t.quarantine[1])
                except Exception as exc:
                    self._quarantine(t, f"{type(exc).__name__}: {exc}", exc)
                    continue
                t.quarantine = None
                if freed:
                    log.info("table %r: %d slot(s) held before the restart freed", name, freed)

    def _round_for(self, t: _TableState) -> _native.CommitRound:
        """The compiled round over ``t``'s channels, on the daemon's private arrays (its ring
        ends, the active channels) and the segment's rings."""
        a = t.core.segment.arrays
        size = self.max_clients * PUBLISH_CAPACITY
        t.out_slots, t.out_prios = np.empty(size, np.int64), np.empty(size, np.float64)
        rnd = _native.CommitRound(
            t.core._commit_engine(),
            a["chan.ctrl"].reshape(-1),
            a["chan.lease"].reshape(-1),
            a["chan.publish"].reshape(-1),
            self._active,
            t.pub_head,
            t.lease_tail,
            t.outstanding,
            t.out_slots,
            t.out_prios,
        )
        rnd.set_mutex(a["mutex"])  # commit_round tries the table's lock itself
        return rnd

    def _loop_for(self) -> _native.Loop:
        """The commit loop in C over every table, in self.tables' order.

        Its sleep (Daemon._sleep before it moved to C): nap while writers are busy (they need
        not wake us per item); sleep long once they have been quiet for ACTIVE_WINDOW_S (the
        next publish wakes us). The daemon's half of the Dekker pair with a publishing
        writer: raise the flag (store, seq_cst fence), then look at every PUB_TAIL; a writer
        stores its PUB_TAIL, fences, then looks at the flag. One of the two sees the other.
        The commit policy: writers active and nobody waiting on us, nap ACTIVE_SLEEP_S even if
        items were published meanwhile (a round per nap, not per item); a writer low on
        leases, a flush or a waiting sampler posts us and ends the nap at once."""
        if self._loop is None:
            loop = _native.Loop(
                self.wake.name, self._attention, ACTIVE_SLEEP_S, IDLE_SLEEP_S, ACTIVE_WINDOW_S
            )
            for t in self.tables.values():
                core = t.core
                loop.add(
                    t.round,
                    core.segment.arrays["params"].reshape(-1),
                    int(core.spec.headroom),
                    core.events.sample.name,
                    core.events.insert.name,
                )
            self._loop = loop
        return self._loop

    def _service(self, t: _TableState, res: object = _ROUND) -> bool:
        """Commit what was published, refill leases, wake waiters. True if anything happened.
        ``res``: what the loop in C drained and did (commit_round's result), else a round here.

        Raises nothing on a table's account: a value a client wrote that makes no sense cuts
        that client off (:meth:`_cut_off`); any other error quarantines the table
        (:meth:`_quarantine`). Blocks only while another process holds the table's lock."""
        if t.broken is not None:
            return False
        try:
            return self._commit_and_lease(t, res)
        except Exception as exc:
            self._quarantine(t, f"{type(exc).__name__}: {exc}", exc)
            return True

    def _commit_and_lease(self, t: _TableState, res: object = _ROUND) -> bool:
        core = t.core
        rnd = t.round
        # Every active channel's run, checked and copied once, then committed under the lock
        # (tried once), the selectors and the eviction included, and PUB_HEAD released: one
        # call (commit_round, or the loop in C). What it leaves to Python: refused runs, a
        # busy or orphaned lock, structures to repair.
        if res is _ROUND:
            res = rnd.commit_round()
        committed, n, refused = 0, 0, None
        if res is None:
            pass
        elif type(res) is int:
            n = 1  # something was drained
            if res >= 0:
                committed = res
            else:  # -2: committed, then a selector failed: repair, evict, release PUB_HEAD
                with self._locked(t, "committing"):
                    committed = core._commit_repaired(core._commit_engine(), res, None, None)
                rnd.finish()
        else:
            n, refused = res
            if refused is False:  # we hold the lock; its previous owner died holding it
                core.mutex.recover_from_dead_owner()
                core.mutex.release()
                refused = None
            if refused:
                for c, why in refused:
                    self._cut_off(c, f"table {core.name!r}: {why}")
            if n:
                with self._locked(t, "committing"):
                    committed = core.commit(t.out_slots[:n], t.out_prios[:n], in_place=True)
                rnd.finish()  # PUB_HEAD store-release per drained channel
        leased = self._refill(t)
        wait_insert, wait_sample = rnd.waiters()  # after a seq_cst fence (Dekker)
        if committed and wait_sample:  # a waiting sampler is on the critical path
            core.events.sample.post(wait_sample)
        if core.ctrl[Ctrl.SAMPLER_WAITING]:
            # Clear the hint, then re-check: a sampler sets its flag before the hint.
            core.ctrl[Ctrl.SAMPLER_WAITING] = 0
            if rnd.waiters()[1]:
                core.ctrl[Ctrl.SAMPLER_WAITING] = 1
        if (n or refused or leased) and wait_insert:
            core.events.insert.post(wait_insert)
        return bool(n or refused or leased)

    def _refill(self, t: _TableState) -> int:
        core = t.core
        t.starved = False
        limited = core.limiter.blocks_inserts
        # [(channel, want, have)], active channels only; unlimited, empty when every writer's
        # lease ring is more than half full (decided in C: most rounds lease nothing).
        wanting = t.round.wanting(0 if limited else int(core.spec.headroom))
        if not wanting:
            return 0
        # The writers move their lease heads: checked against the tails we wrote.
        ok = []
        for c, want, have in wanting:
            if want < 0:
                self._cut_off(c, f"table {core.name!r}: it asked for {want} slots")
            elif not 0 <= have <= LEASE_CAPACITY:
                self._cut_off(
                    c,
                    f"table {core.name!r}: its lease ring's head is {have} slot(s) behind "
                    f"the tail {int(t.lease_tail[c])} (capacity {LEASE_CAPACITY})",
                )
            else:
                ok.append((c, want, have))
        if not ok:
            return 0
        if limited and core.limiter.insert_allowance(1, int(t.outstanding.sum())) == 0:
            # Read without the lock, as a hint: counters only move towards more budget through
            # a sample, delete or reset, each of which posts us (see t.starved).
            t.starved = True
            return 0
        # Scalars in Python, not numpy: this runs at every wake-up of the commit loop.
        headroom = min(max(int(core.spec.headroom) // (2 * len(ok)), 1), LEASE_CAPACITY)
        if not limited:  # keep every writer's lease ring filled, refilling at half
            ok = [(c, w, h, headroom - h if h <= headroom // 2 else 0) for c, w, h in ok]
            if not any(x[3] for x in ok):
                return 0
        if len(ok) > 1:
            # Writers served first get the limiter's budget (or the last free slots) first:
            # rotate who that is.
            t.rotation += 1
            shift = t.rotation % len(ok)
            ok = ok[shift:] + ok[:shift]
        total = 0
        with self._locked(t, "leasing slots"):
            core.check_counts()
            pending = int(t.outstanding.sum())
            if limited:
                # What each writer asked for (see Table._wait_for_lease), and more ahead of
                # need only out of a wide budget: at most a quarter of what the limiter
                # allows now is shared out ahead, so a writer going idle cannot hoard it.
                free = core.limiter.insert_allowance(LEASE_CAPACITY * len(ok), pending)
                ahead = min(headroom, free // (4 * len(ok)))
                ok = [
                    (c, w, h, min(max(max(min(w, LEASE_CAPACITY), ahead) - h, 0), LEASE_CAPACITY))
                    for c, w, h in ok
                ]
            need = sum(x[3] for x in ok)
            budget = core.limiter.insert_allowance(need, pending)
            t.starved = limited and budget <= 0 < need
            for c, _, _, n in ok:
                n = min(n, budget)
                if n <= 0:
                    continue
                k = t.round.lease(c, n)  # LEASE_TAIL store-release inside
                if k < 0:
                    # The free ring lists a slot that is not one, or not free, or twice.
                    core._repair_counts("its free ring lists slots that are not free")
                    k = max(t.round.lease(c, n), 0)
                if k == 0:
                    break
                budget -= k
                total += k
        return total

    def _quarantine(self, t: _TableState, why: str, exc: BaseException | None = None) -> None:
        """Stop serving a table that cannot go on (its lock is corrupt, or committing to it or
        leasing from it raised), not the instance. Its structures are rebuilt from the per-slot
        metadata if its lock still works, so samplers keep reading it; writers get
        TableQuarantined; it is written to no checkpoint and stays in /dev/shm at exit, for
        the next daemon to adopt (and repair)."""
        if t.broken is not None:
            return
        t.broken = why
        core = t.core
        core.ctrl[Ctrl.TABLE_STATE] = TableState.QUARANTINED
        log.error(
            "table %r quarantined: %s; samplers may still read it, writers are refused, and it "
            "stays in /dev/shm for the next daemon to adopt (restart the daemon to repair it)",
            core.name,
            why,
            exc_info=exc,
        )
        try:
            with core.mutex.held(STALL_WARN_S):
                core.repair()
        except Exception as repair_exc:
            log.error("table %r: could not rebuild its structures: %s", core.name, repair_exc)
        # Writers waiting for a lease or a commit look again, and raise.
        core.events.insert.post(int(np.count_nonzero(core.chan[:, Chan.WAIT_INSERT])) + 1)

    # -- clients ---------------------------------------------------------------------------------

    def _register(self, pid: int, conn: socket.socket) -> int:
        """Give a new client a channel (control thread). A channel is free again only once the
        previous client's connection was reported closed and its reclaim finished."""
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
            if t.broken is None:  # (a quarantined table's channels wait for adoption)
                t.core.chan[c, :] = 0
            t.outstanding[c] = 0
            t.pub_head[c] = 0
            t.lease_tail[c] = 0
            t.core.chan[c, Chan.PID] = pid
        self._active[c] = True  # last: the commit loop reads the channel from now on
        self._attend()  # the loop in C reads the active channels afresh from Python's side
        log.info("client pid %d attached (channel %d)", pid, c)
        return c

    def _check_clients(self) -> None:
        with self._clients_lock:
            clients = [c for c in self._clients.values() if not c.reclaimed]
        for cl in clients:
            if not process_alive(cl.pid, cl.start_time):
                self._take_back(cl, "died")
                # Its connection reports the death too, unless a child inherited it: close it
                # on our side so that the control thread frees the channel either way.
                _shutdown(cl.conn)

    def _reclaim(self, channel: int, reason: str = "disconnected") -> None:
        """The control thread reported ``channel``'s connection closed (once per attach): take
        back what its client held, if not done already, and free the channel."""
        with self._clients_lock:
            client = self._clients.get(channel)
        if client is None:
            return
        if not client.reclaimed:
            self._take_back(client, reason)
        with self._clients_lock:
            self._clients.pop(channel, None)  # last: _register may hand the channel out now

    def _take_back(self, client: _Client, reason: str) -> None:
        """Commit what a departed client published, then free the slots it still held."""
        channel = client.channel
        for t in self.tables.values():
            self._service(t)  # commit what it published before it went away: nothing is lost
        self._active[channel] = False
        client.reclaimed = True
        freed = self._free_channel(channel)
        log.info(
            "client pid %d (channel %d) %s; %d unused leased slot(s) returned",
            client.pid,
            channel,
            reason,
            freed,
        )

    def _free_channel(self, channel: int) -> int:
        """Free every slot leased to (or being released by) ``channel`` in every table, and
        clear its channel lines; the channel is inactive already. Returns the slots freed."""
        freed = 0
        for name, t in self.tables.items():
            t.core.chan[channel, Chan.WANT_LEASE] = 0
            t.outstanding[channel] = 0
            if t.broken is not None:
                # What it leased and published waits for the next daemon: adopt() commits
                # what was published and frees the rest.
                continue
            repairs = int(t.core.ctrl[Ctrl.REPAIRS])
            try:
                with self._locked(t, "reclaiming a client's slots"):
                    # A holder that died is detected here, and repaired first.
                    freed += t.core.reclaim_channel(channel)
            except Exception as exc:
                self._quarantine(t, f"{type(exc).__name__}: {exc}", exc)
                continue
            if int(t.core.ctrl[Ctrl.REPAIRS]) != repairs:
                log.warning(
                    "table %r: a process died holding its lock; rebuilt its structures from "
                    "the per-slot metadata",
                    name,
                )
        return freed

    def _cut_off(self, channel: int, why: str) -> None:
        """A client wrote a value that makes no sense where only it writes: stop reading its
        channel, take back what it held (what it published and was not committed is dropped),
        close its connection. Its next call raises ClientCutOff; other clients go on."""
        if not self._active[channel]:
            return
        self._active[channel] = False
        with self._clients_lock:
            client = self._clients.get(channel)
        pid = client.pid if client is not None else 0
        log.error(
            "client pid %d (channel %d) cut off: %s; its connection is closed and the slots it "
            "held are taken back (its uncommitted items are dropped)",
            pid,
            channel,
            why,
        )
        if client is not None:
            client.reclaimed = True
        self._free_channel(channel)
        for t in self.tables.values():
            t.core.events.insert.post(1)  # it may wait for a lease: it looks again, and raises
            t.core.events.sample.post(1)
        if client is not None:
            _shutdown(client.conn)

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
        """The instance's state, clients and each table's statistics (O(1) per table) with its
        state ("ok", or "quarantined" and why). Waits at most CONTROL_LOCK_TIMEOUT_S for a
        healthy table's lock, then raises LockTimeout naming the table and the pid holding it.
        While restoring, ``tables`` is empty and ``progress`` tells how far the restore is."""
        # Attached clients: not those that left, whose channel waits for its reclaim (marked
        # leaving by the control thread before it answers their bye).
        with self._clients_lock:
            clients = [
                {"pid": c.pid, "channel": c.channel}
                for c in self._clients.values()
                if not (c.reclaimed or c.leaving)
            ]
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

    def _table_info(self, t: _TableState) -> dict:
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


def _injected_fault() -> int | None:
    """For the tests of what an unexpected error keeps: ``SHMREPLAY_INJECT_FAULT=commit-loop:N``
    makes the commit loop raise once N items were committed. Not for production use."""
    value = os.environ.get(FAULT_ENV, "")
    kind, _, count = value.partition(":")
    if kind != "commit-loop":
        return None
    return int(count or 0)


def _shutdown(conn: socket.socket | None) -> None:
    """End a client's control connection from our side: the control thread then sees it
    closed, reports it and frees its channel (see Daemon._reclaim)."""
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)


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
