"""What a daemon finds when it starts: the instance lock, and the objects a dead daemon of the
same instance left in /dev/shm (its tables to adopt; its semaphores, socket and record to remove).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os

from ..config import Config
from ..engine.events import Event
from ..engine.instance import (
    InstanceRecord,
    lock_path,
    record_path,
    recorded_daemon_alive,
    remove_shm_objects,
    runtime_dir,
    segment_name,
    shm_objects,
    socket_path,
)
from ..engine.layout import compute_layout
from ..engine.ownership import check_owner
from ..engine.shm import SHM_DIR, Segment
from ..errors import ConfigError, DaemonAlreadyRunning, DaemonNotRunning, SegmentError

log = logging.getLogger("shmreplay")


def take_instance_lock(name: str) -> int:
    """Lock ``<name>.lock`` in the runtime directory (checked: this user's, closed to
    others); the daemon holds the returned descriptor for as long as it runs. ``shmreplay gc``
    removes a lock file nobody holds (while holding it): if ours was unlinked between open and
    flock, open again."""
    runtime_dir(daemon=True)
    path = lock_path(name)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            rec = InstanceRecord.read(name)
            if rec is None or not rec.alive():
                raise DaemonAlreadyRunning(
                    f"{path} is locked by another process (a daemon of instance "
                    f"{name!r} starting, or shmreplay gc cleaning up); try again in "
                    "a moment"
                ) from None
            who = f" (pid {rec.pid})"
            raise DaemonAlreadyRunning(
                f"a shmreplay daemon already serves instance {name!r}{who}; stop it "
                f"(shmreplay stop --name {name}) or choose another --name"
            ) from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # gc removed the file we opened: lock the one at the path now
    return fd


def leftovers(config: Config, fresh: bool) -> dict[str, Segment]:
    """What a dead daemon of this instance left (we hold the lock): its table segments,
    checked against tables.toml, to adopt (or, with ``fresh``, nothing: all removed). Its
    semaphores, socket and record are removed either way.

    Only objects of this daemon's user are adopted or removed: another user's object under
    our name is refused (PermissionDenied naming it, its owner and what to do), never
    trusted (its owner could read and write our rows) nor deleted. Segments whose recorded
    daemon (pid and start time, Ctrl.DAEMON_START) is alive are refused with
    DaemonAlreadyRunning before anything is touched: that daemon may use another runtime
    directory, so our lock does not see it."""
    name = config.server.name
    me = os.geteuid()
    stem = segment_name(name, "")[1:]
    entries = shm_objects(name)
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
                if fresh:
                    continue  # not a table: removed below
                raise SegmentError(
                    f"{path} is not a shmreplay table ({exc}); remove it (rm {path}) or "
                    "start with --fresh to discard it"
                ) from exc
            segments[entry[len(stem) :]] = seg
            pid = recorded_daemon_alive(seg)
            if pid is not None and pid != os.getpid():
                raise DaemonAlreadyRunning(
                    f"a shmreplay daemon (pid {pid}) serves instance {name!r}: its "
                    f"table {path} says so (that daemon may use another runtime "
                    f"directory than {lock_path(name).parent}); stop it (kill -TERM "
                    f"{pid}) or choose another --name"
                )
        for path in (socket_path(name), record_path(name)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if fresh:
            for seg in segments.values():
                seg.close()
            segments = {}
            if entries:
                remove_shm_objects(name)
                log.warning(
                    "--fresh: discarded %d object(s) a dead daemon of instance %r left: %s",
                    len(entries),
                    name,
                    " ".join(entries),
                )
            return {}
        specs = {t.name: t for t in config.tables}
        for table, seg in segments.items():
            if table not in specs:
                raise ConfigError(
                    f"a dead daemon of instance {name!r} left table {table!r} in "
                    f"/dev/shm, which tables.toml does not define; serve the tables.toml it "
                    f"ran with, or start with --fresh to discard its items"
                )
            expected = compute_layout(specs[table], config.server.max_clients)
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
