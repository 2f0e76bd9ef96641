"""Several actor processes insert while a learner samples: every row is intact and is its key's."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np

import shmreplay
from shmreplay.testing import STAMPED_SIGNATURE, stamped_actor, stamped_learner, table_toml

CTX = mp.get_context("spawn")


def _join_all(procs, timeout=120):
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"


def test_actors_insert_while_learner_samples_and_every_row_matches_its_key(daemon_factory):
    """Three actors (insert, insert_batch and reserve) write stamped rows into a table small
    enough that slots are recycled constantly while the learner copies them. Every sampled row
    must agree with its own checksum and be the row its key was returned for.

    This test bites: with the generation re-check in ``TableCore._deliver`` disabled, rows
    recycled during the copy come back foreign (a key with another row's uid).
    """
    d = daemon_factory(
        table_toml(
            max_size=500,
            sampler='{ kind = "prioritized", priority_exponent = 0.6 }',
            signature=STAMPED_SIGNATURE,
        )
    )
    results, learned = CTX.Queue(), CTX.Queue()
    stop = CTX.Event()
    n_actors, per_actor = 3, 6000
    actors = [
        CTX.Process(target=stamped_actor, args=(d.name, "replay", a + 1, per_actor, results))
        for a in range(n_actors)
    ]
    learner = CTX.Process(target=stamped_learner, args=(d.name, "replay", 64, stop, learned))
    try:
        learner.start()
        for p in actors:
            p.start()
        written = [results.get(timeout=120) for _ in actors]
        stop.set()
        batches, bad, seen = learned.get(timeout=60)
        _join_all([*actors, learner])
    finally:
        stop.set()
        for p in [*actors, learner]:
            if p.is_alive():
                p.kill()
                p.join()
    key_to_uid = {}
    for _, keys, uids in written:
        assert len(keys) == per_actor
        key_to_uid.update(zip(keys, uids, strict=True))
    assert len(key_to_uid) == n_actors * per_actor, "keys must be unique across actors"
    assert batches > 10
    assert bad == 0
    mismatched = {k: u for k, u in seen.items() if key_to_uid.get(k) != u}
    assert not mismatched
    with shmreplay.attach(d.name) as client:
        info = client.table("replay").info()
    assert info.total_inserted == n_actors * per_actor
    assert info.current_size == 500
    assert info.total_evicted == n_actors * per_actor - 500


def test_fifo_eviction_keeps_the_newest(daemon_factory):
    d = daemon_factory(
        table_toml(max_size=5, sampler='{ kind = "fifo" }', signature=STAMPED_SIGNATURE)
    )
    from shmreplay.testing import stamped_row

    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        keys = [t.insert(stamped_row(u)) for u in range(12)]
        t.flush()
        # Fifo sampler: the oldest remaining item, every time (no max_times_sampled).
        s = t.sample(3, timeout=5)
        assert (s.data["uid"] == 7).all() and (s.info.key == keys[7]).all()
        np.testing.assert_allclose(s.info.probability, 1.0)
        # The evicted are exactly the oldest seven.
        assert t.delete(keys) == 7
        assert t.info().current_size == 0
        assert t.info().total_evicted == 7
