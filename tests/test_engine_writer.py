"""Differential tests of the C writer (shmreplay.engine._native.Writer) against the reference
model (tests/reference/writer.py), on two copies of a table's arrays without a daemon: the test
plays the daemon's part (leasing slots into the lease ring, committing what is published)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from shmreplay.engine import _native
from shmreplay.engine.layout import LEASE_CAPACITY, LINE, PUBLISH_CAPACITY, Chan, Ctrl, Sleep
from shmreplay.errors import SegmentError
from tests.reference.writer import RefWriter

DAEMON_PID = 4242
# (name, dtype, shape): scalars, shaped, bool, odd sizes
SIGNATURE = [
    ("obs", np.float32, (3, 2)),
    ("action", np.int64, ()),
    ("done", np.bool_, ()),
    ("img", np.uint8, (5,)),
]
NO_LEASE, NO_ROOM, BAD_VALUE, CHECK = -1, -2, -3, -4


def make_arrays(num_slots: int) -> dict:
    a = {
        "chan": np.zeros((Chan.COUNT, LINE), np.int64),
        "ctrl": np.zeros((Ctrl.COUNT, LINE), np.int64),
        "lease": np.zeros(LEASE_CAPACITY, np.int64),
        "publish": np.zeros(PUBLISH_CAPACITY, np.int64),
        "gen": np.zeros(num_slots, np.int64),
        "priority": np.zeros(num_slots, np.float64),
        "episode": np.zeros(num_slots, np.int64),
        "steps": np.zeros((num_slots, 2), np.int32),
        "key": np.arange(num_slots, dtype=np.uint64),
    }
    for name, dtype, shape in SIGNATURE:
        a["data." + name] = np.zeros((num_slots, *shape), dtype)
    a["chan"][Chan.PID, 0] = os.getpid()
    a["ctrl"][Ctrl.DAEMON_PID, 0] = DAEMON_PID
    return a


def c_writer(a: dict, max_priority: float = 1e300):
    cols = [a["data." + name] for name, _, _ in SIGNATURE]
    return _native.Writer(
        a["chan"],
        a["ctrl"],
        a["lease"],
        a["publish"],
        a["gen"],
        a["priority"],
        a["episode"],
        a["steps"],
        a["key"],
        cols,
        [name for name, _, _ in SIGNATURE],
        [np.dtype(dt).type if shape == () else None for _, dt, shape in SIGNATURE],
        np.ndarray,
        max_priority,
        DAEMON_PID,
    )


def ref_writer(a: dict) -> RefWriter:
    cols = [a["data." + name] for name, _, _ in SIGNATURE]
    return RefWriter(
        a["chan"],
        a["ctrl"],
        a["lease"],
        a["publish"],
        a["gen"],
        a["priority"],
        a["episode"],
        a["steps"],
        a["key"],
        cols,
    )


def random_row(rng) -> list:
    row = []
    for _, dtype, shape in SIGNATURE:
        if dtype is np.bool_:
            v = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            v = rng.integers(0, 200, shape).astype(dtype)
        else:
            v = rng.standard_normal(shape).astype(dtype)
        row.append(np.dtype(dtype).type(v) if shape == () else v)
    return row


def random_batch(rng, k: int) -> list:
    cols = []
    for _, dtype, shape in SIGNATURE:
        if dtype is np.bool_:
            cols.append(rng.random((k, *shape)) < 0.5)
        elif np.issubdtype(dtype, np.integer):
            cols.append(rng.integers(0, 200, (k, *shape)).astype(dtype))
        else:
            cols.append(rng.standard_normal((k, *shape)).astype(dtype))
    return cols


class Daemon:
    """The daemon's half, done by hand on both copies: lease free slots, commit publications."""

    def __init__(self, num_slots: int, rng) -> None:
        self.free = list(range(num_slots))
        self.rng = rng
        self.tag = 1

    def lease(self, copies: list[dict], m: int) -> None:
        a = copies[0]
        head, tail = a["chan"][Chan.LEASE_HEAD, 0], a["chan"][Chan.LEASE_TAIL, 0]
        m = min(m, len(self.free), LEASE_CAPACITY - (tail - head))
        picks = [self.free.pop(int(self.rng.integers(len(self.free)))) for _ in range(m)]
        for c in copies:
            for i, s in enumerate(picks):
                c["lease"][(tail + i) % LEASE_CAPACITY] = s
                c["key"][s] = (self.tag << 32) | s
            c["chan"][Chan.LEASE_TAIL, 0] = tail + m
        self.tag += 1

    def commit(self, copies: list[dict]) -> None:
        a = copies[0]
        head, tail = a["chan"][Chan.PUB_HEAD, 0], a["chan"][Chan.PUB_TAIL, 0]
        # committed items stay READY for a while; freed later in random order
        self.free.extend(int(a["publish"][p % PUBLISH_CAPACITY]) for p in range(head, tail))
        for c in copies:
            c["chan"][Chan.PUB_HEAD, 0] = tail


