"""The compiled ordered selectors (csrc/order.c, csrc/heap.c) against the numpy reference model
(tests/reference/ordered_selectors.py): the same random operation sequences through both, every
result and every shared array compared exactly; garbage in the shared arrays gives
CorruptStructure, never a crash."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from shmreplay.config import SelectorSpec
from shmreplay.engine.selectors import selector_class
from shmreplay.engine.selectors.base import CorruptStructure
from tests.reference import ordered_selectors as model

KINDS = ("fifo", "lifo", "min_heap", "max_heap")
MODEL = {
    "fifo": model.Fifo,
    "lifo": model.Lifo,
    "min_heap": model.MinHeap,
    "max_heap": model.MaxHeap,
}
RNG = np.random.default_rng(0)


def make(cls, kind: str, num_slots: int):
    arrays = {n: np.zeros(shape, dt) for n, dt, shape in cls.array_specs(num_slots)}
    sel = cls(arrays, SelectorSpec(kind), num_slots)
    sel.clear()
    return sel


def pair(kind: str, num_slots: int):
    return make(selector_class(kind), kind, num_slots), make(MODEL[kind], kind, num_slots)


def assert_same_arrays(engine, reference, what=""):
    assert engine.arrays.keys() == reference.arrays.keys()
    for name, arr in engine.arrays.items():
        assert np.array_equal(arr, reference.arrays[name]), f"{what}: array {name!r} differs"


def both(engine, reference, op: str, *args):
    got = getattr(engine, op)(*args)
    want = getattr(reference, op)(*args)
    return got, want


class Items:
    """The table's view: which slots hold items, in insertion order."""

    def __init__(self, num_slots: int, rng: np.random.Generator) -> None:
        self.num_slots, self.rng = num_slots, rng
        self.present: list[int] = []
        self.prio: dict[int, float] = {}

    def free(self, k: int) -> np.ndarray:
        free = np.setdiff1d(np.arange(self.num_slots), self.present)
        return self.rng.permutation(free)[:k]

    def priorities(self, k: int) -> np.ndarray:
        # Few distinct values (ties decided by touch), zeros included.
        return self.rng.integers(0, 4, k).astype(np.float64) * 0.5


