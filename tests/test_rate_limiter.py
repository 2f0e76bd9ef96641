"""MinSize: samples block in the kernel until inserts make them possible, or time out."""

from __future__ import annotations

import multiprocessing as mp
import queue
import subprocess
import sys
import time

import pytest

import shmreplay
from shmreplay.testing import (
    STAMPED_SIGNATURE,
    blocked_sampler,
    limited_consumer,
    limited_producer,
    stamped_row,
    table_toml,
)

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


def _run(procs):
    for p in procs:
        p.start()


def _finish(procs):
    for p in procs:
        p.join(15)
        if p.is_alive():
            p.kill()
            p.join()


def test_sample_to_insert_ratio_holds_with_free_running_writers_and_samplers(daemon_factory):
    """spi 2, min_size_to_sample 10, error_buffer 20 → min_diff 0, max_diff 40: at every moment
    checked, 0 ≤ 2·inserts − samples ≤ 40; both sides keep moving (no deadlock)."""
    d = daemon_factory(
        table_toml(
            max_size=100_000,
            signature=STAMPED_SIGNATURE,
            rate_limiter='{ kind = "sample_to_insert_ratio", samples_per_insert = 2.0, '
            "min_size_to_sample = 10, error_buffer = 20.0 }",
        )
    )
    stop, produced, consumed = CTX.Event(), CTX.Queue(), CTX.Queue()
    producers = [
        CTX.Process(target=limited_producer, args=(d.name, "replay", p, 10**9, stop, produced))
        for p in range(2)
    ]
    consumers = [
        CTX.Process(target=limited_consumer, args=(d.name, "replay", b, stop, consumed))
        for b in (1, 3)
    ]
    cursors = []
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        _run(producers + consumers)
        try:
            end = time.monotonic() + 4.0
            while time.monotonic() < end:
                lim = t.info().rate_limiter
                cursors.append((lim.inserts, lim.samples, 2 * lim.inserts - lim.samples))
                time.sleep(0.02)
        finally:
            stop.set()
            inserted = sum(produced.get(timeout=30)[1] for _ in producers)
            got = [consumed.get(timeout=30) for _ in consumers]
            _finish(producers + consumers)
    assert all(0 <= c <= 40 for _, _, c in cursors), [c for c in cursors if not 0 <= c[2] <= 40]
    assert cursors[-1][0] > 200 and cursors[-1][1] > 400  # both sides kept moving
    assert sum(bad for _, bad in got) == 0
    assert inserted >= cursors[-1][0]


def test_queue_table_delivers_every_item_once_in_per_producer_order(daemon_factory):
    """3 producers, 2 consumers on a queue of 10: each item is sampled exactly once, and what
    each consumer sees of a producer comes in that producer's order."""
    d = daemon_factory(f'[[table]]\nname = "q"\nkind = "queue"\nmax_size = 10\n{STAMPED_SIGNATURE}')
    per_producer = 150
    stop, produced, consumed = CTX.Event(), CTX.Queue(), CTX.Queue()
    done_producing = CTX.Event()
    producers = [
        CTX.Process(
            target=limited_producer, args=(d.name, "q", p, per_producer, done_producing, produced)
        )
        for p in range(3)
    ]
    consumers = [
        CTX.Process(target=limited_consumer, args=(d.name, "q", 1, stop, consumed))
        for _ in range(2)
    ]
    with shmreplay.attach(d.name) as client:
        t = client.table("q")
        _run(producers + consumers)
        try:
            counts = [produced.get(timeout=120)[1] for _ in producers]
            deadline = time.monotonic() + 30
            while t.info().current_size > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            got = [consumed.get(timeout=30) for _ in consumers]
            _finish(producers + consumers)
    assert counts == [per_producer] * 3
    everything = sorted(u for uids, _ in got for u in uids)
    expected = sorted(p * 1_000_000_000 + i for p in range(3) for i in range(per_producer))
    assert everything == expected  # once each: nothing lost, nothing twice
    for uids, bad in got:
        assert bad == 0
        for p in range(3):
            mine = [u for u in uids if u // 1_000_000_000 == p]
            assert mine == sorted(mine)


def test_reconfiguring_the_limiter_releases_a_blocked_sampler_at_once(min10):
    """min_size 10 with 3 items: a sampler blocks; lowering min_size to 1 from another process
    (the CLI) frees it without any insert."""
    with shmreplay.attach(min10.name) as client:
        t = client.table("replay")
        for u in range(3):
            t.insert(stamped_row(u))
        t.flush()
        started, results = CTX.Event(), CTX.Queue()
        p = CTX.Process(
            target=blocked_sampler, args=(min10.name, "replay", 1, 30, started, results)
        )
        p.start()
        try:
            assert started.wait(30)
            time.sleep(0.3)
            with pytest.raises(queue.Empty):
                results.get(timeout=0.2)  # still blocked
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "shmreplay",
                    "limiter",
                    "replay",
                    "--name",
                    min10.name,
                    "--kind",
                    "min_size",
                    "--min-size",
                    "1",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode == 0, r.stderr
            assert "rate limiter min_size" in r.stdout and "min_size_to_sample 1" in r.stdout
            kind, uids, _ = results.get(timeout=5)
        finally:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        assert kind == "ok" and uids[0] in (0, 1, 2)
        assert t.info().rate_limiter.min_size_to_sample == 1
        assert "rate limiter set to" in min10.log()


def test_reconfiguring_checks_like_tables_toml(min10):
    with shmreplay.attach(min10.name) as client:
        with pytest.raises(shmreplay.ConfigError, match="samples_per_insert"):
            client.set_rate_limiter(
                "replay",
                {"kind": "sample_to_insert_ratio", "min_size_to_sample": 1, "error_buffer": 5.0},
            )
        with pytest.raises(shmreplay.TableNotFoundError, match="replay"):
            client.set_rate_limiter("nope", shmreplay.RateLimiterSpec.min_size(1))
        state = client.set_rate_limiter("replay", shmreplay.RateLimiterSpec.queue(5))
        assert (state["kind"], state["min_diff"], state["max_diff"]) == ("queue", 0.0, 5.0)
        assert client.table("replay").info().rate_limiter.kind == "queue"


def test_sample_nowait_raises_at_once_and_a_timed_out_batch_loses_nothing(daemon_factory):
    """Queue(3) with mts 1: sample(5) takes the 3 items there, times out; the next call returns
    those 3 first. sample_nowait on an empty queue raises immediately."""
    d = daemon_factory(f'[[table]]\nname = "q"\nkind = "queue"\nmax_size = 3\n{STAMPED_SIGNATURE}')
    with shmreplay.attach(d.name) as client:
        t = client.table("q")
        t0 = time.monotonic()
        with pytest.raises(shmreplay.RateLimiterTimeout, match="table 'q': sample blocked"):
            t.sample_nowait(1)
        assert time.monotonic() - t0 < 0.5
        for u in range(3):
            t.insert(stamped_row(u), timeout=5)
        t.flush()
        with pytest.raises(shmreplay.RateLimiterTimeout):
            t.sample(5, timeout=0.3)
        assert t.info().current_size == 0  # the 3 were taken (and deleted: mts 1)
        t.insert(stamped_row(3), timeout=5)
        t.flush()
        s = t.sample(4, timeout=5)
        assert s.data["uid"].tolist() == [0, 1, 2, 3]
        assert (s.info.times_sampled == 1).all()
