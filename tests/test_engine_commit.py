"""The compiled commit round (shmreplay.engine._native.CommitTable / CommitRound) against its
reference model (tests/reference/commit.py): random lease / publish / drain / commit sequences
on two identical sets of arrays, hostile runs mixed in, every result and array compared exactly.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from shmreplay.engine import _native
from shmreplay.engine.layout import LEASE_CAPACITY, LINE, PUBLISH_CAPACITY, Chan, Ctrl, SlotState
from tests.reference.commit import CommitModel

MAX_PRIORITY = 1e6


def make_arrays(num_slots: int, clients: int) -> dict[str, np.ndarray]:
    a = {
        "ctrl": np.zeros((Ctrl.COUNT, LINE), np.int64),
        "key": np.arange(num_slots, dtype=np.uint64),
        "state": np.zeros(num_slots, np.uint8),
        "priority": np.zeros(num_slots, np.float64),
        "times_sampled": np.zeros(num_slots, np.int32),
        "seq": np.zeros(num_slots, np.int64),
        "gen": np.zeros(num_slots, np.int64),
        "owner": np.full(num_slots, -1, np.int32),
        "episode": np.zeros(num_slots, np.int64),
        "free": np.arange(num_slots, dtype=np.int64),
        "chan": np.zeros((clients, Chan.COUNT, LINE), np.int64),
        "lease": np.zeros((clients, LEASE_CAPACITY), np.int64),
        "publish": np.zeros((clients, PUBLISH_CAPACITY), np.int64),
        "active": np.ones(clients, bool),
        "pub_head": np.zeros(clients, np.int64),
        "lease_tail": np.zeros(clients, np.int64),
        "outstanding": np.zeros(clients, np.int64),
        "last_episode": np.zeros(clients, np.int64),
    }
    a["ctrl"][Ctrl.FREE_TAIL, 0] = num_slots
    return a


class Engine:
    def __init__(self, a: dict[str, np.ndarray], max_priority: float = MAX_PRIORITY) -> None:
        self.a = a
        clients = len(a["active"])
        self.out_slots = np.empty(clients * PUBLISH_CAPACITY, np.int64)
        self.out_prios = np.empty(clients * PUBLISH_CAPACITY, np.float64)
        self.table = _native.CommitTable(
            a["ctrl"].reshape(-1),
            *(a[k] for k in ("key", "state", "priority", "times_sampled", "seq", "gen")),
            *(a[k] for k in ("owner", "episode", "free", "last_episode")),
            max_priority,
        )
        self.round = _native.CommitRound(
            self.table,
            a["chan"].reshape(-1),
            a["lease"].reshape(-1),
            a["publish"].reshape(-1),
            *(a[k] for k in ("active", "pub_head", "lease_tail", "outstanding")),
            self.out_slots,
            self.out_prios,
        )


def model_of(a: dict[str, np.ndarray], max_priority: float = MAX_PRIORITY) -> CommitModel:
    view = dict(a)
    view["ctrl"] = a["ctrl"][:, 0]
    view["chan"] = a["chan"][:, :, 0]
    return CommitModel(view, max_priority)


def assert_same(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> None:
    for k in x:
        assert np.array_equal(x[k], y[k], equal_nan=x[k].dtype.kind == "f"), k


def publish(a: dict[str, np.ndarray], c: int, rng, hostile: str | None, episode: int) -> None:
    """A writer on channel c: publish some of the slots its lease ring holds (the same on
    both copies: the caller calls this with the same rng state on each)."""
    chan = a["chan"][:, :, 0]
    head, tail = int(chan[c, Chan.LEASE_HEAD]), int(a["lease_tail"][c])
    m = int(rng.integers(0, tail - head + 1))
    slots = a["lease"][c][(head + np.arange(m)) % LEASE_CAPACITY]
    chan[c, Chan.LEASE_HEAD] = head + m
    for s in slots:
        a["gen"][s] += 2 if rng.random() > 0.05 else 1  # now and then a torn (odd) generation
        a["priority"][s] = rng.random() * 3
        a["episode"][s] = episode if rng.random() > 0.2 else 0
    if hostile == "range" and m:
        slots[rng.integers(m)] = rng.choice([-1, len(a["key"]), 2**40])
    elif hostile == "twice" and m > 1:
        slots[-1] = slots[0]
    elif hostile == "priority" and m:
        a["priority"][slots[rng.integers(m)]] = rng.choice([np.nan, -1.0, np.inf, 2e6])
    elif hostile == "foreign" and m:
        slots[0] = rng.integers(len(a["key"]))
    ptail = int(chan[c, Chan.PUB_TAIL])
    ring = a["publish"][c]
    ring[(ptail + np.arange(m)) % PUBLISH_CAPACITY] = slots
    newtail = ptail + m
    if hostile == "behind":
        newtail = int(a["pub_head"][c]) - 1 - int(rng.integers(2**62))
    elif hostile == "ahead":
        newtail = ptail + PUBLISH_CAPACITY + 1
    chan[c, Chan.PUB_TAIL] = newtail


def run_sequence(seed: int, num_slots: int, clients: int, steps: int) -> None:
    rng = np.random.default_rng(seed)
    ea, ma = make_arrays(num_slots, clients), make_arrays(num_slots, clients)
    eng, model = Engine(ea), model_of(ma)
    episode = 1
    for _ in range(steps):
        op = rng.random()
        if op < 0.35:
            c, n = int(rng.integers(clients)), int(rng.integers(0, 40))
            if ea["active"][c]:
                have = int(ea["lease_tail"][c] - ea["chan"][c, Chan.LEASE_HEAD, 0])
                n = min(n, LEASE_CAPACITY - have)
                assert eng.round.lease(c, n) == model.round_lease(c, n)
        elif op < 0.7:
            c = int(rng.integers(clients))
            hostile = None
            if rng.random() < 0.1:
                hostile = str(rng.choice(["range", "twice", "priority", "foreign", "behind"]))
            if rng.random() < 0.1:
                episode += 1
            state = rng.bit_generator.state
            publish(ea, c, rng, hostile, episode)
            rng.bit_generator.state = state
            publish(ma, c, rng, hostile, episode)
        elif op < 0.95:
            assert eng.round.pending() == model.pending()
            n, refused = eng.round.drain()
            slots, prios, mrefused = model.drain()
            assert n == len(slots)
            assert np.array_equal(eng.out_slots[:n], slots)
            assert np.array_equal(eng.out_prios[:n], prios)
            assert (refused or []) == mrefused
            for c, _ in mrefused:  # cut off: both stop reading the channel
                ea["active"][c] = ma["active"][c] = False
            if n:
                k = eng.table.commit(eng.out_slots[:n], eng.out_prios[:n])
                kept, kprios = model.commit_meta(slots, prios)
                assert k == len(kept)
                assert np.array_equal(eng.out_slots[:k], kept)
                assert np.array_equal(eng.out_prios[:k], kprios)
            assert eng.round.finish() == model.finish()
        elif op < 0.97:
            # A cut-off channel is reclaimed and given to a new client (Clients._free_channel,
            # _register): its slots freed, its lines and the daemon's copies zeroed.
            for c in np.flatnonzero(~ea["active"]):
                for a in (ea, ma):
                    held = np.flatnonzero((a["owner"] == c) & (a["state"] == SlotState.LEASED))
                    a["state"][held] = SlotState.FREE
                    a["owner"][held] = -1
                    tail = int(a["ctrl"][Ctrl.FREE_TAIL, 0])
                    a["free"][(tail + np.arange(len(held))) % num_slots] = held
                    a["ctrl"][Ctrl.FREE_TAIL, 0] = tail + len(held)
                    a["chan"][c] = 0
                    for k in ("pub_head", "lease_tail", "outstanding"):
                        a[k][c] = 0
                    a["active"][c] = True
        else:
            # Free some READY slots back (as an eviction would), in the same order on both.
            for a in (ea, ma):
                ready = np.flatnonzero(a["state"] == SlotState.READY)[:5]
                a["state"][ready] = SlotState.FREE
                tail = int(a["ctrl"][Ctrl.FREE_TAIL, 0])
                a["free"][(tail + np.arange(len(ready))) % num_slots] = ready
                a["ctrl"][Ctrl.FREE_TAIL, 0] = tail + len(ready)
                a["ctrl"][Ctrl.SIZE, 0] -= len(ready)
        assert_same(ea, ma)


@pytest.mark.parametrize(
    "seed,num_slots,clients", [(0, 1, 1), (1, 7, 2), (2, 100, 3), (3, 1000, 5), (4, 37, 4)]
)
def test_random_rounds_match_the_reference(seed, num_slots, clients):
    run_sequence(seed, num_slots, clients, 600)


def test_refused_runs_give_check_published_reasons():
    a = make_arrays(10, 2)
    eng = Engine(a, max_priority=5.0)
    assert eng.round.lease(0, 4) == 4
    chan = a["chan"][:, :, 0]
    a["publish"][0, :3] = [0, 1, 0]
    chan[0, Chan.PUB_TAIL] = 3
    assert eng.round.drain() == (0, [(0, "it published slot 0 twice")])
    a["publish"][0, :3] = [0, 1, 2]
    a["priority"][1] = float("nan")
    n, refused = eng.round.drain()
    assert refused == [
        (
            0,
            "it published priority nan for slot 1; priorities must be finite, >= 0 and at most 5.0",
        )
    ]
    a["priority"][1] = 1.0
    a["publish"][0, 2] = 9
    assert eng.round.drain()[1] == [
        (0, "it published slot 9, which is not leased to it (state 0, owner channel -1)")
    ]
    a["publish"][0, 2] = 10
    assert eng.round.drain()[1] == [(0, "it published slot index 10, outside 0..9")]
    chan[0, Chan.PUB_TAIL] = -(2**63)
    assert eng.round.drain()[1] == [
        (0, f"its publish ring's tail ({-(2**63)}) is behind its head (0)")
    ]
    chan[0, Chan.PUB_TAIL] = 5
    assert eng.round.drain()[1] == [
        (
            0,
            "its publish ring's tail (5) is 5 ahead of its head (0), but it holds 4 leased "
            f"slot(s) (ring capacity {PUBLISH_CAPACITY})",
        )
    ]
    a["publish"][0, :3] = [2, 1, 0]
    chan[0, Chan.PUB_TAIL] = 3
    a["gen"][[0, 1, 2]] = 2
    n, refused = eng.round.drain()
    assert (n, refused) == (3, None)
    assert eng.table.commit(eng.out_slots[:n], eng.out_prios[:n]) == 3
    assert eng.round.finish() == 1
    assert chan[0, Chan.PUB_HEAD] == 3 and a["outstanding"][0] == 1
    assert list(a["seq"][[2, 1, 0]]) == [0, 1, 2]
    assert not eng.round.pending()


def test_a_corrupt_free_ring_is_refused_and_nothing_changes():
    a = make_arrays(8, 1)
    eng = Engine(a)
    before = {k: v.copy() for k, v in a.items()}
    for head, tail, free in (
        (-1, 3, None),
        (5, 3, None),
        (0, 9, None),
        (0, 8, [0, 1, 1, 3, 4, 5, 6, 7]),
        (0, 8, [0, 1, 2, 99, 4, 5, 6, 7]),
    ):
        a["ctrl"][Ctrl.FREE_HEAD, 0], a["ctrl"][Ctrl.FREE_TAIL, 0] = head, tail
        if free is not None:
            a["free"][:] = free
        snapshot = {k: v.copy() for k, v in a.items()}
        assert eng.round.lease(0, 8) == -1
        assert_same(a, snapshot)
        a["free"][:] = before["free"]
    a["ctrl"][Ctrl.FREE_HEAD, 0], a["ctrl"][Ctrl.FREE_TAIL, 0] = 0, 8
    a["state"][3] = SlotState.READY  # listed free, but not free
    assert eng.round.lease(0, 8) == -1


def test_a_million_slots_many_channels():
    num_slots, clients = 1 << 20, 64
    ea, ma = make_arrays(num_slots, clients), make_arrays(num_slots, clients)
    eng, model = Engine(ea), model_of(ma)
    rng = np.random.default_rng(7)
    for _ in range(3):
        for c in range(clients):
            n = LEASE_CAPACITY - int(ea["lease_tail"][c] - ea["chan"][c, Chan.LEASE_HEAD, 0])
            assert eng.round.lease(c, n) == model.round_lease(c, n)
        for c in range(clients):
            state = rng.bit_generator.state
            publish(ea, c, rng, None, c + 1)
            rng.bit_generator.state = state
            publish(ma, c, rng, None, c + 1)
        n, refused = eng.round.drain()
        slots, prios, mrefused = model.drain()
        assert refused is None and mrefused == [] and n == len(slots)
        k = eng.table.commit(eng.out_slots[:n], eng.out_prios[:n])
        assert k == len(model.commit_meta(slots, prios)[0])
        assert eng.round.finish() == model.finish()
        assert_same(ea, ma)


CRASH_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from tests.test_engine_commit import Engine, make_arrays
    rng = np.random.default_rng(SEED)
    for trial in range(200):
        a = make_arrays(int(rng.integers(1, 300)), int(rng.integers(1, 5)))
        eng = Engine(a)
        for c in range(len(a["active"])):
            eng.round.lease(c, 50)
        for k in ("ctrl", "key", "state", "priority", "times_sampled", "seq", "gen", "owner",
                  "episode", "free", "chan", "lease", "publish"):
            raw = a[k].view(np.uint8).reshape(-1)
            raw[:] = rng.integers(0, 256, len(raw), dtype=np.uint8)
            if rng.random() < 0.5:  # plausible-looking values too
                a[k].reshape(-1)[:] = rng.integers(-3, 400, a[k].size).astype(a[k].dtype)
        eng.round.pending()
        eng.round.wanting()
        n, refused = eng.round.drain()
        if n:
            eng.table.commit(eng.out_slots[:n], eng.out_prios[:n])
        eng.round.finish()
        for c in range(len(a["active"])):
            eng.round.lease(c, int(rng.integers(0, 3000)))
        eng.round.waiters()
    print("ok")
    """
)


