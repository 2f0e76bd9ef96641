"""Bad input gets a clear error of the ShmReplayError tree, and nothing reaches the table."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

import shmreplay
from shmreplay.testing import table_toml

GOOD = {"obs": np.zeros(8, np.float32), "action": 1, "reward": 0.5, "done": False}


@pytest.fixture
def replay(daemon_factory):
    d = daemon_factory(table_toml(max_size=100))
    client = shmreplay.attach(d.name)
    yield client.table("replay")
    client.close()


BAD_ROWS = [
    ("unknown field", {**GOOD, "typo": 1}, shmreplay.SignatureError, "typo"),
    (
        "missing field",
        {k: v for k, v in GOOD.items() if k != "reward"},
        shmreplay.SignatureError,
        "reward",
    ),
    ("wrong shape", {**GOOD, "obs": np.zeros(7, np.float32)}, shmreplay.SignatureError, r"\(8,\)"),
    ("lossy dtype", {**GOOD, "obs": np.zeros(8, np.float64)}, shmreplay.SignatureError, "float32"),
    ("float into int", {**GOOD, "action": 1.5}, shmreplay.SignatureError, "action"),
    ("int out of range", {**GOOD, "action": 2**70}, shmreplay.SignatureError, "action"),
    ("string", {**GOOD, "reward": "high"}, shmreplay.SignatureError, "reward"),
    ("not a mapping", [1, 2, 3], shmreplay.SignatureError, "mapping"),
]


@pytest.mark.parametrize("case,row,exc,match", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_rows_are_refused_and_nothing_is_written(replay, case, row, exc, match):
    with pytest.raises(exc, match=match):
        replay.insert(row)
    assert isinstance(exc("x"), shmreplay.ShmReplayError) and issubclass(exc, ValueError)
    replay.flush()
    assert replay.info().total_inserted == 0


def test_lossless_casts_are_accepted(replay):
    replay.insert({**GOOD, "obs": np.zeros(8, np.float16), "action": np.int32(3)})
    replay.insert({**GOOD, "obs": [0.0] * 8, "action": 3, "done": 1 == 1})
    replay.flush()
    assert replay.info().current_size == 2


@pytest.mark.parametrize("priority", [float("nan"), -1.0, float("inf"), "high"])
def test_bad_priorities_are_refused(replay, priority):
    with pytest.raises(shmreplay.InvalidArgumentError, match="priorit"):
        replay.insert(GOOD, priority=priority)
    with pytest.raises(shmreplay.InvalidArgumentError):
        replay.update_priorities([1], [priority] if not isinstance(priority, str) else [-5.0])
    replay.flush()
    assert replay.info().total_inserted == 0


def test_bad_batches_are_refused_whole(replay):
    n = 4
    batch = {
        "obs": np.zeros((n, 8), np.float32),
        "action": np.arange(n),
        "reward": np.zeros(n, np.float32),
        "done": np.zeros(n, bool),
    }
    with pytest.raises(shmreplay.SignatureError, match="batch shape"):
        replay.insert_batch({**batch, "action": np.arange(n + 1)})
    with pytest.raises(shmreplay.InvalidArgumentError):
        replay.insert_batch(batch, priorities=[1.0, 1.0, float("nan"), 1.0])
    with pytest.raises(shmreplay.InvalidArgumentError, match="shape"):
        replay.insert_batch(batch, priorities=[1.0, 2.0])
    replay.flush()
    assert replay.info().total_inserted == 0


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_bad_batch_sizes(replay, batch_size):
    with pytest.raises(shmreplay.InvalidArgumentError, match="batch_size"):
        replay.sample(batch_size, timeout=0.1)


def test_unknown_table_lists_the_tables(replay):
    with pytest.raises(shmreplay.TableNotFoundError, match="'replay'") as ei:
        replay.client.table("replya")
    assert isinstance(ei.value, KeyError)


def test_attach_without_daemon_says_how_to_start_one():
    with pytest.raises(shmreplay.DaemonNotRunning, match="shmreplay serve") as ei:
        shmreplay.attach("no-such-instance", timeout=0.2)
    assert isinstance(ei.value, ConnectionError)


def test_client_of_another_format_version_is_refused(daemon_factory, monkeypatch):
    d = daemon_factory(table_toml())
    import shmreplay.layout as layout

    monkeypatch.setattr(layout, "FORMAT_VERSION", layout.FORMAT_VERSION + 1)
    with pytest.raises(shmreplay.FormatVersionError, match="format version"):
        shmreplay.attach(d.name)


def test_a_corrupted_header_is_refused_at_attach(daemon_factory):
    d = daemon_factory(table_toml())
    path = f"/dev/shm/shmreplay.{d.name}.replay"
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 4096) as mm:
            mm[200] ^= 0xFF  # inside the spec payload: caught by its crc
    finally:
        os.close(fd)
    with pytest.raises(shmreplay.SegmentError, match="checksum"):
        shmreplay.attach(d.name)
