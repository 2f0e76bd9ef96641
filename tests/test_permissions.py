"""Who may touch an instance: its user (and root) by default, plus the members of
``[server] group`` when it is set. Another user can neither attach nor read checkpoints, and is
told why with a PermissionDenied naming the object, its owner and ``[server] group``.

Tests that act as another user fork a child that drops to that uid; they need root and are
skipped otherwise. Users and groups they create are deleted afterwards, also on failure.
"""

from __future__ import annotations

import contextlib
import grp
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import shmreplay
from shmreplay.engine.instance import InstanceRecord, event_name, segment_name
from shmreplay.testing import (
    STAMPED_SIGNATURE,
    as_user,
    stamped_batch,
    table_toml,
    verify_stamped,
)

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def tables(checkpoint_dir: Path, group: str | None = None) -> str:
    server = f'[server]\ncheckpoint_dir = "{checkpoint_dir}"\n'
    if group is not None:
        server += f'group = "{group}"\n'
    return server + table_toml(signature=STAMPED_SIGNATURE)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def checkpoint_entries(top: Path) -> list[Path]:
    """Every checkpoint directory and file under ``top`` (the writers' lock file aside)."""
    found = []
    for d in top.iterdir():
        if d.name.startswith("checkpoint-"):
            found.append(d)
            found.extend(d.iterdir())
    assert found, f"no checkpoint in {top}"
    return found


def assert_denied(result: tuple, *words: str) -> str:
    """The child got a PermissionDenied (a ShmReplayError and a PermissionError, not a bare
    OSError or a posix_ipc error) whose message holds ``words``."""
    assert result[0] == "error", result
    classes, message = result[1], result[2]
    assert classes[0] == "PermissionDenied", result
    assert "ShmReplayError" in classes and "PermissionError" in classes
    for w in words:
        assert w in message, (w, message)
    return message


@contextlib.contextmanager
def chmod_for_test(path: Path | str, new: int) -> Iterator[None]:
    old = stat.S_IMODE(os.stat(path).st_mode)
    os.chmod(path, new)
    try:
        yield
    finally:
        os.chmod(path, old)


@pytest.fixture
def open_parent() -> Iterator[Path]:
    """A directory others may pass through (0711), to hold checkpoint directories whose own
    modes are under test (pytest's tmp_path lies in a 0700 directory)."""
    with tempfile.TemporaryDirectory(prefix="shmreplay-perm-") as d:
        os.chmod(d, 0o711)
        yield Path(d)


@pytest.fixture
def unix_group() -> Iterator[tuple[str, int]]:
    """A Unix group made for the test (root only), deleted afterwards."""
    name = f"shmrg{os.getpid() % 100000}"
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    try:
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def group_member(unix_group) -> Iterator[tuple[str, str]]:
    """A user made for the test with ``unix_group`` as a supplementary group (not its primary
    one), deleted afterwards. Yields (user, group)."""
    group = unix_group[0]
    user = f"shmru{os.getpid() % 100000}"
    subprocess.run(
        ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-G", group, user],
        check=True,
        capture_output=True,
    )
    try:
        yield user, group
    finally:
        subprocess.run(["userdel", user], capture_output=True)


# -- modes -----------------------------------------------------------------------------------------


def test_checkpoints_are_private_to_the_daemons_user_by_default(daemon_factory, tmp_path):
    top = tmp_path / "ckpt"  # the daemon creates it
    d = daemon_factory(tables(top))
    with shmreplay.attach(d.name) as client:
        client.table("replay").insert_batch(stamped_batch(np.arange(10)))
        client.table("replay").flush()
        client.checkpoint()
    assert mode(top) == 0o700
    for p in checkpoint_entries(top):
        assert mode(p) == (0o700 if p.is_dir() else 0o600), p


@needs_root
def test_checkpoints_segments_and_semaphores_honour_server_group(
    daemon_factory, open_parent, unix_group
):
    """With [server] group: checkpoint directories 0750 and files 0640 owned by that group,
    like the segments and semaphores (0660)."""
    group, gid = unix_group
    top = open_parent / "ckpt"
    old_umask = os.umask(0o077)  # the modes must not depend on the daemon's umask
    try:
        d = daemon_factory(tables(top, group))
    finally:
        os.umask(old_umask)
    with shmreplay.attach(d.name) as client:
        client.table("replay").insert_batch(stamped_batch(np.arange(10)))
        client.table("replay").flush()
        client.checkpoint()
    assert (mode(top), top.stat().st_gid) == (0o750, gid)
    for p in checkpoint_entries(top):
        assert (mode(p), p.stat().st_gid) == ((0o750 if p.is_dir() else 0o640), gid), p
    shm = [Path("/dev/shm" + segment_name(d.name, "replay"))]
    shm.append(Path("/dev/shm/sem." + event_name(d.name, "replay", "sample")[1:]))
    for p in shm:
        assert (mode(p), p.stat().st_gid) == (0o660, gid), p


