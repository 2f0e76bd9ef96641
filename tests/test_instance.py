"""Where clients find a daemon: the runtime directory's ownership rules."""

from __future__ import annotations

import os

import pytest

from shmreplay.instance import runtime_dir

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
