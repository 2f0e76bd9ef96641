"""Bad input gets a clear error of the ShmReplayError tree, and nothing reaches the table."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

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
    import shmreplay.engine.layout as layout

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


# -- extreme values: each one once escaped as OverflowError / ValueError / MemoryError (or a
# posix_ipc error, or was silently truncated) on main c7003f0; now each is refused with an error
# of the ShmReplayError tree that says what is allowed, and nothing reaches the table.

BATCH2 = {
    "obs": np.zeros((2, 8), np.float32),
    "action": [1, 2],
    "reward": [0.5, 0.5],
    "done": [False, False],
}
NAN = float("nan")


def _beyond_memory() -> int:
    """A batch size whose rows (45 B each in this table) exceed the machine's memory."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 45 + 1


EXTREME_ARGUMENTS = [
    ("episode id 2**70", lambda t: t.insert(GOOD, episode=(2**70, 0, 0)), "int64"),
    ("episode id -2**70", lambda t: t.insert(GOOD, episode=(-(2**70), 0, 0)), "int64"),
    ("episode id 1.5", lambda t: t.insert(GOOD, episode=(1.5, 0, 0)), "integers"),
    ("episode step 2**40", lambda t: t.insert(GOOD, episode=(1, 0, 2**40)), "int32"),
    ("reserve episode 2**70", lambda t: t.reserve(episode=(2**70, 0, 0)), "int64"),
    (
        "episodes 2**70",
        lambda t: t.insert_batch(BATCH2, episodes=[[2**70, 0, 0], [1, 0, 0]]),
        "int64",
    ),
    (
        "episodes uint64 max",
        lambda t: t.insert_batch(BATCH2, episodes=np.full((2, 3), 2**64 - 1, np.uint64)),
        "int64",
    ),
    ("episodes str", lambda t: t.insert_batch(BATCH2, episodes=[["a", 0, 0], [1, 0, 0]]), "int"),
    ("episodes nan", lambda t: t.insert_batch(BATCH2, episodes=[[NAN, 0, 0], [1, 0, 0]]), "int"),
    ("episodes 1.5", lambda t: t.insert_batch(BATCH2, episodes=[[1.5, 0, 0], [1, 0, 0]]), "int"),
    ("sample 10**12", lambda t: t.sample(10**12, timeout=0), "smaller batches"),
    ("sample 2**63", lambda t: t.sample(2**63, timeout=0), "batch"),
    ("sample np.uint64 2**63", lambda t: t.sample(np.uint64(2**63), timeout=0), "batch"),
    ("sample more rows than memory", lambda t: t.sample(_beyond_memory(), timeout=0), "smaller"),
    ("as_iterator 10**12", lambda t: t.as_iterator(10**12, timeout=0.1), "smaller batches"),
    ("sample timeout nan", lambda t: t.sample(1, timeout=NAN), "timeout"),
    ("sample timeout str", lambda t: t.sample(1, timeout="1"), "timeout"),
    ("insert timeout str", lambda t: t.insert(GOOD, timeout="1"), "timeout"),
    ("insert_batch timeout nan", lambda t: t.insert_batch(BATCH2, timeout=NAN), "timeout"),
    ("flush timeout nan", lambda t: t.flush(timeout=NAN), "timeout"),
    ("reserve timeout nan", lambda t: t.reserve(timeout=NAN), "timeout"),
    ("delete timeout nan", lambda t: t.delete([1], timeout=NAN), "timeout"),
    ("delete key 1.5", lambda t: t.delete([1.5]), "integers"),
    ("update key 1.5", lambda t: t.update_priorities([1.5], [1.0]), "integers"),
    (
        "as_iterator prefetch 10**12",
        lambda t: t.as_iterator(1, prefetch=10**12, timeout=0.1),
        "lower prefetch",
    ),
    (
        "trajectory_writer keeping 10**12 steps",
        lambda t: t.client.trajectory_writer(10**12).append(GOOD),
        "keep fewer steps",
    ),
    ("attach timeout nan", lambda t: shmreplay.attach(t.client.instance, timeout=NAN), "timeout"),
    ("attach timeout str", lambda t: shmreplay.attach(t.client.instance, timeout="3"), "timeout"),
    ("attach timeout None", lambda t: shmreplay.attach(t.client.instance, timeout=None), "timeout"),
]


