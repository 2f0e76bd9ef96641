"""Checkpoints through the daemon: on demand, periodic, at SIGTERM; restore at start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import shmreplay
from shmreplay.engine.instance import remove_shm_objects
from shmreplay.testing import STAMPED_SIGNATURE, stamped_row, table_toml, verify_stamped


def tables(ckpt_dir, extra: str = "") -> str:
    return (
        f'[server]\ncheckpoint_dir = "{ckpt_dir}"\ncheckpoint_keep = 2\n{extra}\n'
        + table_toml(
            "replay",
            max_size=200,
            sampler='{ kind = "prioritized", priority_exponent = 0.5 }',
            signature=STAMPED_SIGNATURE,
        )
        + table_toml("fifo", max_size=50, sampler='{ kind = "fifo" }', signature=STAMPED_SIGNATURE)
    )


def fill(client) -> dict:
    t, f = client.table("replay"), client.table("fifo")
    keys = {}
    for u in range(150):
        keys[u] = t.insert(stamped_row(u), priority=1.0 + u % 7, episode=(1 + u // 50, u, u))
        f.insert(stamped_row(1000 + u))  # 150 into 50: the 100 oldest are evicted
    t.flush()
    f.flush()
    s = t.sample(40, timeout=5)  # times_sampled and counters to restore
    t.update_priorities(s.info.key[:5], [9.0] * 5)
    return keys


def snapshot(client) -> dict:
    t, f = client.table("replay"), client.table("fifo")
    ti, fi = t.info(), f.info()
    s = f.sample(1, timeout=5)
    return {
        "sizes": (ti.current_size, fi.current_size),
        "limiters": (ti.rate_limiter.inserts, ti.rate_limiter.samples, fi.rate_limiter.deletes),
        "priorities": (ti.max_priority, ti.min_priority),
        "unique": ti.num_unique_samples,
        "episodes": (ti.num_episodes, ti.num_deleted_episodes),
        "fifo_oldest": s.data["uid"].tolist(),
    }


def test_checkpoint_kill_restart_restores_everything(daemon_factory, tmp_path):
    d = daemon_factory(tables(tmp_path))
    with shmreplay.attach(d.name) as client:
        keys = fill(client)
        before = snapshot(client)
        report = client.checkpoint()
        probs_before = client.table("replay").sample(2000, timeout=5)
    assert os.path.isdir(report["path"]) and report["items"] == {"replay": 150, "fifo": 50}
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    remove_shm_objects(d.name)  # nothing to adopt: the checkpoint is all there is
    d2 = daemon_factory(tables(tmp_path), name=d.name)
    assert "restored 150 items" in d2.log()
    with shmreplay.attach(d.name) as client:
        after = snapshot(client)
        t = client.table("replay")
        s = t.sample(2000, timeout=5)
        assert verify_stamped(s.data).all()
        # Same keys for the same rows, and the same probabilities: the same distribution.
        for uid, key in zip(s.data["uid"].tolist(), s.info.key.tolist(), strict=True):
            assert keys[uid] == key
        by_key_before = dict(
            zip(probs_before.info.key.tolist(), probs_before.info.probability, strict=True)
        )
        for key, p in zip(s.info.key.tolist(), s.info.probability, strict=True):
            if key in by_key_before:
                np.testing.assert_allclose(p, by_key_before[key], rtol=1e-12)
        assert t.insert(stamped_row(5000)) not in keys.values()  # no key comes back
    assert after["sizes"] == before["sizes"]
    assert after["priorities"] == before["priorities"]
    assert after["fifo_oldest"] == before["fifo_oldest"] == [1100]
    # The limiter's counters are the checkpoint's (the 2000 samples drawn after it are gone).
    assert after["limiters"] == before["limiters"]
    assert after["unique"] == before["unique"]
    assert after["episodes"] == before["episodes"] == (3, 0)


def test_sigterm_writes_a_final_checkpoint_and_the_next_start_restores_it(daemon_factory, tmp_path):
    d = daemon_factory(tables(tmp_path))
    with shmreplay.attach(d.name) as client:
        fill(client)
        before = snapshot(client)
    assert d.stop() == 0
    assert "checkpoint" in d.log() and "written" in d.log()
    d2 = daemon_factory(tables(tmp_path), name=d.name)
    with shmreplay.attach(d.name) as client:
        after = snapshot(client)
    assert after["sizes"] == before["sizes"] and after["fifo_oldest"] == before["fifo_oldest"]
    assert d2.stop() == 0


def test_periodic_checkpoints_keep_the_newest_and_the_cli_writes_one(daemon_factory, tmp_path):
    d = daemon_factory(tables(tmp_path, "checkpoint_interval_s = 0.3"))
    with shmreplay.attach(d.name) as client:
        fill(client)
    r = subprocess.run(
        [sys.executable, "-m", "shmreplay", "checkpoint", "--name", d.name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "checkpoint" in r.stdout and "longest table lock hold" in r.stdout
    import time

    time.sleep(1.0)
    assert d.stop() == 0  # no checkpoint in flight while we count (old ones go after a new one)
    done = [p for p in os.listdir(tmp_path) if p.startswith("checkpoint-")]
    assert len(done) == 2  # checkpoint_keep = 2
    assert d.log().count("written") >= 3


def test_checkpoint_without_a_directory_says_how_to_set_one(daemon_factory):
    d = daemon_factory(table_toml())
    with shmreplay.attach(d.name) as client:
        try:
            client.checkpoint()
        except shmreplay.ConfigError as exc:
            assert "checkpoint_dir" in str(exc)
        else:
            raise AssertionError("a checkpoint without checkpoint_dir must be refused")


def _mount_small_tmpfs(path, size: str) -> bool:
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


def test_a_full_disk_leaves_the_previous_checkpoint_intact_and_the_daemon_running(
    daemon_factory, tmp_path
):
    """checkpoint_dir on a 1 MiB tmpfs: the first checkpoint fits, a second one after more
    inserts does not. The daemon says so, keeps serving, and the first still restores."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_small_tmpfs(disk, "1m"):
        pytest.skip("needs root and tmpfs mounts to make a small full disk")
    try:
        toml = f'[server]\ncheckpoint_dir = "{disk}"\n' + table_toml(
            max_size=20_000, sampler='{ kind = "fifo" }', signature=STAMPED_SIGNATURE
        )
        d = daemon_factory(toml)
        with shmreplay.attach(d.name) as client:
            t = client.table("replay")
            for u in range(2000):  # ~170 kB of items
                t.insert(stamped_row(u))
            t.flush()
            first = client.checkpoint()
            for u in range(2000, 20_000):  # ~1.5 MB: no longer fits
                t.insert(stamped_row(u))
            t.flush()
            with pytest.raises(shmreplay.CheckpointError):
                client.checkpoint()
            t.insert(stamped_row(99_999))  # still serving
            t.flush()
            assert t.info().current_size == 20_001 - 1  # max_size 20_000: the oldest evicted
        assert [p for p in os.listdir(disk) if p.startswith("checkpoint-")] == [
            os.path.basename(first["path"])
        ]
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        remove_shm_objects(d.name)
        daemon_factory(toml, name=d.name)
        with shmreplay.attach(d.name) as client:
            assert client.table("replay").info().current_size == 2000
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