def assert_same(a: dict, b: dict, w, r: RefWriter) -> None:
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    assert (w.lease_head, w.lease_tail, w.pub_head, w.pub_tail, w.spare) == (
        r.lease_head,
        r.lease_tail,
        r.pub_head,
        r.pub_tail,
        len(r.spare),
    )


def run_sequence(num_slots: int, steps: int, seed: int, check_every: int = 1) -> None:
    rng = np.random.default_rng(seed)
    a, b = make_arrays(num_slots), make_arrays(num_slots)
    w, r = c_writer(a), ref_writer(b)
    daemon = Daemon(num_slots, np.random.default_rng(seed + 1))
    open_res = None  # (c slot, c gen) of a reservation in progress
    for step in range(steps):
        op = rng.choice(
            ["lease", "commit", "insert", "mapping", "batch", "batchmap", "reserve", "wake"]
        )
        if op == "lease":
            daemon.lease([a, b], int(rng.integers(0, 40)))
        elif op == "commit" and rng.random() < 0.5:
            daemon.commit([a, b])
        elif op in ("insert", "mapping"):
            row = random_row(rng)
            prio = float(rng.choice([0.0, rng.random() * 10]))
            if op == "mapping":
                data = {name: v for (name, _, _), v in zip(SIGNATURE, row, strict=True)}
                got = w.insert_mapping(data, prio)
                want = r.insert(row, prio)
                if isinstance(want, str):
                    assert got == CHECK
                else:
                    assert (got, w.wake_needed) == (want[0], int(want[1]))
            else:
                ep = (int(rng.integers(-5, 5)), int(rng.integers(0, 9)), int(rng.integers(9, 20)))
                got = w.insert(row, prio, *ep)
                want = r.insert(row, prio, ep)
                if isinstance(want, str):
                    assert got == {"empty": NO_LEASE, "full": NO_ROOM}[want]
                else:
                    assert (got, w.wake_needed) == (want[0], int(want[1]))
        elif op == "batch":
            n = int(rng.integers(1, 60))
            out = np.empty(n, np.int64)
            k = w.take(out)
            want = r.take(n)
            if want is None:
                assert k == NO_LEASE
                continue
            assert out[:k].tolist() == want
            slots = out[:k]
            cols = random_batch(rng, k)
            prios = rng.random(k) * 3
            eps = np.stack(
                [rng.integers(-3, 3, k), rng.integers(0, 5, k), rng.integers(5, 9, k)], axis=1
            ).astype(np.int64)
            keys = np.empty(k, np.uint64)
            w.write_batch(slots, cols, prios, eps, keys)
            assert np.array_equal(keys, r.write_batch(want, cols, prios, eps))
            assert (w.publish(slots) == 0) == r.publish_slots(want)
        elif op == "batchmap":
            n = int(rng.integers(1, 3000 if rng.random() < 0.1 else 60))
            cols = random_batch(rng, n)
            data = {name: c for (name, _, _), c in zip(SIGNATURE, cols, strict=True)}
            prios = float(rng.random()) if rng.random() < 0.5 else rng.random(n)
            start = int(rng.integers(0, n)) if rng.random() < 0.2 else 0
            keys_c = np.zeros(n, np.uint64)
            keys_r = np.zeros(n, np.uint64)
            if rng.random() < 0.5:
                done = w.insert_batch_mapping(data, prios, keys_c, start)
                assert (done, bool(w.wake_needed)) == r.insert_batch(cols, prios, keys_r, start)
            else:
                first = rng.integers(-(2**31), 2**31 - 50, n)
                eps = np.stack(
                    [rng.integers(-(2**63), 2**63 - 1, n), first, first + rng.integers(0, 50, n)],
                    axis=1,
                ).astype(np.int64)
                done = w.insert_batch_mapping(data, prios, keys_c, start, eps)
                want = r.insert_batch(cols, prios, keys_r, start, eps)
                assert (done, bool(w.wake_needed)) == want
            assert np.array_equal(keys_c, keys_r)
        elif op == "reserve":
            if open_res is None:
                slot = w.take_one()
                want = r.take(1)
                if want is None:
                    assert slot == NO_LEASE
                    continue
                assert slot == want[0]
                g = w.begin(slot)
                assert g == r.begin(slot)
                row = random_row(rng)
                for (name, _, _), v in zip(SIGNATURE, row, strict=True):
                    a["data." + name][slot] = v
                    b["data." + name][slot] = v
                open_res = (slot, g)
            else:
                slot, g = open_res
                open_res = None
                if rng.random() < 0.3:
                    w.abandon(slot, g)
                    r.abandon(slot, g)
                else:
                    w.end(slot, g, 2.5, 7, 1, 3)
                    r.end(slot, g, 2.5, (7, 1, 3))
                    assert (w.publish_one(slot) == 0) == r.publish_slots([slot])
        elif op == "wake":
            for c in (a, b):
                c["ctrl"][Ctrl.DAEMON_SLEEPING, 0] = [Sleep.AWAKE, Sleep.NAP, Sleep.IDLE][seed % 3]
                c["ctrl"][Ctrl.SAMPLER_WAITING, 0] = seed % 2
            seed += 1
            force = bool(rng.random() < 0.2)
            assert w.wake(force) == r.wake(force)
        if step % check_every == 0 or step == steps - 1:
            assert_same(a, b, w, r)