def run_sequence(kind: str, num_slots: int, steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    engine, reference = pair(kind, num_slots)
    items = Items(num_slots, rng)
    times = np.zeros(num_slots, np.int64)

    def times_left(c: np.ndarray) -> np.ndarray:
        return 1 + (c + times[c]) % 3

    for step in range(steps):
        op = rng.choice(
            ["insert", "update", "remove", "first", "sample", "rebuild", "clear"],
            p=[0.3, 0.15, 0.2, 0.15, 0.1, 0.05, 0.05],
        )
        what = f"{kind} slots={num_slots} seed={seed} step={step} {op}"
        if op == "insert":
            k = int(rng.integers(0, max(2, num_slots // 3) + 1))
            slots = items.free(k)
            p = items.priorities(len(slots))
            both(engine, reference, "insert", slots, p)
            items.present += slots.tolist()
            items.prio.update(zip(slots.tolist(), p.tolist(), strict=True))
        elif op == "update" and items.present:
            k = int(rng.integers(1, 2 * len(items.present) + 1))
            slots = rng.choice(items.present, k)  # repeats: the last one wins
            p = items.priorities(k)
            both(engine, reference, "update", slots, p)
            items.prio.update(zip(slots.tolist(), p.tolist(), strict=True))
        elif op == "remove" and items.present:
            k = int(rng.integers(0, len(items.present) + 1))
            slots = rng.permutation(items.present)[:k]
            both(engine, reference, "remove", slots)
            gone = set(slots.tolist())
            items.present = [s for s in items.present if s not in gone]
        elif op == "first":
            n = int(rng.choice([0, 1, 2, 3, 16, 17, 255, 256, num_slots, num_slots + 5]))
            got, want = both(engine, reference, "victims", n, None)
            assert got.dtype == np.int64 and np.array_equal(got, want), what
        elif op == "sample":
            n = int(rng.integers(0, 40))
            tl = None if rng.random() < 0.5 else times_left
            (gs, gp), (ws, wp) = both(engine, reference, "sample", n, None, tl)
            assert np.array_equal(gs, ws) and np.array_equal(gp, wp), what
            times[gs] += 1
        elif op == "rebuild":
            slots = np.array(items.present, np.int64)
            p = np.array([items.prio[s] for s in items.present], np.float64)
            both(engine, reference, "rebuild", slots, p)
        elif op == "clear":
            both(engine, reference, "clear")
            items.present, items.prio = [], {}
        assert_same_arrays(engine, reference, what)
        assert engine.check(len(items.present)) is None, what


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_slots", [1, 2, 7, 16, 17, 100, 257, 1000])
def test_random_sequences_match_the_model(kind, num_slots):
    for seed in range(3):
        run_sequence(kind, num_slots, steps=60, seed=seed)


@pytest.mark.parametrize("kind", KINDS)
def test_many_small_batches_compact_the_ring_and_keep_the_order(kind):
    """Single-item inserts and removes far from the ends: compactions (Fifo/Lifo), paths
    recomputed node by node (heaps), at a size whose levels are not all 16-ary."""
    rng = np.random.default_rng(7)
    num_slots = 4097
    engine, reference = pair(kind, num_slots)
    present: list[int] = []
    for i in range(3000):
        if present and (len(present) == num_slots or rng.random() < 0.45):
            s = present.pop(int(rng.integers(len(present))))
            both(engine, reference, "remove", np.array([s]))
        else:
            s = int(rng.choice(np.setdiff1d(np.arange(num_slots), present)[:50]))
            both(engine, reference, "insert", np.array([s]), np.array([float(i % 5)]))
            present.append(s)
        if i % 97 == 0:
            got, want = both(engine, reference, "victims", 7, None)
            assert np.array_equal(got, want)
    assert_same_arrays(engine, reference, kind)


@pytest.mark.parametrize("kind", ["min_heap", "max_heap"])
@pytest.mark.parametrize("num_slots", [17, 4096])
def test_heap_walks_in_a_full_tree_match_the_model(kind, num_slots):
    """A full tree, few distinct priorities and both zeros (-0.0 and 0.0 tie, but their bits
    differ, and an inner node copies its winner's bits): updates, removals and inserts one at a
    time and in batches, so that the engine's walks stop, replace a parent or recompute a row,
    each compared with the model's recomputation of every ancestor."""
    rng = np.random.default_rng(11)
    engine, reference = pair(kind, num_slots)
    values = np.array([-0.0, 0.0, 1.0, -1.0, 2.5])
    present = rng.permutation(num_slots)
    both(engine, reference, "insert", present, rng.choice(values, num_slots))
    assert_same_arrays(engine, reference, "fill")
    for step in range(300):
        if len(present) < num_slots // 2:  # refill
            free = np.setdiff1d(np.arange(num_slots), present)
            both(engine, reference, "insert", free, rng.choice(values, len(free)))
            present = np.arange(num_slots)
        k = 1 if step % 2 else int(rng.integers(2, 40))
        slots = rng.choice(present, k)  # repeats: the last one wins
        op = step % 3
        if op == 0:
            both(engine, reference, "update", slots, rng.choice(values, k))
        else:
            gone = np.unique(slots)
            both(engine, reference, "remove", gone)
            if op == 2:
                both(engine, reference, "insert", gone, rng.choice(values, len(gone)))
            else:
                present = np.setdiff1d(present, gone)
                both(engine, reference, "insert", gone[:1], rng.choice(values, 1))
                present = np.union1d(present, gone[:1])
        assert_same_arrays(engine, reference, f"{kind} step {step}")
        if step % 25 == 0:
            got, want = both(engine, reference, "victims", 50, None)
            assert np.array_equal(got, want), step


@pytest.mark.parametrize("kind", ["min_heap", "max_heap"])
def test_a_million_slots_heap_matches_the_model(kind):
    rng = np.random.default_rng(1)
    num_slots = 1 << 20
    engine, reference = pair(kind, num_slots)
    slots = rng.permutation(num_slots)
    prios = rng.integers(0, 1000, num_slots).astype(np.float64)
    present = slots[:1_000_000]
    both(engine, reference, "insert", present, prios[: len(present)])
    assert_same_arrays(engine, reference, "fill")
    for r in range(20):
        batch = rng.choice(present, 256, replace=False)
        both(engine, reference, "update", batch, rng.integers(0, 1000, 256).astype(np.float64))
        both(engine, reference, "remove", batch[:128])
        both(engine, reference, "insert", batch[:128], np.full(128, float(r)))
        n = int(rng.choice([1, 256, 5000]))
        got, want = both(engine, reference, "victims", n, None)
        assert np.array_equal(got, want), n
    assert_same_arrays(engine, reference, "ops")
    both(engine, reference, "rebuild", present, prios[: len(present)])
    assert_same_arrays(engine, reference, "rebuild")


@pytest.mark.parametrize("kind", ["fifo", "lifo"])
def test_a_million_slots_ring_matches_the_model(kind):
    rng = np.random.default_rng(2)
    num_slots = 1 << 20
    engine, reference = pair(kind, num_slots)
    present = rng.permutation(num_slots)
    both(engine, reference, "insert", present, np.zeros(num_slots))
    for _ in range(5):
        gone = rng.choice(num_slots, 300_000, replace=False)
        gone = present[gone]
        both(engine, reference, "remove", gone)
        both(engine, reference, "insert", gone, np.zeros(len(gone)))  # compacts
        got, want = both(engine, reference, "victims", 1000, None)
        assert np.array_equal(got, want)
    assert_same_arrays(engine, reference, kind)


# -- hostile shared memory ----------------------------------------------------------------------


def test_ring_garbage_gives_corrupt_structure():
    fifo, _ = pair("fifo", 10)
    fifo.insert(np.arange(5), np.zeros(5))
    fifo.order[2] = 10**9
    fifo.remove(np.array([0, 1]))
    with pytest.raises(CorruptStructure):
        fifo.victims(3, None)
    fifo.rebuild(np.arange(5), np.zeros(5))
    fifo.ends[1] = -5  # tail behind the head
    with pytest.raises(CorruptStructure):
        fifo.sample(1, None, None)
    with pytest.raises(CorruptStructure):
        fifo.insert(np.array([7]), np.zeros(1))
    fifo.rebuild(np.arange(5), np.zeros(5))
    fifo.pos[3] = 8  # says slot 3 is where it is not
    with pytest.raises(CorruptStructure):
        fifo.remove(np.array([2, 3]))
    assert fifo.victims(5, None).tolist() == [0, 1, 2, 3, 4]  # nothing was changed
    lifo, _ = pair("lifo", 10)
    lifo.insert(np.arange(5), np.zeros(5))
    lifo.order[4] = -7
    with pytest.raises(CorruptStructure):
        lifo.victims(1, None)


def test_ring_compaction_that_cannot_make_room_is_corrupt():
    """Live entries repeated (garbage) fill the ring: the compaction an insert needs cannot make
    room for it, and the insert changes nothing instead of overwriting live entries."""
    fifo, _ = pair("fifo", 4)  # a ring of 8 entries
    fifo.order[:] = 2
    fifo.ends[0], fifo.ends[1] = 0, 8
    with pytest.raises(CorruptStructure):
        fifo.insert(np.array([3]), np.zeros(1))
    assert fifo.order.tolist() == [2] * 8 and fifo.ends.tolist() == [0, 8]


def test_heap_garbage_gives_corrupt_structure():
    heap, _ = pair("min_heap", 10)  # 16 leaves: 6 of them padding
    heap.insert(np.arange(5), np.arange(5.0))
    heap.slot[-1] = 99  # the root's winner
    with pytest.raises(CorruptStructure):
        heap.sample(3, None, None)
    heap.rebuild(np.arange(5), np.arange(5.0))
    heap.key[12] = -1.0  # a padding leaf holding an item
    heap.update(np.array([1]), np.array([2.0]))
    with pytest.raises(CorruptStructure):
        heap.victims(2, None)
    heap.rebuild(np.arange(5), np.arange(5.0))
    heap.key[3] = np.nan
    heap.remove(np.array([0]))
    with pytest.raises(CorruptStructure):
        heap.victims(4, None)
    heap.arrays["clock"][0] = -3
    assert heap.check(5) is not None
    with pytest.raises(CorruptStructure):
        heap.insert(np.array([6]), np.ones(1))
    heap.rebuild(np.arange(5), np.arange(5.0))  # a bad clock counts as 0
    assert heap.check(5) is None and heap.victims(5, None).tolist() == [0, 1, 2, 3, 4]


def test_slots_out_of_range_are_refused():
    for kind in KINDS:
        sel, _ = pair(kind, 10)
        with pytest.raises(IndexError):
            sel.insert(np.array([10]), np.ones(1))
        with pytest.raises(IndexError):
            sel.remove(np.array([-1]))


GARBAGE_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from shmreplay.config import SelectorSpec
    from shmreplay.engine.selectors import selector_class
    from shmreplay.engine.selectors.base import CorruptStructure

    rng = np.random.default_rng(5)
    outcomes = {"ok": 0, "corrupt": 0}
    for trial in range(400):
        kind = ["fifo", "lifo", "min_heap", "max_heap"][trial % 4]
        num_slots = int(rng.choice([1, 3, 17, 300]))
        cls = selector_class(kind)
        arrays = {n: np.zeros(s, d) for n, d, s in cls.array_specs(num_slots)}
        sel = cls(arrays, SelectorSpec(kind), num_slots)
        sel.clear()
        k = int(rng.integers(0, num_slots + 1))
        sel.insert(rng.permutation(num_slots)[:k], rng.random(k))
        for arr in arrays.values():  # garbage in a few places, or everywhere
            flat = arr.reshape(-1)
            idx = rng.integers(0, len(flat), int(rng.integers(1, len(flat) + 1)))
            if flat.dtype == np.float64:
                flat[idx] = rng.choice([np.nan, -np.inf, np.inf, -1e300, 0.0, 5.0], len(idx))
            else:
                flat[idx] = rng.choice(
                    [-(2**63), -2, -1, 0, 1, num_slots, 2 * num_slots, 2**62, 2**63 - 1],
                    len(idx),
                )
        present = rng.permutation(num_slots)[: int(rng.integers(0, num_slots + 1))]
        for op in range(6):
            try:
                choice = op % 6
                if choice == 0:
                    sel.victims(int(rng.integers(0, num_slots + 2)), None)
                elif choice == 1:
                    sel.sample(4, None, lambda c: np.ones(len(c), np.int64))
                elif choice == 2:
                    sel.remove(present[:2])
                elif choice == 3:
                    sel.insert(present[:3], np.ones(len(present[:3])))
                elif choice == 4:
                    sel.update(present[:3], np.ones(len(present[:3])))
                else:
                    sel.sample(1, None, None)
                outcomes["ok"] += 1
            except CorruptStructure:
                outcomes["corrupt"] += 1
        sel.rebuild(present, np.ones(len(present)))
        assert sorted(sel.victims(num_slots, None).tolist()) == sorted(present.tolist())
    print(outcomes)
    """
)


def test_garbage_in_every_array_never_crashes():
    """Random garbage in the shared arrays: each operation succeeds or raises CorruptStructure,
    and rebuild() recovers. In a subprocess, so that a segfault fails the test."""
    done = subprocess.run(
        [sys.executable, "-c", GARBAGE_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'corrupt'" in done.stdout


@pytest.mark.parametrize("kind", ["min_heap", "max_heap"])
def test_first_with_every_key_equal_matches_the_model(kind):
    """One priority for every item: touches alone order them (the selection's worst case for
    ties); equal touches too (only corruption makes them) still give n distinct items."""
    engine, reference = pair(kind, 5000)
    slots = np.random.default_rng(4).permutation(5000)[:4321]
    both(engine, reference, "insert", slots, np.ones(len(slots)))
    for n in (2, 17, 256, 1000, 4321, 5000):
        got, want = both(engine, reference, "victims", n, None)
        assert np.array_equal(got, want), n
    engine.touch[:] = 7
    engine.arrays["clock"][0] = 10
    got = engine.victims(1000, None)
    assert len(got) == 1000 and len(np.unique(got)) == 1000