@pytest.mark.parametrize("seed", [0, 1])
def test_garbage_in_every_shared_array_never_crashes(seed):
    out = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT.replace("SEED", str(seed))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_wanting_lists_writers_and_decides_the_refill_at_half():
    a = make_arrays(100, 3)
    eng = Engine(a)
    chan = a["chan"][:, :, 0]
    assert eng.round.wanting() == [] and eng.round.wanting(64) == []
    chan[0, Chan.WANT_LEASE] = 1
    chan[2, Chan.WANT_LEASE] = 5
    a["lease_tail"][[0, 2]] = 20
    chan[[0, 2], Chan.LEASE_HEAD] = [12, 4]  # they hold 8 and 16
    assert eng.round.wanting() == [(0, 1, 8), (2, 5, 16)]
    # headroom 64 over 2 writers: a share of 16, refilled at 8 or less
    assert eng.round.wanting(64) == [(0, 1, 8), (2, 5, 16)]
    chan[0, Chan.LEASE_HEAD] = 11  # holds 9
    assert eng.round.wanting(64) == []
    chan[2, Chan.LEASE_HEAD] = -(2**63)  # hostile: passed on for the daemon to refuse
    assert eng.round.wanting(64)[1][0] == 2
    chan[2, Chan.LEASE_HEAD] = 4
    chan[0, Chan.WANT_LEASE] = -3
    assert eng.round.wanting(64)[0] == (0, -3, 9)
    a["active"][0] = False
    assert eng.round.wanting() == [(2, 5, 16)]