@pytest.mark.parametrize("num_slots", [1, 2, 7, 100, 1000])
def test_random_sequences_match_the_reference(num_slots):
    for seed in range(3):
        run_sequence(num_slots, 1500, seed * 100 + num_slots)


def test_a_large_table_matches_the_reference():
    run_sequence(1 << 20, 1000, 5, check_every=50)


def test_a_full_publish_ring_is_reported_not_overwritten():
    a, b = make_arrays(PUBLISH_CAPACITY + 10), make_arrays(PUBLISH_CAPACITY + 10)
    w, r = c_writer(a), ref_writer(b)
    daemon = Daemon(PUBLISH_CAPACITY + 10, np.random.default_rng(0))
    row = random_row(np.random.default_rng(1))
    published = 0
    while True:
        daemon.lease([a, b], LEASE_CAPACITY)
        got, want = w.insert(row, 1.0, 0, 0, 0), r.insert(row, 1.0)
        if got == NO_ROOM:
            assert want == "full"
            break
        assert got == want[0]
        published += 1
    assert published == PUBLISH_CAPACITY
    assert_same(a, b, w, r)
    daemon.commit([a, b])
    assert w.insert(row, 1.0, 0, 0, 0) >= 0 and r.insert(row, 1.0) != "full"
    assert_same(a, b, w, r)