@pytest.mark.parametrize(
    "case,call,match", EXTREME_ARGUMENTS, ids=[c[0] for c in EXTREME_ARGUMENTS]
)
def test_extreme_arguments_are_refused_clearly(replay, case, call, match):
    with pytest.raises(shmreplay.InvalidArgumentError, match=match):
        call(replay)
    replay.flush()
    assert replay.info().total_inserted == 0


def test_insert_batch_keys_of_two_items_still_work(replay):
    """The checks above refuse only what cannot be stored: the extremes that fit are kept."""
    eps = np.array([[2**63 - 1, -(2**31), 2**31 - 1], [-(2**63), 0, 0]], np.int64)
    keys = replay.insert_batch(BATCH2, episodes=eps, timeout=5.0)
    replay.insert(GOOD, episode=(np.int64(7), np.int32(0), 3), timeout=5)
    replay.flush()
    assert replay.info().current_size == 3 and len(keys) == 2
    assert replay.info().num_episodes == 3
    assert len(replay.sample(3, timeout=float("inf"))) == 3


@pytest.mark.parametrize(
    "limiter",
    [
        {"kind": "min_size", "min_size": 10**30},
        {"kind": "queue", "size": 10**30},
        {
            "kind": "custom",
            "samples_per_insert": 1.0,
            "min_size_to_sample": 10**30,
            "min_diff": 0,
            "max_diff": 10,
        },
        {
            "kind": "custom",
            "samples_per_insert": 1.0,
            "min_size_to_sample": 1,
            "min_diff": 0,
            "max_diff": 10**400,
        },
    ],
    ids=["min_size", "queue", "custom min_size", "custom max_diff"],
)
def test_huge_rate_limiter_numbers_are_config_errors(replay, limiter):
    with pytest.raises(shmreplay.ConfigError):
        replay.client.set_rate_limiter("replay", limiter)
    assert replay.info().rate_limiter.min_size_to_sample == 1  # unchanged


def test_huge_rate_limiter_numbers_in_the_presets():
    spec = shmreplay.RateLimiterSpec
    for make in (
        lambda: spec.min_size(10**30),
        lambda: spec.queue(10**30),
        lambda: spec.sample_to_insert_ratio(1.0, 10**30, 2.0),
        lambda: spec.sample_to_insert_ratio(1.0, 2, "x"),
        lambda: spec.custom(1.0, 10**30, 0, 10),
        lambda: spec.custom("x", 1, 0, 10),
        lambda: spec.custom(1.0, 1, 0, 10**400),
    ):
        with pytest.raises(shmreplay.ConfigError):
            make()
    assert spec.min_size(2**53).min_size_to_sample == 2**53  # the largest exact count


@pytest.mark.parametrize(
    "body,match",
    [
        (
            "max_size = 10\n[table.signature]\nobs = { shape = [4294967296, 4294967296], "
            'dtype = "float32" }',
            "more than a 64-bit process can map",
        ),
        (
            'max_size = 9223372036854775807\n[table.signature]\nobs = { dtype = "float32" }',
            "32 bits",
        ),
        ('max_size = 4294967000\n[table.signature]\nobs = { dtype = "float32" }', "32 bits"),
        (
            "max_size = 10\nheadroom = 9223372036854775807\n[table.signature]\n"
            'obs = { dtype = "float32" }',
            "32 bits",
        ),
        (
            "max_size = 10\nmax_times_sampled = 9223372036854775807\n[table.signature]\n"
            'obs = { dtype = "float32" }',
            "int32",
        ),
    ],
    ids=[
        "shape 2**32 x 2**32",
        "max_size int64 max",
        "max_size above 2**32 slots",
        "headroom int64 max",
        "max_times_sampled int64 max",
    ],
)
def test_validate_refuses_tables_that_cannot_exist(tmp_path, body, match):
    """On main, shape [2**32, 2**32] wrapped to 0 B/row: validate printed "OK, 3.0 MiB" and
    serve then crashed. Now validate and serve both refuse it with one clear line."""
    path = tmp_path / "tables.toml"
    path.write_text(f'[[table]]\nname = "big"\n{body}\n')
    for args in (("validate", str(path)), ("serve", "--tables", str(path), "--name", "x-nope")):
        r = subprocess.run(
            [sys.executable, "-m", "shmreplay", *args], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        assert match in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "OK" not in r.stdout