def test_items_trickling_in_are_committed_within_a_nap_without_flush(daemon_factory):
    """The commit policy: while a writer is active the daemon naps between rounds (it is not
    woken per item), and what was published is still committed within about a nap."""
    import time

    import shmreplay
    from shmreplay.daemon.commit_loop import ACTIVE_SLEEP_S
    from shmreplay.testing import table_toml

    d = daemon_factory("\n" + table_toml(max_size=10_000))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        row = {"obs": np.zeros(8, np.float32), "action": 1, "reward": 0.5, "done": False}
        t.insert(row)
        t.flush()
        worst = []
        for _ in range(50):
            t.insert(row)
            start = time.perf_counter()
            while int(t._chan[Chan.PUB_HEAD]) < t._w.pub_tail:
                time.sleep(50e-6)
            worst.append(time.perf_counter() - start)
            time.sleep(0.001)
        # a nap is ACTIVE_SLEEP_S; generous for a loaded machine, far below IDLE_SLEEP_S
        assert np.median(worst) < 10 * ACTIVE_SLEEP_S, worst
        assert t.info().current_size == 51


# -- the whole commit in one call: metadata, both selectors, eviction ------------------------

KINDS = ["uniform", "prioritized", "fifo", "lifo", "min_heap", "max_heap"]
EXPONENT = 0.6