def test_insert_mapping_refuses_all_but_the_common_case_with_nothing_written():
    a = make_arrays(10)
    w = c_writer(a, max_priority=5.0)
    Daemon(10, np.random.default_rng(0)).lease([a], 10)
    row = random_row(np.random.default_rng(1))
    good = {name: v for (name, _, _), v in zip(SIGNATURE, row, strict=True)}
    before = {k: v.copy() for k, v in a.items()}
    cases = [
        ({**good, "obs": good["obs"].astype(np.float64)}, 1.0),  # another dtype
        ({**good, "obs": good["obs"].T.copy()}, 1.0),  # another shape
        ({**good, "obs": np.asfortranarray(np.ones((3, 2), np.float32))[:, :]}, 1.0),
        ({**good, "action": 3}, 1.0),  # a Python int: Python coerces it
        ({**good, "action": np.int32(3)}, 1.0),
        ({**good, "img": bytes(5)}, 1.0),  # a buffer of the right size, not an array
        ({k: v for k, v in good.items() if k != "done"}, 1.0),
        ({**{k: v for k, v in good.items() if k != "done"}, "other": np.bool_(True)}, 1.0),
        (good, 1),  # an int priority
        (good, float("nan")),
        (good, 5.5),  # above max_priority
        (good, -0.5),
        (list(good.items()), 1.0),
    ]
    for data, prio in cases:
        assert w.insert_mapping(data, prio) == CHECK, (data, prio)
    keys = np.zeros(2, np.uint64)
    batch = {name: np.stack([v, v]) for name, v in good.items()}
    for data, prio in [
        ({**batch, "obs": batch["obs"].astype(np.float64)}, 1.0),
        ({**batch, "obs": batch["obs"][:1]}, 1.0),  # another length
        ({**batch, "obs": batch["obs"][:, :1]}, 1.0),  # another shape
        ({**batch, "action": [1, 2]}, 1.0),
        (batch, np.array([1.0, 5.5])),  # one priority above max_priority
        (batch, np.array([1.0, np.nan])),
        (batch, np.array([1.0, 2.0], np.float32)),
        (batch, np.array([1.0, 2.0, 3.0])),
        (batch, 7.0),
        (batch, [1.0, 1.0]),
    ]:
        assert w.insert_batch_mapping(data, prio, keys, 0) == CHECK, (data, prio)
    for k in before:
        assert np.array_equal(a[k], before[k]), k
    for word, value in [
        ((a["ctrl"], Ctrl.SHUTDOWN), 1),
        ((a["ctrl"], Ctrl.DAEMON_PID), DAEMON_PID + 1),
        ((a["ctrl"], Ctrl.TABLE_STATE), 1),
        ((a["chan"], Chan.PID), 0),
    ]:
        arr, idx = word
        old = arr[idx, 0]
        arr[idx, 0] = value
        assert w.insert_mapping(good, 1.0) == CHECK
        assert w.insert_batch_mapping(batch, 1.0, keys, 0) == CHECK
        arr[idx, 0] = old
    assert w.insert_mapping(good, 1.0) >= 0


CORRUPT_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from shmreplay.errors import SegmentError
    from tests.test_engine_writer import make_arrays, c_writer, random_row, SIGNATURE
    rng = np.random.default_rng(0)
    errors = 0
    for trial in range(3000):
        a = make_arrays(int(rng.integers(1, 50)))
        big = np.array([0, 1, -1, 2**62, -(2**63), 2**63 - 1, 2048, 4096, 10**9])
        w = None
        try:
            w = c_writer(a)
        except SegmentError:
            errors += 1
        for name in ("chan", "lease", "publish", "gen"):
            arr = a[name].reshape(-1)
            idx = rng.integers(0, len(arr), int(rng.integers(1, 20)))
            arr[idx] = rng.choice(big, len(idx)) + rng.integers(-3, 3, len(idx))
        if w is None:
            continue
        row = random_row(rng)
        data = {n: v for (n, _, _), v in zip(SIGNATURE, row)}
        out = np.empty(int(rng.integers(1, 3000)), np.int64)
        for call in (
            lambda: w.insert(row, 1.0, 0, 0, 0),
            lambda: w.insert_mapping(data, 1.0),
            lambda: w.insert_batch_mapping(
                {n: np.stack([v] * 40) for n, v in data.items()}, 1.0, np.empty(40, np.uint64), 0
            ),
            lambda: w.take(out),
            lambda: w.take_one(),
            lambda: w.leased(),
            lambda: w.committed(),
            lambda: w.room(int(rng.integers(0, 4097))),
            lambda: w.publish(out[: int(rng.integers(0, 10))] * 0),
            lambda: w.wake(False),
        ):
            for _ in range(3):
                try:
                    call()
                except SegmentError:
                    errors += 1
    assert errors > 100, errors
    print("ok", errors)
    """
)


def test_garbage_in_the_shared_words_raises_and_never_crashes():
    """Random garbage in the channel's words, rings and generations: every call either works
    (on garbage that is still in range) or raises SegmentError; a crash fails the subprocess."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", CORRUPT_SCRIPT],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok")


