"""The engine's sum-tree, dense set, Uniform and Prioritized against their numpy reference models
(tests/reference): the same random operation sequences and the same uniforms through both, the
shared arrays compared bit for bit after every step and every draw compared exactly; edge cases;
a case at more than 1M leaves; garbage in the shared arrays gives an exception, never a crash."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from shmreplay.config import SelectorSpec
from shmreplay.engine import _native
from shmreplay.engine.selectors.base import CorruptStructure, DenseSet
from shmreplay.engine.selectors.prioritized import Prioritized, priority_limit, weight_limit
from shmreplay.engine.selectors.uniform import Uniform
from shmreplay.engine.sumtree import SumTree, last_wins, sumtree_capacity
from tests.reference.random_selectors import (
    DenseModel,
    PrioritizedModel,
    UniformModel,
    weights,
)
from tests.reference.sumtree import SumTreeModel
from tests.reference.sumtree import last_wins as last_wins_model

SIZES = (1, 2, 3, 5, 17, 100, 1000)
EXPONENTS = (0.0, 0.5, 0.6, 1.0, 2.0)


def arrays_for(cls, num_slots: int) -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, dtype) for name, dtype, shape in cls.array_specs(num_slots)}


def copy_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: a.copy() for name, a in arrays.items()}


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray], step) -> None:
    for name in a:
        assert np.array_equal(a[name], b[name]), (step, name)


def random_priorities(rng: np.random.Generator, k: int, limit: float) -> np.ndarray:
    """A mix of zeros, subnormals, ordinary values and values at the limit."""
    kind = rng.integers(0, 5, size=k)
    p = rng.random(k) * 10.0
    p[kind == 0] = 0.0
    p[kind == 1] = 5e-324 * rng.integers(1, 1000, size=int((kind == 1).sum()))
    p[kind == 2] = min(limit, 1e300) * rng.random(int((kind == 2).sum()))
    return np.minimum(p, limit)


# -- sum-tree ------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_leaves", SIZES)
def test_sumtree_matches_the_model(num_leaves):
    rng = np.random.default_rng(num_leaves)
    cap = sumtree_capacity(num_leaves)
    eng = SumTree(np.zeros(2 * cap), num_leaves)
    model = SumTreeModel(np.zeros(2 * cap), num_leaves)
    for step in range(300):
        op = rng.random()
        if op < 0.5:
            k = int(rng.integers(1, 2 * num_leaves + 2))
            leaves = rng.integers(0, num_leaves, size=k)  # repeats: the last wins
            values = rng.random(k) * (rng.random(k) < 0.7)
            eng.set(leaves, values)
            model.set(leaves, values)
        elif op < 0.8:
            u = rng.random(int(rng.integers(1, 300)))
            if model.total > 0:
                assert np.array_equal(eng.sample(u), model.sample(u)), step
            else:
                with pytest.raises(ValueError, match="total weight is"):
                    eng.sample(u)
        elif op < 0.9:
            leaves = rng.integers(0, num_leaves, size=5)
            assert np.array_equal(eng.get(leaves), model.get(leaves))
        elif op < 0.97:
            values = rng.random(num_leaves) * (rng.random(num_leaves) < 0.5)
            eng.rebuild(values)
            model.rebuild(values)
        else:
            eng.clear()
            model.clear()
        assert np.array_equal(eng.tree, model.tree), step
        assert eng.total == model.total


def test_sumtree_boundary_draws_never_hit_zero_or_padding():
    """u at and next to every cumulative boundary, zero leaves between positive ones."""
    n = 13
    cap = sumtree_capacity(n)
    eng = SumTree(np.zeros(2 * cap), n)
    model = SumTreeModel(np.zeros(2 * cap), n)
    w = np.array([0, 0.1, 0, 0, 0.2, 0.3, 0, 1e-300, 0, 0.7, 0, 0, 0.1])
    eng.rebuild(w)
    model.rebuild(w)
    cum = np.cumsum(w) / w.sum()
    u = np.concatenate([cum, np.nextafter(cum, 0), np.nextafter(cum, 2), [0.0, 1 - 2**-53]])
    u = u[(u >= 0) & (u < 1)]
    got = eng.sample(u)
    assert np.array_equal(got, model.sample(u))
    assert (w[got] > 0).all()


def test_sumtree_out_of_range_leaves_change_nothing():
    eng = SumTree(np.zeros(16), 5)
    eng.set([1, 2], [1.0, 2.0])
    before = eng.tree.copy()
    for bad in ([5], [-1], [0, 8]):
        with pytest.raises(ValueError):
            eng.set(bad, 1.0)
        with pytest.raises(ValueError):
            eng.get(bad)
    assert np.array_equal(eng.tree, before)


@pytest.mark.parametrize("total", [np.inf, np.nan, -1.0, 0.0])
def test_sumtree_bad_total_raises(total):
    eng = SumTree(np.zeros(16), 5)
    eng.tree[1] = total
    with pytest.raises(ValueError, match="total weight is"):
        eng.sample(np.array([0.5]))


def test_sumtree_over_a_million_leaves_matches_the_model():
    n = 1_000_003  # capacity 2**20 = 1,048,576: padding after the last leaf
    rng = np.random.default_rng(7)
    cap = sumtree_capacity(n)
    eng = SumTree(np.zeros(2 * cap), n)
    model = SumTreeModel(np.zeros(2 * cap), n)
    values = rng.random(n) * (rng.random(n) < 0.9)
    eng.rebuild(values)
    model.rebuild(values)
    assert np.array_equal(eng.tree, model.tree)
    for _ in range(20):
        leaves = rng.integers(0, n, size=256)
        leaves[:8] = leaves[8:16]  # repeated leaves
        v = rng.random(256)
        eng.set(leaves, v)
        model.set(leaves, v)
        u = rng.random(256)
        assert np.array_equal(eng.sample(u), model.sample(u))
    big = rng.integers(0, n, size=200_000)  # a batch that recomputes the whole tree
    v = rng.random(big.size)
    eng.set(big, v)
    model.set(big, v)
    assert np.array_equal(eng.tree, model.tree)
    u = rng.random(100_000)  # runs with the GIL released
    assert np.array_equal(eng.sample(u), model.sample(u))


@pytest.mark.parametrize("dtype", [np.int64, np.uint64])
def test_last_wins_matches_the_model(dtype):
    rng = np.random.default_rng(5)
    for n in list(range(0, 12)) + [255, 256, 1000, 5000]:  # 5000: a heap-allocated hash set
        for spread in (1, 3, n + 1, 2**62):
            idx = rng.integers(0, spread, n).astype(dtype)
            v = rng.random(n)
            got, want = last_wins(idx, v), last_wins_model(idx, v)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
            assert got[0].dtype == idx.dtype


# -- dense set -----------------------------------------------------------------------------------


def dense_pair(num_slots: int):
    arrays = arrays_for(Uniform, num_slots)
    ref = copy_arrays(arrays)
    eng = DenseSet.from_arrays(arrays)
    model = DenseModel(ref["live"], ref["pos"], ref["count"][:1])
    return eng, model, arrays, ref


def test_dense_remove_refuses_non_members_and_changes_nothing():
    eng, _, arrays, _ = dense_pair(10)
    eng.insert(np.array([4, 7, 1, 9]))
    before = copy_arrays(arrays)
    for bad in ([3], [4, 4], [7, 1, 9, 4, 2], [4, 3]):
        with pytest.raises(CorruptStructure):
            eng.remove(np.array(bad))
        assert_same_arrays(arrays, before, bad)
    arrays["count"][0] = 11
    with pytest.raises(CorruptStructure):
        eng.remove(np.array([4]))
    arrays["count"][0] = -1
    with pytest.raises(CorruptStructure):
        eng.remove(np.array([4]))


def test_dense_distinct_draws_reorder_the_set_only():
    eng, _, arrays, _ = dense_pair(50)
    eng.insert(np.arange(50)[::-1].copy())
    rng = np.random.default_rng(3)
    victims = eng.draw_distinct(20, rng)
    assert len(set(victims.tolist())) == 20
    live = arrays["live"][:50]
    assert sorted(live.tolist()) == list(range(50))
    assert np.array_equal(arrays["pos"][live], np.arange(50))
    assert np.array_equal(live[30:], victims)
    eng.remove(victims)  # O(1) each: they are the tail
    assert sorted(arrays["live"][:30].tolist()) == sorted(set(range(50)) - set(victims.tolist()))


# -- Uniform and Prioritized against their models -----------------------------------------------


def selector_pair(kind: str, num_slots: int, exponent: float = 1.0):
    if kind == "uniform":
        arrays = arrays_for(Uniform, num_slots)
        ref = copy_arrays(arrays)
        eng = Uniform(arrays, SelectorSpec.uniform(), num_slots)
        model = UniformModel(ref)
    else:
        arrays = arrays_for(Prioritized, num_slots)
        ref = copy_arrays(arrays)
        eng = Prioritized(arrays, SelectorSpec.prioritized(exponent), num_slots)
        model = PrioritizedModel(ref, num_slots, exponent)
    return eng, model, arrays, ref


def run_sequence(kind, num_slots, exponent, steps, seed):
    rng = np.random.default_rng(seed)
    eng, model, arrays, ref = selector_pair(kind, num_slots, exponent)
    limit = eng.max_priority
    present: list[int] = []  # insertion order
    for step in range(steps):
        op = rng.random()
        free = sorted(set(range(num_slots)) - set(present))
        if op < 0.25 and free:
            slots = rng.permutation(free)[: int(rng.integers(1, len(free) + 1))]
            p = random_priorities(rng, len(slots), limit)
            eng.insert(slots, p)
            model.insert(slots, p)
            present += slots.tolist()
        elif op < 0.4 and present:
            slots = rng.choice(present, size=int(rng.integers(1, 2 * len(present) + 1)))
            p = random_priorities(rng, len(slots), limit)
            eng.update(slots, p)
            model.update(slots, p)
        elif op < 0.55 and present:
            slots = rng.permutation(present)[: int(rng.integers(1, len(present) + 1))]
            eng.remove(slots)
            model.remove(slots)
            gone = set(slots.tolist())
            present = [s for s in present if s not in gone]
        elif op < 0.75:
            n = int(rng.integers(1, 300))
            seed_u = int(rng.integers(2**63))
            got = eng.sample(n, np.random.default_rng(seed_u), None)
            want = model.sample(np.random.default_rng(seed_u).random(n))
            assert np.array_equal(got[0], want[0]), step
            assert np.array_equal(got[1], want[1]), step
        elif op < 0.9 and present:
            n = int(rng.integers(1, len(present) + 1))
            seed_u = int(rng.integers(2**63))
            got = eng.victims(n, np.random.default_rng(seed_u))
            want = model.victims(np.random.default_rng(seed_u).random(n))
            assert np.array_equal(got, want), step
            assert len(set(got.tolist())) == n and set(got.tolist()) <= set(present)
        elif op < 0.97:
            slots = np.array(present, dtype=np.int64)
            p = random_priorities(rng, len(slots), limit)
            eng.rebuild(slots, p)
            model.rebuild(slots, p)
        else:
            eng.clear()
            model.clear()
            present = []
        assert_same_arrays(arrays, ref, step)
        assert eng.check(len(present)) is None, step


@pytest.mark.parametrize("num_slots", SIZES)
def test_uniform_matches_the_model(num_slots):
    run_sequence("uniform", num_slots, 1.0, 200, seed=num_slots)


@pytest.mark.parametrize("exponent", EXPONENTS)
@pytest.mark.parametrize("num_slots", SIZES)
def test_prioritized_matches_the_model(num_slots, exponent):
    run_sequence("prioritized", num_slots, exponent, 120, seed=num_slots * 10 + int(exponent * 10))


def test_prioritized_victims_take_every_weighted_item_then_zero_weight_ones():
    eng, model, arrays, ref = selector_pair("prioritized", 8, 1.0)
    slots = np.arange(8)
    p = np.array([0, 3.0, 0, 0, 1.0, 0, 0, 0])
    eng.insert(slots, p)
    model.insert(slots, p)
    got = eng.victims(5, np.random.default_rng(1))
    assert sorted(got[:2].tolist()) == [1, 4]
    assert set(got[2:].tolist()) <= {0, 2, 3, 5, 6, 7}
    assert np.array_equal(got, model.victims(np.random.default_rng(1).random(5)))
    assert_same_arrays(arrays, ref, "victims")  # weights restored bit for bit


def test_prioritized_over_a_million_slots_matches_the_model():
    n = 1 << 20
    rng = np.random.default_rng(11)
    eng, model, arrays, ref = selector_pair("prioritized", n, 0.6)
    slots = rng.permutation(n)
    p = rng.random(n) * 100
    eng.insert(slots, p)
    model.insert(slots, p)
    assert_same_arrays(arrays, ref, "insert")
    for step in range(10):
        upd = rng.integers(0, n, size=256)
        p = rng.random(256)
        eng.update(upd, p)
        model.update(upd, p)
        got = eng.sample(256, np.random.default_rng(step), None)
        want = model.sample(np.random.default_rng(step).random(256))
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    got = eng.victims(64, np.random.default_rng(99))
    assert np.array_equal(got, model.victims(np.random.default_rng(99).random(64)))
    eng.remove(got)
    model.remove(got)
    assert_same_arrays(arrays, ref, "end")


# -- weights and priority limits ---------------------------------------------------------------


@pytest.mark.parametrize("exponent", [0.5, 0.6, 1.0, 2.0])
@pytest.mark.parametrize("num_slots", [1, 1000, 1 << 20])
def test_priority_limit_accepts_exactly_the_priorities_whose_weight_fits(exponent, num_slots):
    limit = priority_limit(exponent, num_slots)
    w_max = weight_limit(num_slots)
    assert _native.weight(limit, exponent) <= w_max
    if limit < np.finfo(np.float64).max:
        assert _native.weight(np.nextafter(limit, np.inf), exponent) > w_max
    # the selector stores exactly that weight, and the model's pow() agrees with the engine's
    eng, _, arrays, _ = selector_pair("prioritized", 4, exponent)
    eng.insert(np.array([0, 1]), np.array([limit, np.nextafter(limit, 0)]))
    assert eng.tree.get(np.array([0]))[0] == _native.weight(limit, exponent)
    near = np.array([limit, np.nextafter(limit, 0), 0.0, 1.0, 3.7])
    assert np.array_equal(eng.tree.get(np.array([0, 1])), weights(near[:2], exponent))
    assert np.array_equal(eng.weights(near), weights(near, exponent))


def test_weight_of_zero_is_zero_even_for_exponent_zero():
    assert _native.weight(0.0, 0.0) == 0.0
    assert _native.weight(2.0, 0.0) == 1.0
    assert _native.weight(5e-324, 2.0) == 0.0  # underflows: never drawn


# -- garbage in shared memory ------------------------------------------------------------------

GARBAGE_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from shmreplay.config import SelectorSpec
    from shmreplay.engine.selectors.base import CorruptStructure
    from shmreplay.engine.selectors.prioritized import Prioritized
    from shmreplay.engine.selectors.uniform import Uniform

    rng = np.random.default_rng(0)
    N = 37
    for trial in range(300):
        for cls, spec in ((Uniform, SelectorSpec.uniform()),
                          (Prioritized, SelectorSpec.prioritized(0.7))):
            arrays = {n: np.zeros(s, d) for n, d, s in cls.array_specs(N)}
            sel = cls(arrays, spec, N)
            sel.insert(np.arange(N // 2), rng.random(N // 2))
            for name, a in arrays.items():  # garbage in some words of every array
                k = int(rng.integers(1, 6))
                idx = rng.integers(0, a.size, size=k)
                if a.dtype == np.float64:
                    a.flat[idx] = rng.choice([np.nan, np.inf, -1.0, 1e308, 0.0, 5.0], size=k)
                else:
                    a.flat[idx] = rng.choice([-1, -(10**12), 10**12, N, N - 1, 2**62], size=k)
            ops = [
                lambda: sel.sample(64, rng, None),
                lambda: sel.victims(int(rng.integers(1, N // 2)), rng),
                lambda: sel.remove(np.arange(3)),
                lambda: sel.update(np.arange(4), np.ones(4)),
                lambda: sel.insert(np.array([N - 1]), np.ones(1)),
                lambda: sel.check(N // 2),
            ]
            for op in ops:
                try:
                    op()
                except (CorruptStructure, ValueError):
                    pass
    print("survived")
    """
)


def test_garbage_in_the_shared_arrays_raises_and_never_crashes():
    """Run in a subprocess: a segfault fails this test instead of killing pytest."""
    proc = subprocess.run(
        [sys.executable, "-c", GARBAGE_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "survived" in proc.stdout