def selector_pair(kind: str, num_slots: int):
    """(engine selector, its arrays, reference selector over a copy, the copy's arrays)."""
    from shmreplay.config import SelectorSpec
    from shmreplay.engine.selectors import selector_class
    from tests.reference import ordered_selectors as ro
    from tests.reference import random_selectors as rr

    cls = selector_class(kind)
    spec = SelectorSpec(kind, EXPONENT)
    arrays = {name: np.zeros(shape, dtype) for name, dtype, shape in cls.array_specs(num_slots)}
    engine = cls(arrays, spec, num_slots)
    engine.clear()
    copy = {k: v.copy() for k, v in arrays.items()}
    if kind == "uniform":
        model = rr.UniformModel(copy)
    elif kind == "prioritized":
        model = rr.PrioritizedModel(copy, num_slots, EXPONENT)
    else:
        names = {"fifo": "Fifo", "lifo": "Lifo", "min_heap": "MinHeap", "max_heap": "MaxHeap"}
        model = getattr(ro, names[kind])(copy, spec, num_slots)
    return engine, arrays, model, copy


class Full:
    """A table's commit arrays and its two selectors, on the engine and on the reference."""

    def __init__(self, num_slots: int, sampler: str, remover: str, max_size: int, seed: int):
        from tests.reference.commit import FullCommitModel

        self.kinds = [sampler, remover]
        self.a = make_arrays(num_slots, 2)
        self.b = {k: v.copy() for k, v in self.a.items()}
        self.eng = Engine(self.a)
        s_eng, s_arr, s_model, s_copy = selector_pair(sampler, num_slots)
        r_eng, r_arr, r_model, r_copy = selector_pair(remover, num_slots)
        self.sel_a, self.sel_b = [s_arr, r_arr], [s_copy, r_copy]
        self.selectors = (s_eng, r_eng)  # kept alive (the capsules hold them too)
        self.eng.table.attach(s_eng._c_selector(), r_eng._c_selector(), _native.Rng(seed), max_size)
        self.model = FullCommitModel(
            model_of(self.b), s_model, r_model, _native.Rng(seed), max_size
        )

    def same(self) -> None:
        assert_same(self.a, self.b)
        for x, y in zip(self.sel_a, self.sel_b, strict=True):
            assert_same(x, y)


