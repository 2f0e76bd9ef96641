"""MinSize: samples block in the kernel until inserts make them possible, or time out."""

from __future__ import annotations

import multiprocessing as mp
import queue
import time

import pytest

import shmreplay
from shmreplay.testing import STAMPED_SIGNATURE, blocked_sampler, stamped_row, table_toml

CTX = mp.get_context("spawn")


@pytest.fixture
def min10(daemon_factory):
    return daemon_factory(
        table_toml(rate_limiter='{ kind = "min_size", min_size = 10 }', signature=STAMPED_SIGNATURE)
    )


def test_sample_times_out_naming_table_and_side(min10):
    with shmreplay.attach(min10.name) as client:
        t = client.table("replay")
        for u in range(9):
            t.insert(stamped_row(u))
        t.flush()
        t0 = time.monotonic()
        with pytest.raises(
            shmreplay.RateLimiterTimeout, match=r"table 'replay': sample blocked"
        ) as ei:
            t.sample(1, timeout=0.3)
        assert 0.3 <= time.monotonic() - t0 < 5
        assert isinstance(ei.value, TimeoutError)
        assert t.info().rate_limiter.sample_blocked
        assert not t.info().rate_limiter.insert_blocked


def test_blocked_sampler_in_another_process_wakes_when_min_size_is_reached(min10):
    started, results = CTX.Event(), CTX.Queue()
    p = CTX.Process(target=blocked_sampler, args=(min10.name, "replay", 4, 60, started, results))
    p.start()
    try:
        with shmreplay.attach(min10.name) as client:
            t = client.table("replay")
            assert started.wait(30)
            for u in range(9):
                t.insert(stamped_row(u))
            t.flush()
            with pytest.raises(queue.Empty):
                results.get(timeout=0.5)  # 9 < 10: still blocked
            t.insert(stamped_row(9))
            t.flush()
            kind, uids, woke_at = results.get(timeout=30)
            print(f"woke {1e3 * (time.monotonic() - woke_at):.1f} ms before the parent looked")
        assert kind == "ok" and len(uids) == 4 and set(uids) <= set(range(10))
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()


def test_sample_partial_returns_what_it_has(min10):
    with shmreplay.attach(min10.name) as client:
        t = client.table("replay")
        for u in range(10):
            t.insert(stamped_row(u))
        t.flush()
        s = t.sample(5, timeout=1, partial=True)
        assert len(s) == 5  # min_size reached: nothing is missing
