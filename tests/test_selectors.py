"""Lifo, MinHeap and MaxHeap: unit tests on plain numpy arrays, a differential test against a
one-item-at-a-time Python model, and end-to-end checks through a real daemon."""

from __future__ import annotations

import numpy as np
import pytest

import shmreplay
from shmreplay.config import SelectorSpec
from shmreplay.engine.selectors import selector_class
from shmreplay.engine.selectors.base import Selector
from shmreplay.testing import STAMPED_SIGNATURE, stamped_row, table_toml

RNG = np.random.default_rng(0)  # deterministic selectors ignore it
ORDERED_KINDS = ("fifo", "lifo", "min_heap", "max_heap")


def make(kind: str, num_slots: int = 64) -> Selector:
    """A selector over zeroed arrays, cleared as a new table clears it."""
    cls = selector_class(kind)
    arrays = {name: np.zeros(shape, dtype) for name, dtype, shape in cls.array_specs(num_slots)}
    sel = cls(arrays, SelectorSpec(kind), num_slots)
    sel.clear()
    return sel


def ids(*slots: int) -> np.ndarray:
    return np.array(slots, dtype=np.int64)


def prios(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def order(sel: Selector) -> list[int]:
    """Every item, in the order the selector picks them."""
    return sel.victims(sel.num_slots, RNG).tolist()


def times_left_from(left: dict[int, int]):
    return lambda slots: np.array([left[int(s)] for s in slots], dtype=np.int64)


# -- Lifo ----------------------------------------------------------------------------------------


def test_lifo_picks_the_newest_and_skips_holes():
    sel = make("lifo")
    sel.insert(ids(5, 2, 9), prios(1, 1, 1))
    sel.insert(ids(7), prios(1))
    assert order(sel) == [7, 9, 2, 5]
    slots, p = sel.sample(3, RNG, None)
    assert slots.tolist() == [7, 7, 7] and p.tolist() == [1.0, 1.0, 1.0]
    sel.remove(ids(7, 2))  # the newest and one in the middle
    assert sel.victims(5, RNG).tolist() == [9, 5]
    sel.insert(ids(3), prios(1))
    assert sel.victims(1, RNG).tolist() == [3]
    sel.remove(ids(3, 9, 5))
    assert sel.victims(1, RNG).tolist() == []
    assert sel.sample(4, RNG, None)[0].tolist() == []


def test_lifo_evicts_the_item_just_inserted():
    sel = make("lifo")
    sel.insert(ids(0, 1, 2), prios(1, 1, 1))
    sel.insert(ids(3), prios(1))  # the table inserts, then asks for a victim
    assert sel.victims(1, RNG).tolist() == [3]


def test_lifo_sample_repeats_each_item_as_often_as_it_may_still_be_sampled():
    sel = make("lifo")
    sel.insert(ids(1, 2, 3), prios(1, 1, 1))
    times_left = times_left_from({1: 2, 2: 1, 3: 3})
    assert sel.sample(5, RNG, times_left)[0].tolist() == [3, 3, 3, 2, 1]
    assert sel.sample(2, RNG, times_left)[0].tolist() == [3, 3]
    assert sel.sample(9, RNG, times_left)[0].tolist() == [3, 3, 3, 2, 1, 1]  # runs out


def test_lifo_keeps_order_across_ring_compaction():
    """Removing old items leaves holes at the head; inserting past the ring compacts them."""
    sel = make("lifo", num_slots=4)
    sel.insert(ids(0, 1, 2, 3), prios(1, 1, 1, 1))
    sel.remove(ids(0, 1))
    sel.insert(ids(1, 0), prios(1, 1))  # the ring is full of holes: compaction
    assert order(sel) == [0, 1, 3, 2]


# -- MinHeap and MaxHeap -----------------------------------------------------------------------


def test_min_heap_orders_by_priority_then_least_recently_inserted():
    sel = make("min_heap")
    sel.insert(ids(0, 1, 2, 3, 4, 5), prios(3, 1, 2, 1, 3, 1))
    assert order(sel) == [1, 3, 5, 2, 0, 4]
    slots, p = sel.sample(3, RNG, None)
    assert slots.tolist() == [1, 1, 1] and p.tolist() == [1.0, 1.0, 1.0]


def test_max_heap_is_the_mirror():
    sel = make("max_heap")
    sel.insert(ids(0, 1, 2, 3, 4, 5), prios(3, 1, 2, 1, 3, 1))
    assert order(sel) == [0, 4, 2, 1, 3, 5]


@pytest.mark.parametrize("kind", ["min_heap", "max_heap"])
def test_an_update_touches_the_item_even_at_the_same_priority(kind):
    sel = make(kind)
    sel.insert(ids(0, 1, 2), prios(1, 1, 1))
    assert order(sel) == [0, 1, 2]
    sel.update(ids(0), prios(1))
    assert order(sel) == [1, 2, 0]
    sel.update(ids(2, 1), prios(1, 1))  # touched in call order
    assert order(sel) == [0, 2, 1]


def test_repeated_slots_in_one_update_the_last_wins_and_touches_there():
    sel = make("min_heap")
    sel.insert(ids(0, 1, 2, 3), prios(1, 1, 1, 1))
    sel.update(ids(1, 2, 1), prios(0.5, 1, 1))  # 1 ends at priority 1, touched after 2
    assert order(sel) == [0, 3, 2, 1]
    sel.update(ids(3, 3), prios(9, 0.25))
    assert order(sel)[0] == 3


def test_heap_sample_with_times_left_goes_best_first():
    sel = make("max_heap")
    sel.insert(ids(4, 5, 6), prios(1, 9, 5))
    times_left = times_left_from({4: 1, 5: 2, 6: 2})
    assert sel.sample(4, RNG, times_left)[0].tolist() == [5, 5, 6, 6]
    assert sel.sample(8, RNG, times_left)[0].tolist() == [5, 5, 6, 6, 4]


@pytest.mark.parametrize("kind", ["min_heap", "max_heap"])
def test_remove_arbitrary_items_then_clear(kind):
    sel = make(kind)
    sel.insert(ids(0, 1, 2, 3, 4), prios(5, 1, 4, 2, 3))
    before = order(sel)
    gone = [before[0], before[2], before[4]]  # the best and two others
    sel.remove(ids(*gone))
    assert order(sel) == [s for s in before if s not in gone]
    sel.clear()
    assert order(sel) == [] and sel.sample(2, RNG, None)[0].tolist() == []
    sel.insert(ids(3, 1), prios(7, 7))
    assert order(sel) == [3, 1]


@pytest.mark.parametrize("kind", ["min_heap", "max_heap"])
def test_victims_of_every_size_agree_with_a_sorted_reference(kind):
    """Few distinct priorities (many ties), enough items that both the small-n descent and the
    whole-leaf-level pass are taken; every n gives the reference's first n, distinct."""
    rng = np.random.default_rng(42)
    num_slots = 5000
    sel = make(kind, num_slots)
    slots = rng.permutation(num_slots)[:4000]
    priorities = rng.integers(0, 20, len(slots)).astype(np.float64)
    sel.insert(slots, priorities)
    updated = rng.choice(slots, 500, replace=False)
    new_priorities = rng.integers(0, 20, len(updated)).astype(np.float64)
    sel.update(updated, new_priorities)
    # Reference: key then touch (insertion order, then the updates in call order).
    prio = dict(zip(slots.tolist(), priorities.tolist(), strict=True))
    touch = {s: i for i, s in enumerate(slots.tolist())}
    for i, (s, p) in enumerate(zip(updated.tolist(), new_priorities.tolist(), strict=True)):
        prio[s], touch[s] = p, len(slots) + i
    sign = 1.0 if kind == "min_heap" else -1.0
    reference = sorted(prio, key=lambda s: (sign * prio[s], touch[s]))
    for n in (1, 2, 5, 31, 32, 33, 255, 256, 257, 1000, 3999, 4000, 4500):
        got = sel.victims(n, RNG)
        assert got.tolist() == reference[:n], n
        assert len(np.unique(got)) == len(got)


# -- rebuild --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ORDERED_KINDS)
def test_rebuild_after_corruption_reproduces_the_order(kind):
    """A process died mid-operation: the derived arrays are garbage, the per-slot touches are
    not. rebuild() from the items (in insertion order) gives the same order, update touches
    included."""
    sel = make(kind, 300)
    rng = np.random.default_rng(3)
    inserted = rng.permutation(300)[:200]
    priorities = rng.integers(0, 4, 200).astype(np.float64)
    sel.insert(inserted, priorities)
    sel.update(inserted[::7], np.ones(len(inserted[::7])))
    priorities[::7] = 1.0
    sel.remove(inserted[::5])
    before = order(sel)
    touch = getattr(sel, "touch", None)  # a heap's touches (a column of its node records)
    touches = None if touch is None else touch.copy()
    for name, arr in sel.arrays.items():
        if name != "clock":  # all but the per-slot touches and the clock
            arr[...] = rng.integers(-1, 300, arr.shape).astype(arr.dtype)
    if touch is not None:
        touch[...] = touches
    keep = np.ones(200, dtype=bool)
    keep[::5] = False
    sel.rebuild(inserted[keep], priorities[keep])
    assert order(sel) == before


@pytest.mark.parametrize("kind", ["min_heap", "max_heap"])
def test_rebuild_treats_touches_above_the_clock_as_newest(kind):
    """Touches written by a process that died before advancing the clock are not trusted: those
    items count as touched after all others, in insertion order."""
    sel = make(kind)
    sel.insert(ids(0, 1, 2, 3), prios(1, 1, 1, 1))
    sel.touch[ids(1, 0)] = 99
    sel.rebuild(ids(0, 1, 2, 3), prios(1, 1, 1, 1))
    assert order(sel) == [2, 3, 0, 1]


def test_rebuild_of_restored_items_breaks_ties_by_insertion_order():
    """Items restored into a new table have no touches: insertion order decides ties."""
    for kind, want in (("min_heap", [4, 6, 2, 9, 1]), ("max_heap", [9, 1, 4, 6, 2])):
        sel = make(kind)
        sel.rebuild(ids(9, 4, 6, 1), prios(2, 1, 1, 2))
        sel.insert(ids(2), prios(1))  # touched after the restored ones
        assert order(sel) == want, kind


# -- differential test against a one-at-a-time model ------------------------------------------


class Model:
    """The order Reverb's selectors define, applied one item at a time in plain Python."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.items: dict[int, list] = {}  # slot -> [priority, touch, inserted]
        self.clock = 0

    def insert(self, slots, priorities) -> None:
        for s, p in zip(slots.tolist(), priorities.tolist(), strict=True):
            self.clock += 1
            self.items[s] = [p, self.clock, self.clock]

    def update(self, slots, priorities) -> None:
        for s, p in zip(slots.tolist(), priorities.tolist(), strict=True):
            self.clock += 1
            self.items[s][:2] = [p, self.clock]

    def remove(self, slots) -> None:
        for s in slots.tolist():
            del self.items[s]

    def order(self) -> list[int]:
        key = {
            "fifo": lambda s: self.items[s][2],
            "lifo": lambda s: -self.items[s][2],
            "min_heap": lambda s: (self.items[s][0], self.items[s][1]),
            "max_heap": lambda s: (-self.items[s][0], self.items[s][1]),
        }[self.kind]
        return sorted(self.items, key=key)

    def by_insertion(self) -> list[int]:
        return sorted(self.items, key=lambda s: self.items[s][2])


@pytest.mark.parametrize("num_slots", [5, 64, 300])
@pytest.mark.parametrize("kind", ORDERED_KINDS)
def test_random_operations_match_the_model(kind, num_slots):
    rng = np.random.default_rng(num_slots)
    sel, model = make(kind, num_slots), Model(kind)
    left = {s: int(rng.integers(1, 4)) for s in range(num_slots)}
    times_left = times_left_from(left)
    for step in range(1500):
        present = np.array(list(model.items), dtype=np.int64)
        free = np.setdiff1d(np.arange(num_slots), present)
        op = rng.random()
        if op < 0.35 and len(free):
            slots = rng.permutation(free)[: rng.integers(1, 9)]
            p = rng.integers(0, 4, len(slots)).astype(np.float64)
            sel.insert(slots, p)
            model.insert(slots, p)
        elif op < 0.55 and len(present):
            slots = rng.choice(present, rng.integers(1, 9))  # may repeat
            p = rng.integers(0, 4, len(slots)).astype(np.float64)
            sel.update(slots, p)
            model.update(slots, p)
        elif op < 0.8 and len(present):
            slots = rng.permutation(present)[: rng.integers(1, 9)]
            sel.remove(slots)
            model.remove(slots)
        elif op < 0.99:
            n = int(rng.integers(1, num_slots + 2))
            want = model.order()
            assert sel.victims(min(n, len(want)), RNG).tolist() == want[:n], step
            got = sel.sample(n, RNG, times_left)[0].tolist()
            assert got == [s for s in want for _ in range(left[s])][:n], step
            assert sel.sample(3, RNG, None)[0].tolist() == want[:1] * 3, step
        elif op < 0.995:
            slots = np.array(model.by_insertion(), dtype=np.int64)
            sel.rebuild(slots, np.array([model.items[s][0] for s in slots.tolist()]))
        else:
            sel.clear()
            model.items.clear()
    assert order(sel) == model.order()


# -- end to end, through a real daemon -------------------------------------------------------


def evicted(t, keys: dict[int, int]) -> set[int]:
    """The uids whose items are gone (deleting the others)."""
    return {uid for uid, key in keys.items() if t.delete([key]) == 1}


def test_lifo_sampler_returns_the_newest(daemon_factory):
    d = daemon_factory(
        table_toml(max_size=5, sampler='{ kind = "lifo" }', signature=STAMPED_SIGNATURE)
    )
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        keys = [t.insert(stamped_row(u)) for u in range(12)]
        t.flush()
        s = t.sample(3, timeout=5)
        assert (s.data["uid"] == 11).all() and (s.info.key == keys[11]).all()
        np.testing.assert_allclose(s.info.probability, 1.0)
        assert t.delete([keys[11]]) == 0
        assert (t.sample(2, timeout=5).data["uid"] == 10).all()


def test_min_heap_remover_evicts_the_lowest_even_the_new_item(daemon_factory):
    d = daemon_factory(
        table_toml(max_size=3, remover='{ kind = "min_heap" }', signature=STAMPED_SIGNATURE)
    )
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        keys = {}
        for uid, priority in enumerate([5.0, 1.0, 4.0, 3.0]):
            keys[uid] = t.insert(stamped_row(uid), priority=priority)
            t.flush()
        keys[4] = t.insert(stamped_row(4), priority=0.5)  # the lowest: evicted at once
        t.flush()
        assert t.info().total_evicted == 2
        assert evicted(t, keys) == {1, 4}


def test_max_heap_sampler_returns_the_highest_and_follows_updates(daemon_factory):
    d = daemon_factory(table_toml(sampler='{ kind = "max_heap" }', signature=STAMPED_SIGNATURE))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        keys = [t.insert(stamped_row(u), priority=p) for u, p in enumerate([1.0, 3.0, 2.0])]
        t.flush()
        s = t.sample(2, timeout=5)
        assert s.data["uid"].tolist() == [1, 1]
        np.testing.assert_allclose(s.info.probability, 1.0)
        np.testing.assert_allclose(s.info.priority, 3.0)
        t.update_priorities([keys[2]], [7.0])
        assert t.sample(1, timeout=5).data["uid"].tolist() == [2]
        t.update_priorities([keys[2], keys[0]], [0.0, 3.0])  # 0 ties 1 at 3, touched later
        assert t.sample(1, timeout=5).data["uid"].tolist() == [1]
        t.update_priorities([keys[1]], [3.0])  # now 1 is the more recently touched
        assert t.sample(1, timeout=5).data["uid"].tolist() == [0]