# -- another user ------------------------------------------------------------------------------


@needs_root
def test_another_user_can_neither_attach_nor_read_checkpoints(daemon_factory, open_parent):
    """As uid 65534: attach fails with PermissionDenied at the first object it cannot open —
    the runtime directory (0700), and, were its mode wrong, the control socket (0600), a
    segment (0600), a semaphore (0600) — each naming the object, its owner and [server] group.
    Checkpoints cannot be listed (0700) nor, were their directories opened, read (0600)."""
    from shmreplay.client.client import _open_event
    from shmreplay.engine.shm import Segment

    top = open_parent / "ckpt"
    d = daemon_factory(tables(top))
    with shmreplay.attach(d.name) as client:
        client.table("replay").insert_batch(stamped_batch(np.arange(10)))
        client.table("replay").flush()
        ckpt = Path(client.checkpoint()["path"])
    rec = InstanceRecord.read(d.name)
    rundir = os.path.dirname(rec.socket)

    def attach() -> None:
        shmreplay.attach(d.name, timeout=1).close()

    assert_denied(as_user(NOBODY, attach), "record", d.name, "[server]", "uid 65534")
    with chmod_for_test(rundir, 0o711), chmod_for_test(rundir + f"/{d.name}.json", 0o644):
        assert_denied(as_user(NOBODY, attach), rec.socket, "uid 0 (root)", "mode 0600", "[server]")
    seg = segment_name(d.name, "replay")
    msg = assert_denied(
        as_user(NOBODY, lambda: Segment.attach(seg)), f"/dev/shm{seg}", "mode 0600", "[server]"
    )
    assert "group =" in msg  # says how to set it
    sem = event_name(d.name, "replay", "sample")
    assert_denied(as_user(NOBODY, lambda: _open_event(sem)), f"/dev/shm/sem.{sem[1:]}")

    def read(path: Path) -> object:
        try:
            if path.is_dir():
                return sorted(os.listdir(path))
            return len(path.read_bytes())
        except PermissionError as exc:
            return f"denied: {exc.errno}"

    manifest, data = ckpt / "manifest.json", ckpt / "replay.data.obs.npy"
    for path in (top, ckpt, manifest, data):
        assert as_user(NOBODY, lambda p=path: read(p)) == ("ok", "denied: 13"), path
    with chmod_for_test(top, 0o711), chmod_for_test(ckpt, 0o711):  # were the dirs opened
        for path in (manifest, data):
            assert as_user(NOBODY, lambda p=path: read(p)) == ("ok", "denied: 13"), path
    assert mode(manifest) == mode(data) == 0o600


@needs_root
def test_a_member_of_server_group_can_attach_sample_and_read_checkpoints(
    daemon_factory, open_parent, group_member
):
    """A user whose supplementary groups include [server] group attaches, inserts, samples
    (rows verified) and reads checkpoints; a user outside the group is still refused, and told
    which group to join."""
    from shmreplay.engine.shm import Segment

    user, group = group_member
    top = open_parent / "ckpt"
    d = daemon_factory(tables(top, group))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert_batch(stamped_batch(np.arange(100)))
        t.flush()
        ckpt = Path(client.checkpoint()["path"])
        t.sample(64, timeout=10)  # imports what the child will need (see shmreplay.testing.as_user)
        t.info()
    rundir = os.path.dirname(InstanceRecord.read(d.name).socket)

    def work() -> dict:
        with shmreplay.attach(d.name, timeout=5) as c:
            t = c.table("replay")
            t.insert_batch(stamped_batch(np.arange(100, 110)))
            t.flush(timeout=10)
            s = t.sample(64, timeout=10)
            manifest = (ckpt / "manifest.json").read_bytes()
            return {
                "verified": bool(verify_stamped(s.data).all()),
                "size": t.info().current_size,
                "manifest": len(manifest),
                "listing": sorted(os.listdir(ckpt)),
            }

    # A runtime directory the group can enter (systemd: RuntimeDirectoryMode=0750 and Group=).
    with chmod_for_test(rundir, 0o711):
        result = as_user(user, work)
        assert result[0] == "ok", result
        got = result[1]
        assert got["verified"] and got["size"] == 110 and got["manifest"] > 0
        assert "manifest.json" in got["listing"]
        seg = segment_name(d.name, "replay")
        assert_denied(
            as_user(NOBODY, lambda: Segment.attach(seg)), f"group '{group}'", "usermod -aG"
        )
    assert "refused a control connection" not in d.log()
