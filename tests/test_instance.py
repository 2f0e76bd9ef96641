"""Where clients find a daemon: the runtime directory's ownership rules."""

from __future__ import annotations

import os

import pytest

from shmreplay.engine.instance import runtime_dir
from shmreplay.errors import PermissionDenied

NOBODY = 65534


@pytest.fixture
def env_dir(tmp_path, monkeypatch):
    d = tmp_path / "rt"
    monkeypatch.setenv("SHMREPLAY_RUNTIME_DIR", str(d))
    return d


def test_a_missing_directory_is_created_private(env_dir):
    assert runtime_dir() == env_dir
    assert env_dir.stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_another_users_directory_is_accepted_only_if_nobody_else_can_write(env_dir):
    env_dir.mkdir(mode=0o750)
    os.chown(env_dir, NOBODY, -1)
    assert runtime_dir() == env_dir  # e.g. the daemon's /run/shmreplay, read by its group
    os.chmod(env_dir, 0o770)
    with pytest.raises(PermissionError, match="SHMREPLAY_RUNTIME_DIR"):
        runtime_dir()


def test_a_file_in_its_place_is_refused(env_dir):
    env_dir.write_text("not a directory")
    with pytest.raises(PermissionError):
        runtime_dir()


def test_a_directory_others_can_write_to_is_refused_even_if_mine(env_dir):
    env_dir.mkdir(mode=0o700)
    os.chmod(env_dir, 0o777)
    with pytest.raises(PermissionDenied, match=f"chmod go-w {env_dir}"):
        runtime_dir()


def test_a_symlink_in_its_place_is_refused(env_dir, tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    env_dir.symlink_to(real)
    with pytest.raises(PermissionDenied, match="symbolic link"):
        runtime_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_a_default_directory_of_another_user_is_refused(tmp_path, monkeypatch):
    """$XDG_RUNTIME_DIR/shmreplay (as /tmp/shmreplay-<uid>) made by someone else first is
    refused, even closed to others: its owner could plant records and sockets there."""
    monkeypatch.delenv("SHMREPLAY_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    d = tmp_path / "shmreplay"
    d.mkdir(mode=0o755)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(PermissionDenied, match="belongs to uid 65534.*rm -r"):
        runtime_dir()
    os.chown(d, 0, 0)
    assert runtime_dir() == d


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_a_daemon_writes_only_into_a_directory_of_its_own_user(env_dir):
    env_dir.mkdir(mode=0o750)
    os.chown(env_dir, NOBODY, -1)
    assert runtime_dir() == env_dir  # a client of the group may read it
    with pytest.raises(PermissionDenied, match="belongs to uid 65534"):
        runtime_dir(daemon=True)
