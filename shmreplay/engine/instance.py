"""Where an instance's objects live and how to find them.

Every object an instance creates carries its name, so ``gc`` and monitoring can find them:

- table segments ``/dev/shm/shmreplay.<instance>.<table>``;
- semaphores ``/dev/shm/sem.shmreplay.<instance>.<table>.<event>`` and
  ``/dev/shm/sem.shmreplay.<instance>.daemon``;
- in the runtime directory (``$SHMREPLAY_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/shmreplay``, else
  ``/tmp/shmreplay-<uid>``; mode 0700): ``<instance>.json`` (the record ``attach`` reads),
  ``<instance>.sock`` (the control socket) and ``<instance>.lock`` (held by the live daemon).

Instance names are 1–169 letters, digits, '_' or '-' (:func:`shmreplay.config.check_instance_name`):
no '.', so the objects of one instance never start with another's prefix.

Who is trusted. The runtime directory must be closed to everyone but its owner, and belong to
this user or root (a client may also use another user's directory named by
``SHMREPLAY_RUNTIME_DIR``, such as a systemd daemon's ``/run/shmreplay``). A client trusts a
record only if its owner is this user, root or the directory's owner; that owner is the
daemon's user, and the control socket's peer (SO_PEERCRED) must be the record's pid and user,
and every segment and semaphore the client opens must belong to that user. A daemon adopts or
removes only objects of its own user, and leaves a segment whose recorded daemon (pid and start
time, ``Ctrl.DAEMON_START``) is alive to that daemon.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from ..errors import DaemonNotRunning, PermissionDenied, SegmentError
from .layout import Ctrl
from .ownership import _user, planted
from .shm import SHM_DIR, Segment

PREFIX = "shmreplay."
TABLE_EVENTS = ("sample", "insert")  # a table's semaphores (the daemon's EVENT_KINDS)


def _runtime_dir_path() -> tuple[Path, bool]:
    """The runtime directory and whether it was chosen explicitly (SHMREPLAY_RUNTIME_DIR)."""
    env = os.environ.get("SHMREPLAY_RUNTIME_DIR")
    if env:
        return Path(env), True
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "shmreplay", False
    return Path(f"/tmp/shmreplay-{os.geteuid()}"), False


def runtime_dir(daemon: bool = False) -> Path:
    """The directory holding instance records, sockets and locks (created 0700 if missing).

    It must be a directory (not a symlink) that nobody but its owner can write to: whoever can
    write there could plant a record pointing at their own socket. It must belong to this user
    (or root), except that a client accepts another user's directory named by
    ``SHMREPLAY_RUNTIME_DIR`` (a daemon's ``/run/shmreplay`` under systemd, read by clients of
    its group); a daemon (``daemon=True``) writes only into a directory of its own user. A
    ``/tmp/shmreplay-<uid>`` someone else created first is refused: raises
    :class:`PermissionDenied` saying what is wrong and how to fix it. Never blocks."""
    path, explicit = _runtime_dir_path()
    me = os.geteuid()
    try:
        st = path.lstat()
    except FileNotFoundError:
        try:
            if explicit:
                path.parent.mkdir(parents=True, exist_ok=True)
            path.mkdir(mode=0o700)  # not exist_ok: a directory planted meanwhile is checked below
        except FileExistsError:
            pass
        st = path.lstat()
    owner = st.st_uid
    how = (
        "set SHMREPLAY_RUNTIME_DIR to a directory of this user that only it can write to"
        if explicit
        else f"remove it (after checking what it holds: rm -r {path}) so that it is created "
        "again, or set SHMREPLAY_RUNTIME_DIR to a directory of this user that only it can "
        "write to"
    )
    problem = None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        problem = f"it is {kind}"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = (
            f"others can write to it (mode {stat.S_IMODE(st.st_mode):04o}): they could plant a "
            "record pointing at their own socket"
        )
        how = f"chmod go-w {path}, or {how}"
    elif owner not in (me, 0) and (daemon or not explicit):
        problem = (
            f"it belongs to {_user(owner)}, not to this user ({_user(me)}): its owner could "
            "plant records and sockets there (a daemon of theirs posing as ours)"
        )
    elif daemon and owner != me:
        problem = (
            f"it belongs to {_user(owner)}: a daemon writes its record and socket only into "
            f"a directory of its own user ({_user(me)})"
        )
    if problem is not None:
        raise PermissionDenied(f"unsafe shmreplay runtime directory {path}: {problem}; {how}")
    return path


def trusted_uids() -> set[int]:
    """Users whose daemons this process may trust: itself, root, and the owner of the runtime
    directory (accepted by :func:`runtime_dir`, e.g. a systemd daemon's /run/shmreplay)."""
    return {os.geteuid(), 0, runtime_dir().stat().st_uid}


def segment_name(instance: str, table: str) -> str:
    return f"/{PREFIX}{instance}.{table}"


def event_name(instance: str, table: str | None, kind: str) -> str:
    if table is None:
        return f"/{PREFIX}{instance}.{kind}"
    return f"/{PREFIX}{instance}.{table}.{kind}"


def record_path(instance: str) -> Path:
    return runtime_dir() / f"{instance}.json"


def socket_path(instance: str) -> Path:
    return runtime_dir() / f"{instance}.sock"


def lock_path(instance: str) -> Path:
    return runtime_dir() / f"{instance}.lock"


@dataclass(frozen=True)
class InstanceRecord:
    """What a running daemon tells its clients: who it is and where to reach it.

    ``uid`` is the daemon's user: on :meth:`read`, the owner of the record file, which must be
    a user this process trusts (:func:`trusted_uids`); the socket's peer and every segment and
    semaphore a client uses must belong to it too."""

    name: str
    pid: int
    start_time: float  # the daemon process's create time, to tell a reused pid apart
    socket: str
    tables: list[str]
    format_version: int
    uid: int = field(default_factory=os.geteuid)

    def write(self, gid: int | None = None) -> None:
        """Write the record atomically; readable by group ``gid`` too when given.

        Never follows a symlink: the temporary file is created anew (O_EXCL, O_NOFOLLOW) and its
        mode and group set on the descriptor, then renamed over the record."""
        directory = runtime_dir(daemon=True)
        path = directory / f"{self.name}.json"
        tmp = directory / f"{self.name}.json.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # a crash's leftover (unlinking a symlink removes only the link)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            os.fchmod(fd, 0o600 if gid is None else 0o640)
            if gid is not None:
                os.fchown(fd, -1, gid)
            with os.fdopen(fd, "w", closefd=False) as f:
                f.write(json.dumps(asdict(self)))
        finally:
            os.close(fd)
        os.replace(tmp, path)  # atomic: a reader sees the old record or the new one

    @classmethod
    def read(cls, instance: str) -> InstanceRecord | None:
        """The record of ``instance``, or None if there is none (or it is torn or stale in
        format). Raises PermissionDenied if it is a symlink or not a regular file, or belongs
        to a user this process does not trust (see :func:`trusted_uids`)."""
        path = record_path(instance)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise planted(path, "the instance record", "it is a symbolic link") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise planted(path, "the instance record", "it is not a regular file")
            if st.st_uid not in trusted_uids():
                raise planted(
                    path,
                    "the instance record",
                    f"it belongs to {_user(st.st_uid)}, neither this user, root nor the "
                    "runtime directory's owner",
                )
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(1 << 20)
        finally:
            os.close(fd)
        try:
            d = json.loads(data)
            d["uid"] = st.st_uid  # who wrote it, whatever it says
            return cls(**d)
        except (ValueError, TypeError):
            return None

    def alive(self) -> bool:
        return process_alive(self.pid, self.start_time)


def start_stamp(create_time: float) -> int:
    """A process create time as stored in a segment's Ctrl.DAEMON_START (ms since the epoch)."""
    return round(create_time * 1000)


def recorded_daemon(seg: Segment) -> tuple[int, float | None]:
    """The daemon pid and start time a table segment records (start None if not recorded)."""
    ctrl = seg.arrays["ctrl"][:, 0]
    start = int(ctrl[Ctrl.DAEMON_START])
    return int(ctrl[Ctrl.DAEMON_PID]), (start / 1000 if start > 0 else None)


def recorded_daemon_alive(seg: Segment) -> int | None:
    """The pid of the live daemon the segment records, or None (dead, or none recorded)."""
    pid, start = recorded_daemon(seg)
    if pid > 0 and process_alive(pid, start):
        return pid
    return None


def peer_of(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket (SO_PEERCRED); pid 0
    if that process lives in a PID namespace this one cannot see."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def other_namespace(pid: int) -> str:
    """Why a client cannot use a daemon (record pid ``pid``) its socket shows is alive in a PID
    namespace invisible from here, and what to do."""
    return (
        f"the daemon (pid {pid} in its own PID namespace) is running but not visible from this "
        "process's PID namespace: shmreplay clients must run in the daemon's PID namespace (it "
        "checks that writers and the daemon are alive by pid) and share its /dev/shm, e.g. "
        "docker run --pid=host --ipc=host, or --pid=container:<daemon's container>"
    )


def check_peer(sock: socket.socket, record: InstanceRecord) -> None:
    """Raise unless the control socket's peer is the daemon ``record`` names (pid and uid)."""
    pid, uid, _ = peer_of(sock)
    if pid == 0:
        raise DaemonNotRunning(other_namespace(record.pid))
    if pid != record.pid or uid != record.uid:
        raise planted(
            record.socket,
            "the daemon's control socket",
            f"it is served by pid {pid} ({_user(uid)}), not by the daemon its record names "
            f"(pid {record.pid}, {_user(record.uid)})",
        )


def pid_namespace_hint(record: InstanceRecord) -> str | None:
    """If ``record`` names a daemon whose pid is not visible here but whose socket answers
    from a PID namespace this process cannot see, the message saying so; else None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(record.socket)
            pid, _, _ = peer_of(sock)
    except OSError:
        return None
    return other_namespace(record.pid) if pid == 0 else None


def process_alive(pid: int, start_time: float | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, if given, started at ``start_time``.

    A process out of file descriptors cannot read /proc: it checks with ``kill(pid, 0)`` alone
    (a reused pid then passes for the old process until descriptors free up)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return start_time is None or abs(proc.create_time() - start_time) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    except OSError as exc:
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            raise
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def shm_objects(instance: str | None = None) -> list[str]:
    """Names of /dev/shm entries (segments and semaphores) of ``instance`` (or of all).

    For one instance, only names it can make: ``<stem><table>``, ``sem.<stem>daemon`` and
    ``sem.<stem><table>.sample|insert``. Names have no '.', so what an older version let an
    instance "exp.v2" make (``shmreplay.exp.v2.replay``) is not taken for instance "exp"'s."""
    stem = PREFIX if instance is None else f"{PREFIX}{instance}."
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    if instance is None:
        return sorted(e for e in entries if e.startswith(stem) or e.startswith("sem." + stem))
    found = []
    for e in entries:
        if e.startswith(stem):
            parts = e[len(stem) :].split(".")
            ok = len(parts) == 1
        elif e.startswith("sem." + stem):
            parts = e[len("sem." + stem) :].split(".")
            ok = parts == ["daemon"] or (len(parts) == 2 and parts[1] in TABLE_EVENTS)
        else:
            continue
        if ok and all(parts):
            found.append(e)
    return sorted(found)


def remove_shm_objects(instance: str) -> list[str]:
    """Unlink every /dev/shm entry of ``instance``; returns what was removed."""
    removed = []
    for entry in shm_objects(instance):
        try:
            os.unlink(os.path.join(SHM_DIR, entry))
            removed.append(entry)
        except FileNotFoundError:
            pass
    return removed


# A segment or semaphore younger than this, with no live daemon recorded, may be one a daemon
# is creating right now (semaphores come before the segments, a segment's header and pid a
# moment after it): gc leaves it alone. A start takes well under a second.
STARTING_GRACE_S = 30.0


@dataclass
class Leftovers:
    """What ``shmreplay gc`` found of one instance. ``live_pid``: a live daemon (recorded in a
    segment, or holding the lock in this runtime directory) serves it, and nothing is removed;
    ``removable``: paths (in /dev/shm and the runtime directory) of dead daemons of this user;
    ``kept``: what is left alone, and why. :meth:`close` releases the instance lock, held
    (when the lock file exists) from :func:`find_leftovers` on so that no daemon of this
    runtime directory starts meanwhile."""

    instance: str
    live_pid: int | None = None
    removable: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    lock_fd: int | None = None

    def close(self) -> None:
        fd, self.lock_fd = self.lock_fd, None
        if fd is not None:
            os.close(fd)


def find_leftovers(instance: str) -> Leftovers:
    """Inspect ``instance``'s objects for ``gc``: liveness from the objects themselves (the
    daemon pid and start time each segment records), so a daemon that uses another runtime
    directory is seen as alive; only objects of this user are ever removable."""
    found = Leftovers(instance)
    me = os.geteuid()
    rt = runtime_dir()
    lock = lock_path(instance)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)  # never creates one
    except OSError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            found.lock_fd = fd
        except BlockingIOError:
            os.close(fd)
            rec = InstanceRecord.read(instance)
            found.live_pid = rec.pid if rec is not None else -1
    now = time.time()
    shm: list[str] = []
    young: list[str] = []
    dead_recorded = False  # a segment names its daemon, and that daemon is dead
    for entry in shm_objects(instance):
        path = os.path.join(SHM_DIR, entry)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if st.st_uid != me or not stat.S_ISREG(st.st_mode):
            found.kept.append(f"{path}: belongs to {_user(st.st_uid)}, not to this user")
            continue
        recent = now - max(st.st_mtime, st.st_ctime) < STARTING_GRACE_S
        if not entry.startswith("sem."):
            pid, start = _segment_daemon(entry, me) or (0, None)
            if pid > 0:
                if process_alive(pid, start):
                    found.live_pid = pid
                    continue
                dead_recorded, recent = True, False
        (young if recent else shm).append(path)
    if found.live_pid is not None:
        return found
    if dead_recorded:  # the dead daemon's: semaphores it made at its start are as dead
        shm, young = shm + young, []
    for path in young:
        found.kept.append(
            f"{path}: made less than {STARTING_GRACE_S:.0f} s ago (a daemon may be starting)"
        )
    found.removable.extend(sorted(shm))
    lock_free = found.lock_fd is not None or not os.path.lexists(lock)
    if rt.stat().st_uid == me and lock_free:
        rec_path = record_path(instance)
        try:
            rec = InstanceRecord.read(instance)
        except PermissionDenied:
            rec = None
        if rec is None or not rec.alive():
            for p in (rec_path, rec_path.with_suffix(".json.tmp"), socket_path(instance)):
                if os.path.lexists(p):
                    found.removable.append(str(p))
            if found.lock_fd is not None and not young:
                found.removable.append(str(lock))  # last: removed while we hold it
    return found


def _segment_daemon(entry: str, owner: int) -> tuple[int, float | None] | None:
    """The daemon pid (0: none yet) and start time a segment records; None if not a table."""
    try:
        seg = Segment.attach("/" + entry, owner=owner)
    except (SegmentError, DaemonNotRunning, PermissionDenied):
        return None
    try:
        return recorded_daemon(seg)
    finally:
        seg.close()


def instances_in_sight() -> list[str]:
    """Instance names that have objects in /dev/shm or files in the runtime directory."""
    from ..config import check_instance_name

    names = {e.removeprefix("sem.")[len(PREFIX) :].split(".")[0] for e in shm_objects()}
    with contextlib.suppress(OSError):
        for entry in os.listdir(runtime_dir()):
            for suffix in (".lock", ".json", ".sock", ".json.tmp"):
                if entry.endswith(suffix):
                    names.add(entry[: -len(suffix)])
    valid = []
    for name in sorted(names):
        with contextlib.suppress(ValueError):
            valid.append(check_instance_name(name))
    return valid
