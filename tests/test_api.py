"""The client API against a real daemon: inserts, samples, reservations, mutations, info."""

from __future__ import annotations

import numpy as np
import pytest

import shmreplay
from shmreplay.testing import table_toml


def w1_row(i: int) -> dict:
    return {
        "obs": np.full(8, i, dtype=np.float32),
        "action": i,
        "reward": float(i) / 2,
        "done": i % 2 == 0,
    }


@pytest.fixture
def replay(daemon_factory):
    d = daemon_factory(table_toml(max_size=100) + table_toml(name="other", max_size=10))
    client = shmreplay.attach(d.name)
    yield client.table("replay")
    client.close()


def test_insert_then_sample_returns_the_row_and_its_info(replay):
    keys = [replay.insert(w1_row(i), priority=1.0) for i in range(5)]
    replay.flush()
    s = replay.sample(64, timeout=5)
    assert s.data["obs"].shape == (64, 8) and s.data["obs"].dtype == np.float32
    assert s.data["action"].shape == (64,) and s.data["action"].dtype == np.int64
    by_key = dict(zip(keys, range(5), strict=True))
    for j in range(64):
        i = by_key[int(s.info.key[j])]
        assert (s.data["obs"][j] == i).all()
        assert s.data["action"][j] == i and s.data["reward"][j] == np.float32(i / 2)
        assert s.data["done"][j] == (i % 2 == 0)
    assert s.info.key.dtype == np.uint64
    np.testing.assert_allclose(s.info.probability, 1 / 5)
    assert (s.info.table_size == 5).all()
    assert (s.info.priority == 1.0).all()
    # times_sampled counts this sample, as if the batch were drawn one item at a time
    for k in set(s.info.key.tolist()):
        counts = s.info.times_sampled[s.info.key == k]
        assert sorted(counts.tolist()) == list(range(1, len(counts) + 1))


def test_insert_batch_returns_uint64_keys_in_order(replay):
    n = 50
    batch = {
        "obs": np.arange(n * 8, dtype=np.float32).reshape(n, 8),
        "action": np.arange(n),
        "reward": np.zeros(n, np.float32),
        "done": np.zeros(n, bool),
    }
    keys = replay.insert_batch(batch, priorities=np.linspace(0.1, 1, n))
    assert keys.dtype == np.uint64 and keys.shape == (n,) and len(set(keys.tolist())) == n
    replay.flush()
    s = replay.sample(200, timeout=5)
    pos = {int(k): i for i, k in enumerate(keys)}
    idx = np.array([pos[int(k)] for k in s.info.key])
    assert (s.data["action"] == idx).all()
    np.testing.assert_array_equal(s.data["obs"], batch["obs"][idx])


def test_reserve_writes_in_place_and_discards_on_exception(replay):
    with replay.reserve(priority=2.0) as slot:
        slot["obs"][...] = 7.0
        slot["action"][...] = 7
        slot["reward"][...] = 0.5
        slot["done"][...] = True
        assert slot["action"].shape == () and slot["obs"].base is not None  # views into shm
    with pytest.raises(RuntimeError), replay.reserve() as slot2:
        slot2["obs"][...] = -1.0
        slot2["action"][...] = -1
        raise RuntimeError("actor failed mid-write")
    replay.flush()
    assert replay.info().current_size == 1
    s = replay.sample(10, timeout=5)
    assert (s.info.key == slot.key).all()
    assert (s.data["action"] == 7).all() and (s.data["obs"] == 7.0).all()
    assert (s.info.priority == 2.0).all()
    # The discarded slot is reused by the next insert, which is complete and visible.
    replay.insert(w1_row(3))
    replay.flush()
    assert replay.info().current_size == 2


