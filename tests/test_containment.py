"""Fault containment: no exception, bad value or client churn costs the tables.

Each test here failed on c7003f0: a bad value a client wrote into shared memory, or a table whose
structures broke, took the whole daemon down and unlinked every table; clients that attached and
closed in a loop had their fresh channel wiped by the reclaim of the previous one and starved.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

import shmreplay
from shmreplay.errors import ShmReplayError
from shmreplay.instance import segment_name
from shmreplay.layout import Chan, Ctrl
from shmreplay.shm import SHM_DIR
from shmreplay.testing import STAMPED_SIGNATURE, stamped_batch, table_toml, verify_stamped

CTX = mp.get_context("spawn")


def _churner(instance: str, worker: int, cycles: int, batch: int, results) -> None:
    """attach -> insert_batch -> flush -> close, ``cycles`` times; reports timeouts and uids."""
    timeouts = 0
    inserted = 0
    try:
        for cycle in range(cycles):
            uids = np.arange(batch) + (worker * cycles + cycle) * batch
            with shmreplay.attach(instance) as client:
                t = client.table("replay")
                try:
                    t.insert_batch(stamped_batch(uids), timeout=5)
                    t.flush(timeout=5)
                    inserted += batch
                except shmreplay.RateLimiterTimeout:
                    timeouts += 1
        results.put(("ok", worker, timeouts, inserted))
    except BaseException as exc:
        results.put(("error", worker, repr(exc), inserted))


def test_clients_attaching_and_closing_under_load_neither_starve_nor_lose_items(daemon_factory):
    """4 processes x 40 cycles of attach -> insert_batch(20) -> flush -> close. On c7003f0 the
    reclaim of a closed client wiped the channel just handed to the next one (its WANT_LEASE and
    PID): that client's insert waited for a lease that never came (tens of timeouts per run)."""
    workers, cycles, batch = 4, 40, 20
    d = daemon_factory(
        table_toml(
            max_size=1_000_000,
            rate_limiter='{ kind = "min_size", min_size = 1000 }',
            signature=STAMPED_SIGNATURE,
        )
    )
    results = CTX.Queue()
    procs = [
        CTX.Process(target=_churner, args=(d.name, w, cycles, batch, results))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [r for r in reports if r[0] != "ok"]
    assert errors == []
    assert sum(r[2] for r in reports) == 0, f"inserts timed out: {reports}"
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        info = t.info()
        assert info.current_size == workers * cycles * batch
        assert info.total_inserted == workers * cycles * batch
        s = t.sample(4000, timeout=5)
        assert verify_stamped(s.data).all()
        assert set(s.data["uid"].tolist()) <= set(range(workers * cycles * batch))
