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

import json
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

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
    """True if ``pid`` runs (not a zombie) and, if given, started at ``start_time``."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return start_time is None or abs(proc.create_time() - start_time) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


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