def test_a_slot_outside_the_table_in_the_lease_ring_raises_segment_error():
    a = make_arrays(10)
    w = c_writer(a)
    a["lease"][0] = 10
    a["chan"][Chan.LEASE_TAIL, 0] = 1
    with pytest.raises(SegmentError):
        w.take_one()
    assert w.lease_head == 0 and a["chan"][Chan.LEASE_HEAD, 0] == 0  # nothing consumed
    with pytest.raises(SegmentError):
        w.insert(random_row(np.random.default_rng(0)), 1.0, 0, 0, 0)
    a["lease"][0] = 9
    assert w.take_one() == 9


def test_a_refilled_lease_ring_does_not_post_the_napping_daemon():
    """The cached lease tail is refreshed only when the ring runs empty; the wake rule re-reads
    LEASE_TAIL before calling the lease low, so a writer whose ring the daemon keeps full never
    posts a napping daemon (before: the last LEASE_LOW_WATER items of each cached window did)."""
    from shmreplay.engine.layout import LEASE_LOW_WATER

    num_slots = 4 * LEASE_CAPACITY
    a, b = make_arrays(num_slots), make_arrays(num_slots)
    w, r = c_writer(a), ref_writer(b)
    daemon = Daemon(num_slots, np.random.default_rng(0))
    row = random_row(np.random.default_rng(1))
    for c in (a, b):
        c["ctrl"][Ctrl.DAEMON_SLEEPING, 0] = Sleep.NAP
    posts = 0
    for _ in range(3 * LEASE_CAPACITY + LEASE_LOW_WATER):
        daemon.lease([a, b], LEASE_CAPACITY)  # the daemon keeps the ring full
        got, want = w.insert(row, 1.0, 0, 0, 0), r.insert(row, 1.0)
        assert got == want[0] and w.wake_needed == int(want[1])
        posts += w.wake_needed
        daemon.commit([a, b])
    assert posts == 0
    assert a["ctrl"][Ctrl.DAEMON_SLEEPING, 0] == Sleep.NAP
    assert_same(a, b, w, r)
    # Once the ring really runs low, the napping daemon is posted (once: it is then AWAKE).
    posts = 0
    for _ in range(a["chan"][Chan.LEASE_TAIL, 0] - a["chan"][Chan.LEASE_HEAD, 0]):
        got = w.insert(row, 1.0, 0, 0, 0)
        assert got >= 0 and (r.insert(row, 1.0)[1] == bool(w.wake_needed))
        posts += w.wake_needed
    assert posts == 1
    assert a["ctrl"][Ctrl.DAEMON_SLEEPING, 0] == Sleep.AWAKE
    assert_same(a, b, w, r)


def test_insert_batch_mapping_refuses_episodes_it_cannot_store_with_nothing_written():
    a = make_arrays(10)
    w = c_writer(a)
    Daemon(10, np.random.default_rng(0)).lease([a], 10)
    batch = {
        n: np.stack([v, v])
        for (n, _, _), v in zip(SIGNATURE, random_row(np.random.default_rng(1)), strict=True)
    }
    before = {k: v.copy() for k, v in a.items()}
    keys = np.zeros(2, np.uint64)
    good = np.array([[7, 0, 3], [7, 1, 4]], np.int64)
    for eps in [
        good[:1],  # one row short
        good[:, :2].copy(),  # two columns
        good.astype(np.int32),
        good.astype(np.float64),
        np.asfortranarray(good),
        good.tolist(),
        np.array([[7, 5, 3], [7, 1, 4]], np.int64),  # first after last
        np.array([[7, 0, 2**31], [7, 1, 4]], np.int64),  # beyond int32
        np.array([[7, -(2**31) - 1, 3], [7, 1, 4]], np.int64),
    ]:
        assert w.insert_batch_mapping(batch, 1.0, keys, 0, eps) == CHECK, eps
    for k in before:
        assert np.array_equal(a[k], before[k]), k
    assert w.insert_batch_mapping(batch, 1.0, keys, 0, good) == 2
    slots = (keys & 0xFFFFFFFF).astype(np.int64)
    assert a["episode"][slots].tolist() == [7, 7]
    assert a["steps"][slots].tolist() == [[0, 3], [1, 4]]