def test_update_priorities_and_delete_ignore_and_count_missing_keys(daemon_factory):
    d = daemon_factory(
        table_toml(max_size=100, sampler='{ kind = "prioritized", priority_exponent = 1.0 }')
    )
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        keys = [t.insert(w1_row(i), priority=1.0) for i in range(4)]
        t.flush()
        missing = t.update_priorities([keys[0], keys[1], 12345], [0.0, 0.0, 3.0])
        assert missing == 1
        s = t.sample(500, timeout=5)
        assert set(s.info.key.tolist()) <= {keys[2], keys[3]}  # priority 0: never drawn
        np.testing.assert_allclose(s.info.probability, 0.5)
        assert t.delete([keys[2], 999]) == 1
        s = t.sample(100, timeout=5)
        assert (s.info.key == keys[3]).all()
        np.testing.assert_allclose(s.info.probability, 1.0)
        assert t.info().current_size == 3
        # An update of a deleted key is ignored and counted.
        assert t.update_priorities([keys[2]], [5.0]) == 1
        # Deletes come before updates in one call: the deleted key's update is missing.
        assert t.update_priorities([keys[3], keys[0]], [2.0, 4.0], deletes=[keys[3]]) == 1
        info = t.info()
        assert info.current_size == 2
        assert (info.max_priority, info.min_priority) == (4.0, 0.0)


def test_info_of_an_empty_table_has_no_priority_extremes(replay):
    info = replay.info()
    assert info.current_size == 0
    assert info.max_priority is None and info.min_priority is None


def test_all_zero_priorities_fall_back_to_uniform(daemon_factory):
    d = daemon_factory(table_toml(sampler='{ kind = "prioritized", priority_exponent = 0.0 }'))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        keys = [t.insert(w1_row(i), priority=0.0) for i in range(4)]
        t.flush()
        s = t.sample(400, timeout=5)
        assert set(s.info.key.tolist()) == set(keys)
        np.testing.assert_allclose(s.info.probability, 0.25)


def test_client_insert_into_several_tables(replay):
    client = replay.client
    keys = client.insert(w1_row(1), priorities={"replay": 1.0, "other": 0.5})
    assert set(keys) == {"replay", "other"}
    other = client.table("other")
    other.flush()
    replay.flush()
    s = other.sample(3, timeout=5)
    assert (s.info.key == keys["other"]).all() and (s.info.priority == 0.5).all()


def test_info_reports_the_table(replay):
    for i in range(3):
        replay.insert(w1_row(i))
    replay.flush()
    replay.sample(4, timeout=5)
    info = replay.info()
    assert info.name == "replay" and info.max_size == 100 and info.current_size == 3
    assert info.sampler == {"kind": "uniform"} and info.remover == {"kind": "fifo"}
    assert info.rate_limiter.kind == "min_size" and info.rate_limiter.inserts == 3
    assert info.rate_limiter.samples == 4 and info.total_sampled == 4
    assert 1 <= info.num_unique_samples <= 3
    assert [f.name for f in info.signature] == ["obs", "action", "reward", "done"]
    assert info.clients >= 1 and info.segment_bytes > info.data_bytes > 0
    server = replay.client.server_info()
    assert server["tables"]["replay"]["current_size"] == 3


def test_close_is_idempotent_and_a_closed_handle_says_so(replay):
    client = replay.client
    client.close()
    client.close()
    with pytest.raises(shmreplay.ClientClosedError, match="closed"):
        replay.insert(w1_row(0))
    with pytest.raises(shmreplay.ClientClosedError):
        client.table("replay")


def test_reset_clears_items_and_counters(replay):
    for i in range(5):
        replay.insert(w1_row(i))
    replay.flush()
    replay.reset()
    info = replay.info()
    assert info.current_size == 0 and info.rate_limiter.inserts == 0
    with pytest.raises(shmreplay.RateLimiterTimeout):
        replay.sample(1, timeout=0.2)


