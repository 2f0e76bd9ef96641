"""Where an instance's objects live and how to find them.

Every object an instance creates carries its name, so ``gc`` and monitoring can find them:

- table segments ``/dev/shm/shmreplay.<instance>.<table>``;
- semaphores ``/dev/shm/sem.shmreplay.<instance>.<table>.<event>`` and
  ``/dev/shm/sem.shmreplay.<instance>.daemon``;
- in the runtime directory (``$SHMREPLAY_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/shmreplay``, else
  ``/tmp/shmreplay-<uid>``; mode 0700): ``<instance>.json`` (the record ``attach`` reads),
  ``<instance>.sock`` (the control socket) and ``<instance>.lock`` (held by the live daemon).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from .errors import PermissionDenied, TooManyOpenFiles
from .shm import SHM_DIR

PREFIX = "shmreplay."


def runtime_dir() -> Path:
    """The directory holding instance records, sockets and locks (created 0700 if missing).

    A directory of another user (a daemon's ``/run/shmreplay`` under systemd, read by clients
    of its group) is accepted as long as nobody else can write to it: whoever can write there
    could plant a record pointing at their own socket."""
    env = os.environ.get("SHMREPLAY_RUNTIME_DIR")
    if env:
        path = Path(env)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "shmreplay"
    else:
        path = Path(f"/tmp/shmreplay-{os.getuid()}")
    try:
        st = path.lstat()
    except FileNotFoundError:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    mine = st.st_uid == os.getuid()
    if not stat.S_ISDIR(st.st_mode) or (not mine and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise PermissionError(
            f"{path} is not a directory owned by uid {os.getuid()} (or another user's that "
            "only its owner can write to); set SHMREPLAY_RUNTIME_DIR to a private directory"
        )
    return path


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
    """What a running daemon tells its clients: who it is and where to reach it."""

    name: str
    pid: int
    start_time: float  # the daemon process's create time, to tell a reused pid apart
    socket: str
    tables: list[str]
    format_version: int

    def write(self, gid: int | None = None) -> None:
        """Write the record atomically; readable by group ``gid`` too when given."""
        path = record_path(self.name)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.chmod(tmp, 0o600 if gid is None else 0o640)
        if gid is not None:
            os.chown(tmp, -1, gid)
        tmp.replace(path)  # atomic: a reader sees the old record or the new one

    @classmethod
    def read(cls, instance: str) -> InstanceRecord | None:
        try:
            return cls(**json.loads(record_path(instance).read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def alive(self) -> bool:
        return process_alive(self.pid, self.start_time)


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


def _user(uid: int) -> str:
    import pwd

    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def access_denied(path: str | os.PathLike, what: str) -> PermissionDenied:
    """The error for an instance object ``path`` (``what`` it is) this process may not open:
    who owns it, its mode, who we are, and how to get access."""
    me = f"{_user(os.geteuid())}, groups {sorted({os.getegid(), *os.getgroups()})}"
    try:
        st = os.stat(path)
    except OSError:  # not even visible: a directory on the way is closed to us
        return PermissionDenied(
            f"cannot open {path} ({what}) as {me}: a directory on its path is closed to this "
            'user. Run as the daemon\'s user, or set group = "<group>" in [server] of the '
            "daemon's tables.toml (and SHMREPLAY_RUNTIME_DIR to a directory that group can "
            "enter), restart the daemon and add this user to that group"
        )
    owner = f"{_user(st.st_uid)}, group {_group(st.st_gid)}, mode {stat.S_IMODE(st.st_mode):04o}"
    if st.st_mode & stat.S_IRWXG:
        how = (
            f"it is open to group {_group(st.st_gid)!r}: add this user to it "
            f"(usermod -aG {_group(st.st_gid)} <user>) and log in again"
        )
    else:
        how = (
            "the daemon keeps its tables private to its user: run as that user, or set "
            'group = "<group>" in [server] of the daemon\'s tables.toml, restart the daemon '
            "and add this user to that group"
        )
    return PermissionDenied(
        f"cannot open {path} ({what}): it belongs to {owner}; this process runs as {me}; {how}"
    )


def is_out_of_descriptors(exc: BaseException) -> bool:
    """True for the error of a call that found no free file descriptor (posix_ipc raises a
    bare OSError whose message says so, without an errno)."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in (errno.EMFILE, errno.ENFILE) or "number of files" in str(exc)


def out_of_descriptors(what: str) -> TooManyOpenFiles:
    """The error for running out of file descriptors while doing ``what``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = f"{len(os.listdir('/proc/self/fd'))} open"
    except OSError:
        used = "all in use"
    return TooManyOpenFiles(
        errno.EMFILE,
        f"{what}: this process has no file descriptor left ({used}, limit {soft}, hard limit "
        f"{hard}); close unused clients and files, or raise the limit (ulimit -n, "
        "resource.setrlimit(RLIMIT_NOFILE, ...), LimitNOFILE= in a systemd unit)",
    )


def shm_objects(instance: str | None = None) -> list[str]:
    """Names of /dev/shm entries (segments and semaphores) of ``instance`` (or of all)."""
    stem = PREFIX if instance is None else f"{PREFIX}{instance}."
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if e.startswith(stem) or e.startswith("sem." + stem))


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