def run_full(seed: int, num_slots: int, sampler: str, remover: str, max_size: int, steps: int):
    rng = np.random.default_rng(seed)
    f = Full(num_slots, sampler, remover, max_size, seed)
    a, b = f.a, f.b
    out = np.empty(num_slots, np.int64)
    for _ in range(steps):
        c = int(rng.integers(0, 2))
        n = int(rng.integers(0, max(2, num_slots // 3)))
        k = f.eng.table.lease(c, n, out)
        got = f.model.m.lease_pop(c, n)
        assert k == len(got) and np.array_equal(out[:k], got)
        leased = np.flatnonzero(a["state"] == SlotState.LEASED)
        if len(leased) == 0:
            continue
        # Writers fill their slots: priorities (zeros and repeats too), episodes, generations
        # (an odd one: a write in progress, not committed).
        prios = rng.choice([0.0, 1.0, 2.5, 1e-3, 7.0], len(leased))
        gens = a["gen"][leased] + rng.choice([2, 2, 2, 1], len(leased))
        eps = rng.integers(0, 4, len(leased))
        for x in (a, b):
            x["priority"][leased], x["gen"][leased], x["episode"][leased] = prios, gens, eps
        pick = rng.permutation(leased)[: int(rng.integers(0, len(leased) + 1))]
        if rng.random() < 0.3:  # slots not leased any more: dropped by the commit
            others = np.setdiff1d(np.arange(num_slots), pick)
            pick = np.concatenate([pick, rng.choice(others, min(2, len(others)), replace=False)])
        p = a["priority"][pick].copy()
        got_k = f.eng.table.commit_all(pick.copy(), p.copy())
        want_k = f.model.commit(pick.copy(), p.copy())
        assert got_k == want_k
        if rng.random() < 0.3:  # samplers sampled some items
            ready = np.flatnonzero(a["state"] == SlotState.READY)
            hit = ready[rng.random(len(ready)) < 0.5]
            fresh = int(np.count_nonzero(a["times_sampled"][hit] == 0))
            for x in (a, b):
                x["times_sampled"][hit] += 1
                x["ctrl"][Ctrl.UNIQUE_SAMPLED, 0] += fresh
        f.same()
        assert int(a["ctrl"][Ctrl.SIZE, 0]) <= max_size
    return f


@pytest.mark.parametrize("sampler", KINDS)
@pytest.mark.parametrize("remover", KINDS)
def test_full_commit_matches_the_reference_for_every_selector_pair(sampler, remover):
    f = run_full(7, 37, sampler, remover, max_size=20, steps=40)
    assert int(f.a["ctrl"][Ctrl.TOTAL_EVICTED, 0]) > 0


@pytest.mark.parametrize("remover", KINDS)
@pytest.mark.parametrize("num_slots, max_size", [(1, 1), (2, 1), (5, 5), (64, 3), (100, 0)])
def test_full_commit_edge_sizes(remover, num_slots, max_size):
    run_full(3, num_slots, "uniform", remover, max_size, steps=25)


def test_full_commit_large():
    n = 1 << 20
    f = Full(n, "prioritized", "prioritized", n - 1000, 5)
    slots = np.empty(n, np.int64)
    for c in range(2):
        f.eng.table.lease(c, n // 2, slots[c * (n // 2) :])
    f.a["priority"][:] = np.random.default_rng(0).random(n)
    k = f.eng.table.commit_all(slots.copy(), f.a["priority"][slots].copy())
    assert k == n
    assert int(f.a["ctrl"][Ctrl.SIZE, 0]) == n - 1000
    assert int(f.a["ctrl"][Ctrl.TOTAL_EVICTED, 0]) == 1000
    assert np.count_nonzero(f.a["state"] == SlotState.FREE) == 1000


def test_the_rng_is_xoshiro256starstar_seeded_by_splitmix64():
    mask = (1 << 64) - 1

    def splitmix(x):
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return x, z ^ (z >> 31)

    def rotl(x, k):
        return ((x << k) | (x >> (64 - k))) & mask

    x, s = 12345, []
    for _ in range(4):
        x, z = splitmix(x)
        s.append(z)
    want = []
    for _ in range(5):
        r = (rotl((s[1] * 5) & mask, 7) * 9) & mask
        t = (s[1] << 17) & mask
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        want.append((r >> 11) * 2.0**-53)
    got = np.asarray(_native.Rng(12345).random(5))
    assert got.tolist() == want
    assert np.all((got >= 0) & (got < 1))


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_count_check_changes_nothing(kind):
    f = run_full(1, 30, kind, kind, max_size=12, steps=6)
    assert f.model.check(f.sel_b, f.kinds) is True
    arrays = f.sel_a[1]
    name = {"uniform": "count", "prioritized": "all.count", "fifo": "ends", "lifo": "ends"}
    name = name.get(kind, "clock")
    arrays[name].reshape(-1)[0] = -5
    before = {k: v.copy() for k, v in f.a.items()}
    before_sel = [{k: v.copy() for k, v in s.items()} for s in f.sel_a]
    leased = np.flatnonzero(f.a["state"] == SlotState.LEASED)
    assert f.model.check(f.sel_a, f.kinds) is False
    assert f.eng.table.commit_all(leased.copy(), f.a["priority"][leased].copy()) == -1
    why, _ = f.eng.table.why()
    assert why.startswith("its remover: ")
    assert_same(before, f.a)
    for x, y in zip(before_sel, f.sel_a, strict=True):
        assert_same(x, y)
    f.a["ctrl"][Ctrl.SIZE, 0] = 10**9
    assert f.eng.table.commit_all(leased.copy(), f.a["priority"][leased].copy()) == -1
    assert f.eng.table.why()[0].startswith("its size is 1000000000")


FULL_CRASH_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from shmreplay.engine.layout import Ctrl, SlotState
    from tests.test_engine_commit import Full, KINDS
    rng = np.random.default_rng(SEED)
    for sampler in KINDS:
        for remover in KINDS:
            f = Full(50, sampler, remover, 10, SEED)
            out = np.empty(50, np.int64)
            for step in range(30):
                k = f.eng.table.lease(step % 2, int(rng.integers(0, 20)), out)
                if k < 0:
                    f.a["ctrl"][Ctrl.FREE_HEAD, 0] = 0
                    continue
                leased = np.flatnonzero(f.a["state"] == SlotState.LEASED)
                f.a["gen"][leased] += 2
                # garbage in one selector array (or a counter) before committing
                arrays = f.sel_a[int(rng.integers(0, 2))]
                name = list(arrays)[int(rng.integers(0, len(arrays)))]
                flat = arrays[name].reshape(-1)
                i = rng.integers(0, len(flat), 3)
                if flat.dtype.kind == "f":
                    flat[i] = rng.choice([np.nan, np.inf, -1.0, 1e300, 0.0], 3)
                else:
                    flat[i] = rng.choice([-1, 10**12, -(2**63), 2**63 - 1, 3, 49], 3)
                code = f.eng.table.commit_all(leased.copy(), np.ones(len(leased)))
                assert code >= -2, code
                f.eng.table.why()
                if code < 0:
                    f.eng.table.evict()
    print("ok")
    """
)


@pytest.mark.parametrize("seed", [0, 1])
def test_garbage_in_the_selectors_never_crashes_the_full_commit(seed):
    out = subprocess.run(
        [sys.executable, "-c", FULL_CRASH_SCRIPT.replace("SEED", str(seed))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_commit_round_drains_commits_and_finishes_in_one_call():
    """commit_round on a free lock does what drain + commit_all + finish do; on a held lock
    (or refusals) it stops after the drain, as drain() returns."""
    from shmreplay.engine.mutex import MUTEX_NBYTES, RobustMutex

    f = Full(64, "uniform", "fifo", 40, 2)
    g = Full(64, "uniform", "fifo", 40, 2)
    buf = np.zeros(MUTEX_NBYTES + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    mbuf = buf[off : off + MUTEX_NBYTES]
    RobustMutex.initialize(mbuf)
    mutex = RobustMutex(mbuf)
    f.eng.round.set_mutex(mbuf)
    rng = np.random.default_rng(0)
    assert f.eng.round.commit_round() is None
    for step in range(30):
        for x in (f, g):
            for c in range(2):
                x.eng.round.lease(c, 20)
        for c in range(2):
            publish(f.a, c, np.random.default_rng(step), None, step + 1)
            publish(g.a, c, np.random.default_rng(step), None, step + 1)
        held = rng.random() < 0.3
        if held:
            mutex.acquire()
        res = f.eng.round.commit_round()
        n, refused = g.eng.round.drain()
        assert refused is None
        if held:
            mutex.release()
            assert res == (n, None)
            f.eng.table.commit_all(f.eng.out_slots[:n], f.eng.out_prios[:n])
            f.eng.round.finish()
        k = g.eng.table.commit_all(g.eng.out_slots[:n], g.eng.out_prios[:n])
        g.eng.round.finish()
        if not held:
            assert res == (k if n else None)
        assert_same(f.a, g.a)
        for x, y in zip(f.sel_a, g.sel_a, strict=True):
            assert_same(x, y)
    assert int(f.a["ctrl"][Ctrl.TOTAL_EVICTED, 0]) > 0


def test_settle_raises_the_flag_then_says_who_waits_and_what_is_pending():
    a = make_arrays(100, 3)
    eng = Engine(a)
    chan = a["chan"][:, :, 0]
    assert not eng.round.any_writer()
    assert eng.round.settle(1) == 0 and a["ctrl"][Ctrl.DAEMON_SLEEPING, 0] == 1
    chan[1, Chan.WANT_LEASE] = -4  # not a writer (refused later by the refill)
    assert not eng.round.any_writer()
    chan[2, Chan.WANT_LEASE] = 5
    assert eng.round.any_writer()
    a["active"][2] = False
    assert not eng.round.any_writer()
    a["active"][2] = True
    chan[0, Chan.WAIT_INSERT] = 1
    assert eng.round.settle(2) == 1 and a["ctrl"][Ctrl.DAEMON_SLEEPING, 0] == 2
    chan[0, Chan.WAIT_INSERT] = 0
    a["ctrl"][Ctrl.SAMPLER_WAITING, 0] = 1
    assert eng.round.settle(1) == 1
    a["ctrl"][Ctrl.SAMPLER_WAITING, 0] = 0
    chan[1, Chan.PUB_TAIL] = 3
    assert eng.round.settle(1) == 2


# -- the loop (shm_loop_serve) ---------------------------------------------------------------


class LoopRig:
    """A Full table served by a _native.Loop (its mutex, parameter lines, three semaphores),
    next to the reference model (FullCommitModel, refill)."""

    def __init__(self, num_slots: int, max_size: int, clients: int, headroom: int, seed: int):
        import os

        import posix_ipc

        from shmreplay.engine.layout import Param
        from shmreplay.engine.mutex import MUTEX_NBYTES, RobustMutex

        self.f = Full(num_slots, "uniform", "fifo", max_size, seed)
        if clients != 2:
            raise ValueError("Full has two channels")
        buf = np.zeros(MUTEX_NBYTES + 64, np.uint8)
        off = (-buf.ctypes.data) % 64
        self.mbuf = buf[off : off + MUTEX_NBYTES]
        RobustMutex.initialize(self.mbuf)
        self.mutex = RobustMutex(self.mbuf)
        self.f.eng.round.set_mutex(self.mbuf)
        self.params = np.zeros((Param.COUNT, LINE), np.float64)
        self.params_b = self.params[:, 0]  # the model reads the same lines
        from shmreplay.config import RateLimiterSpec
        from shmreplay.engine.ratelimit import RateLimiter

        RateLimiter.initialize(RateLimiterSpec.min_size(1), self.params_b)
        self.sems = []
        try:
            for kind in ("wake", "sample", "insert"):
                name = f"/shmreplay-test-loop-{os.getpid()}-{id(self)}-{kind}"
                self.sems.append(posix_ipc.Semaphore(name, posix_ipc.O_CREX))
            self.attention = np.zeros(1, np.int64)
            self.loop = _native.Loop(self.sems[0].name, self.attention, 0.002, 0.1, 0.05)
            self.loop.add(
                self.f.eng.round,
                self.params.reshape(-1),
                headroom,
                self.sems[1].name,
                self.sems[2].name,
            )
        except BaseException:
            self.close()
            raise
        self.headroom = headroom
        self.state = {"rotation": 0, "starved": 0}

    def close(self) -> None:
        for s in self.sems:
            s.unlink()
            s.close()
        self.sems = []


@pytest.fixture
def rig():
    made = []

    def make(*args, **kwargs) -> LoopRig:
        made.append(LoopRig(*args, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


def random_limiter(rng, params: np.ndarray, ctrl_a: np.ndarray, ctrl_b: np.ndarray) -> None:
    import warnings

    from shmreplay.config import RateLimiterSpec
    from shmreplay.engine.ratelimit import RateLimiter

    kind = rng.integers(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == 0:
            spec = RateLimiterSpec.min_size(1)
        elif kind == 1:
            spec = RateLimiterSpec.queue(int(rng.integers(1, 3000)))
        elif kind == 2:
            spi = float(rng.choice([0.5, 1.0, 2.5]))
            spec = RateLimiterSpec.sample_to_insert_ratio(spi, 10, float(rng.uniform(5, 4000)))
        else:
            spec = RateLimiterSpec.custom(
                float(rng.uniform(0.1, 4)), 1, -math.inf, float(rng.uniform(0, 5000))
            )
    RateLimiter.initialize(spec, params)
    # The limiter's counters move under the samplers too: the same random moves on both.
    samples = int(rng.integers(0, 4 * int(ctrl_a[Ctrl.INSERTS, 0]) + 10))
    ctrl_a[Ctrl.SAMPLES, 0] = ctrl_b[Ctrl.SAMPLES, 0] = samples


@pytest.mark.parametrize("seed", range(6))
def test_the_loop_matches_the_reference_round_and_refill(rig, seed):
    """One loop pass (serve with a past deadline: the rounds, no sleep) against the model's
    drain, full commit, finish and refill (Daemon._refill's rules: headroom shared, refill at
    half, the limiter's budget with the quarter rule, rotation); every array compared, and a
    hand-over to Python exactly where the model refuses (a negative want).

    Mutation proof (applied by hand to commit.c's loop_refill and reverted): half instead of
    a quarter of the budget shared out ahead fails 6 seeds; refilling below half instead of at
    half fails one."""
    from tests.reference.commit import refill

    rng = np.random.default_rng(seed)
    r = rig(3000, 1500, 2, int(rng.choice([64, 500, 8192])), seed)
    f = r.f
    chan_a, chan_b = f.a["chan"][:, :, 0], f.b["chan"][:, :, 0]
    limited_steps = 0
    for step in range(120):
        if step % 10 == 0:
            random_limiter(rng, r.params[:, 0], f.a["ctrl"], f.b["ctrl"])
        for c in range(2):
            want = int(
                rng.choice([0, 1, int(rng.integers(1, 300)), 5000, -3 if step % 37 == 36 else 0])
            )
            chan_a[c, Chan.WANT_LEASE] = chan_b[c, Chan.WANT_LEASE] = want
            publish(f.a, c, np.random.default_rng(step * 2 + c), None, step + 1)
            publish(f.b, c, np.random.default_rng(step * 2 + c), None, step + 1)
        code, i, res = r.loop.serve(0.0)
        m = f.model.m
        slots, prios, refused = m.drain()
        assert refused == []
        k = f.model.commit(slots, prios) if len(slots) else 0
        m.finish()
        leased = refill(m, r.params_b, r.headroom, r.state)
        limited_steps += r.params[3, 0] != math.inf
        if leased is None:
            assert (code, i, res) == (_native.LOOP_TABLE, 0, None)
            chan_a[:, Chan.WANT_LEASE] = chan_b[:, Chan.WANT_LEASE] = 0  # as a cut-off would
        else:
            assert code == _native.LOOP_DEADLINE, (code, res)
        del k
        f.same()
    assert limited_steps > 0 and int(f.a["ctrl"][Ctrl.TOTAL_EVICTED, 0]) > 0


def test_the_loop_hands_refused_runs_and_a_busy_lock_to_python(rig):
    r = rig(200, 100, 2, 64, 1)
    f = r.f
    chan = f.a["chan"][:, :, 0]
    chan[:, Chan.WANT_LEASE] = 10
    assert r.loop.serve(0.0)[0] == _native.LOOP_DEADLINE
    assert list(f.a["lease_tail"]) == [16, 16]  # headroom 64, shared by two, refilled at half
    publish(f.a, 0, np.random.default_rng(1), "twice", 1)
    code, i, (n, refused) = r.loop.serve(0.0)
    assert code == _native.LOOP_TABLE and i == 0 and refused[0][0] == 0
    assert "twice" in refused[0][1]
    f.a["pub_head"][0] = chan[0, Chan.PUB_HEAD] = chan[0, Chan.PUB_TAIL]  # as a cut-off
    f.a["outstanding"][0] = 0
    publish(f.a, 1, np.random.default_rng(2), None, 1)
    drained = int(chan[1, Chan.PUB_TAIL])
    r.mutex.acquire()
    try:
        assert r.loop.serve(0.0) == (_native.LOOP_TABLE, 0, (drained, None))
    finally:
        r.mutex.release()
    # Python commits and finishes (here: the engine's own calls) and the loop goes on.
    f.eng.table.commit_all(f.eng.out_slots[:drained], f.eng.out_prios[:drained])
    f.eng.round.finish()
    assert r.loop.serve(0.0)[0] == _native.LOOP_DEADLINE


def test_the_loop_posts_waiters_naps_and_answers_attention(rig):
    import time

    r = rig(200, 100, 2, 64, 3)
    f = r.f
    chan = f.a["chan"][:, :, 0]
    chan[0, Chan.WANT_LEASE] = 10
    r.loop.serve(0.0)
    publish(f.a, 0, np.random.default_rng(5), None, 1)
    while int(chan[0, Chan.PUB_TAIL]) == 0:  # publish() may publish nothing
        publish(f.a, 0, np.random.default_rng(int(time.time_ns())), None, 1)
    chan[1, Chan.WAIT_SAMPLE] = 1
    chan[1, Chan.WAIT_INSERT] = 1
    r.loop.serve(0.0)
    assert r.sems[1].value == 1 and r.sems[2].value == 1  # a sampler and a writer woken
    assert int(chan[0, Chan.PUB_HEAD]) == int(chan[0, Chan.PUB_TAIL])
    # Nothing to do: it sleeps (idle: nobody wants leases) until the deadline.
    chan[:, Chan.WANT_LEASE] = 0
    t0 = time.monotonic()
    assert r.loop.serve(t0 + 0.03)[0] == _native.LOOP_DEADLINE
    assert 0.025 <= time.monotonic() - t0 < 0.5
    assert f.a["ctrl"][Ctrl.DAEMON_SLEEPING, 0] == 0  # awake again
    # Attention set and wake posted: back at once.
    r.attention[0] = 1
    r.sems[0].release()
    t0 = time.monotonic()
    assert r.loop.serve(t0 + 5)[0] == _native.LOOP_ATTENTION
    assert time.monotonic() - t0 < 1
    rounds, naps = r.loop.statistics()
    assert rounds >= 4 and naps >= 1