def test_reserve_views_stop_being_writable_when_the_block_ends(replay):
    """A view kept past its ``with`` block cannot change the committed item (on main it still
    wrote into it: a sampler then saw action 99), nor a discarded slot the next insert reuses."""
    with replay.reserve() as slot:
        kept = [slot[name] for name in ("obs", "action", "reward", "done")]
        for view in kept:
            view[...] = 1
    replay.flush()
    for view in kept:
        with pytest.raises(ValueError, match="read-only"):
            view[...] = 99
    with pytest.raises(shmreplay.ClientClosedError, match="reserve"):
        slot["action"]
    s = replay.sample(4, timeout=5)
    assert (s.info.key == slot.key).all() and (s.data["action"] == 1).all()
    # A discarded reservation's slot is reused by the next insert: its views are revoked too.
    with pytest.raises(RuntimeError), replay.reserve() as dropped:
        dropped_view = dropped["action"]
        raise RuntimeError("actor failed mid-write")
    key = replay.insert(w1_row(5))
    replay.flush()
    with pytest.raises(ValueError, match="read-only"):
        dropped_view[...] = 99
    s = replay.sample(64, timeout=5)
    assert (s.data["action"][s.info.key == key] == 5).all()


def test_insert_batch_that_times_out_returns_the_keys_it_wrote(daemon_factory):
    """insert_batch(25) into a queue of 10 with timeout=1: 10 items go in, then the limiter
    holds the rest. The RateLimiterTimeout carries those 10 keys (on main their keys were lost
    and a retry of the whole batch duplicated them); a retry of the rest completes the batch."""
    d = daemon_factory(
        '[[table]]\nname = "q"\nkind = "queue"\nmax_size = 10\n'
        '[table.signature]\nuid = { dtype = "int64" }\n'
    )
    with shmreplay.attach(d.name) as client:
        q = client.table("q")
        uids = np.arange(25, dtype=np.int64)
        with pytest.raises(shmreplay.RateLimiterTimeout, match=r"10 of the batch's 25") as err:
            q.insert_batch({"uid": uids}, timeout=1.0)
        written = err.value.keys
        assert written.dtype == np.uint64 and len(written) == 10
        q.flush(timeout=5)
        assert q.info().current_size == 10
        got = q.sample(10, timeout=5)  # a queue: the oldest first, each once
        assert got.info.key.tolist() == written.tolist()
        assert got.data["uid"].tolist() == list(range(10))
        rest = q.insert_batch({"uid": uids[len(written) :][:10]}, timeout=5)
        q.flush(timeout=5)
        assert q.sample(10, timeout=5).info.key.tolist() == rest.tolist()
        assert q.info().rate_limiter.inserts == 20  # nothing was inserted twice
    # Any other timeout has an empty .keys
    assert len(shmreplay.RateLimiterTimeout("x").keys) == 0


def test_client_insert_that_times_out_on_a_later_table_names_the_tables_written(daemon_factory):
    """One step into a free table, then into a full queue: the timeout says the step is in the
    first table and carries its key (on main it said nothing: a retry inserted it twice)."""
    d = daemon_factory(
        '[[table]]\nname = "free"\nmax_size = 10\n[table.signature]\nuid = { dtype = "int64" }\n'
        '[[table]]\nname = "q"\nkind = "queue"\nmax_size = 1\n'
        '[table.signature]\nuid = { dtype = "int64" }\n'
    )
    with shmreplay.attach(d.name) as client:
        client.insert({"uid": 0}, priorities={"free": 1.0, "q": 1.0}, timeout=1)
        with pytest.raises(shmreplay.RateLimiterTimeout, match="already written to 'free'") as e:
            client.insert({"uid": 1}, priorities={"free": 1.0, "q": 1.0}, timeout=0.3)
        free = client.table("free")
        free.flush(timeout=5)
        assert len(e.value.keys) == 1 and free.info().current_size == 2
        s = free.sample(32, timeout=5)
        assert int(e.value.keys[0]) in s.info.key.tolist()
        assert (s.data["uid"][s.info.key == e.value.keys[0]] == 1).all()
