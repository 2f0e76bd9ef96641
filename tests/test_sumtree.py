"""The sum-tree: exact parents, last-wins updates, draws that never hit a zero weight, no drift."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shmreplay.engine.sumtree import SumTree, sumtree_capacity

LAST_BELOW_ONE = float(np.nextafter(1.0, 0.0))


def make(num_leaves: int) -> SumTree:
    return SumTree(np.zeros(2 * sumtree_capacity(num_leaves)), num_leaves)


def leaves_of(t: SumTree) -> np.ndarray:
    return t.tree[t.capacity : 2 * t.capacity]


def assert_consistent(t: SumTree) -> None:
    """Every inner node is exactly the float sum of its children; padding leaves are 0."""
    cap, tree = t.capacity, t.tree
    inner = np.arange(1, cap)
    np.testing.assert_array_equal(tree[inner], tree[2 * inner] + tree[2 * inner + 1])
    assert not leaves_of(t)[t.num_leaves :].any()
    assert math.isclose(t.total, math.fsum(leaves_of(t)), rel_tol=1e-9)


@pytest.mark.parametrize(
    "n,cap", [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (1000, 1024), (1024, 1024)]
)
def test_capacity_is_next_power_of_two(n, cap):
    assert sumtree_capacity(n) == cap


def test_set_get_total():
    """set writes leaves into the caller's array; get reads them back; total is the root."""
    arr = np.zeros(2 * 8)
    t = SumTree(arr, 5)
    assert t.capacity == 8 and t.total == 0.0
    t.set(np.array([0, 2]), np.array([1.5, 2.5]))
    np.testing.assert_array_equal(t.get([0, 1, 2, 3, 4]), [1.5, 0.0, 2.5, 0.0, 0.0])
    assert t.total == 4.0 and arr[1] == 4.0  # the tree lives in the given (shared) array
    t.set([4], [8.0])
    t.set([1, 3], 0.25)  # a scalar value broadcasts
    np.testing.assert_array_equal(t.get([0, 1, 2, 3, 4]), [1.5, 0.25, 2.5, 0.25, 8.0])
    assert t.total == 12.5
    t.set(np.array([], dtype=np.int64), np.array([]))
    assert t.total == 12.5
    t.set([2], [0.0])
    assert t.total == 10.0
    assert_consistent(t)
    t.clear()
    assert t.total == 0.0 and not arr.any()


def test_single_leaf_tree():
    """With one leaf the leaf is the root."""
    t = make(1)
    t.set([0], [3.0])
    assert t.total == 3.0 and t.get([0])[0] == 3.0
    np.testing.assert_array_equal(t.sample(np.array([0.0, 0.5, LAST_BELOW_ONE])), [0, 0, 0])


def test_repeated_leaves_last_value_wins():
    """A leaf given several times in one set() ends with the value given last."""
    t = make(6)
    t.set([1, 1, 1, 2, 1], [1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(t.get([0, 1, 2]), [0.0, 5.0, 4.0])
    t.set([0, 3, 0, 0], [9.0, 7.0, 6.0, 0.5])  # the last is not the largest
    np.testing.assert_array_equal(t.get([0, 1, 2, 3]), [0.5, 5.0, 4.0, 7.0])
    assert t.total == 16.5
    assert_consistent(t)

    rng = np.random.default_rng(1)
    t, expect = make(37), np.zeros(37)
    for _ in range(200):
        leaves = rng.integers(0, 37, size=rng.integers(1, 60))
        values = rng.random(leaves.size)
        t.set(leaves, values)
        for leaf, v in zip(leaves, values, strict=True):
            expect[leaf] = v
        np.testing.assert_array_equal(t.get(np.arange(37)), expect)
    assert_consistent(t)


@pytest.mark.parametrize("num_leaves", [1, 2, 3, 7, 100, 1000, 1024])
def test_parents_are_exact_sums_after_random_updates(num_leaves):
    """After many random batch updates every inner node == left + right exactly."""
    rng = np.random.default_rng(num_leaves)
    t = make(num_leaves)
    for _ in range(300):
        k = int(rng.integers(1, 2 * num_leaves + 2))  # small batches and ones covering everything
        leaves = rng.integers(0, num_leaves, size=k)
        values = rng.random(k) * 10.0 ** rng.integers(-6, 7, size=k)
        values[rng.random(k) < 0.2] = 0.0
        t.set(leaves, values)
    assert_consistent(t)


def test_rebuild_equals_incremental_sets():
    """rebuild(leaves) gives bit for bit the tree that setting the same leaves one by one gives."""
    rng = np.random.default_rng(2)
    n = 300
    values = rng.random(n) * 10.0 ** rng.integers(-8, 9, size=n)
    values[::7] = 0.0
    inc = make(n)
    for leaf in rng.permutation(n):
        inc.set([leaf], [values[leaf]])
    reb = make(n)
    reb.tree[:] = 123.0  # rebuild replaces everything, padding and stale nodes included
    reb.rebuild(values)
    np.testing.assert_array_equal(reb.tree[1:], inc.tree[1:])
    assert_consistent(reb)


def test_no_drift_after_many_updates():
    """100k random updates on 1000 leaves: the tree equals a fresh rebuild exactly."""
    rng = np.random.default_rng(3)
    n = 1000
    t = make(n)
    for _ in range(1000):
        leaves = rng.integers(0, n, size=100)
        t.set(leaves, rng.random(100) * 10.0 ** rng.integers(-5, 6, size=100))
    for leaf in rng.integers(0, n, size=200):  # and single updates
        t.set([leaf], [rng.random()])
    fresh = make(n)
    fresh.rebuild(t.get(np.arange(n)).copy())
    assert t.total == fresh.total
    np.testing.assert_array_equal(t.tree[1:], fresh.tree[1:])
    assert math.isclose(t.total, math.fsum(t.get(np.arange(n))), rel_tol=1e-12)


# -- sampling --------------------------------------------------------------------------------------


def sample_checked(t: SumTree, u) -> np.ndarray:
    """Draw and check that no leaf is out of range or has weight 0."""
    leaves = t.sample(np.asarray(u, dtype=np.float64))
    assert leaves.dtype.kind == "i"
    assert ((leaves >= 0) & (leaves < t.num_leaves)).all(), leaves
    assert (t.get(leaves) > 0.0).all(), leaves[t.get(leaves) <= 0.0]
    return leaves


EDGES = np.array([0.0, 1e-300, 0.5, LAST_BELOW_ONE])


@pytest.mark.parametrize(
    "weights",
    [
        [0, 0, 5, 0, 0],
        [1, 2, 0, 0, 0],  # trailing zero leaves, then padding up to 8
        [0, 0, 0, 0, 0, 0, 0, 1e-300],
        [0, 3],
        [7, 0, 0, 0, 0, 0, 0, 0, 0],
        [1e-300, 1e300, 0, 0, 0],
        [0.1, 0.2, 0.0, 0.3, 0.0, 0.0],
    ],
)
def test_sample_never_returns_zero_weight_or_padding(weights):
    """Edge draws (0, 1⁻, boundaries between leaves) never land on a zero or padding leaf."""
    t = make(len(weights))
    t.set(np.arange(len(weights)), np.array(weights, dtype=np.float64))
    w = np.array(weights, dtype=np.float64)
    bounds = np.cumsum(w) / t.total
    u = np.concatenate([EDGES, bounds, np.nextafter(bounds, 0.0), np.nextafter(bounds, 1.0)])
    u = u[(u >= 0.0) & (u < 1.0)]
    leaves = sample_checked(t, np.concatenate([u, np.random.default_rng(4).random(10_000)]))
    nonzero = np.flatnonzero(w)
    assert leaves[0] == nonzero[0]  # u = 0 picks the first leaf of positive weight
    assert leaves[len(EDGES) - 1] == nonzero[-1]  # u just below 1 picks the last one


def test_sample_is_the_inverse_cdf():
    """With exact (dyadic) arithmetic the leaf is the cumulative-weight interval u·total is in."""
    w = np.array([3, 0, 1, 4, 0, 0, 8, 2, 0, 5, 1, 0], dtype=np.float64)  # total 24
    t = make(len(w))
    t.set(np.arange(len(w)), w)
    u = np.arange(128) / 128.0  # u·24 is a multiple of 3/16: every sum below is exact
    expect = np.searchsorted(np.cumsum(w), u * t.total, side="right")
    np.testing.assert_array_equal(sample_checked(t, u), expect)


def test_sample_stress_sparse_random_weights():
    """Random sparse weights of wildly different sizes: every draw lands on a positive leaf."""
    rng = np.random.default_rng(5)
    for n in (3, 17, 100, 513):
        t = make(n)
        for _ in range(20):
            w = rng.random(n) * 10.0 ** rng.integers(-12, 12, size=n)
            w[rng.random(n) < 0.7] = 0.0
            w[rng.integers(0, n)] = rng.random() + 1e-3
            t.set(np.arange(n), w)
            bounds = np.cumsum(w) / t.total
            u = np.concatenate([rng.random(2000), EDGES, np.nextafter(bounds, 0.0), bounds])
            sample_checked(t, u[u < 1.0])


# Chi-square 0.999 quantile for 7 degrees of freedom (8 positive weights below):
# scipy.stats.chi2.ppf(0.999, 7) = 24.3219. Fixed seed, so the test is deterministic.
CHI2_999_DOF7 = 24.322


def test_sample_frequencies_match_weights():
    """200k draws: zero-weight leaves never come up, the rest pass a chi-square at 0.999."""
    w = np.array([1.0, 2.0, 0.0, 3.0, 4.0, 0.5, 0.0, 8.0, 1.5, 5.0])  # 10 leaves in 16
    t = make(len(w))
    t.set(np.arange(len(w)), w)
    draws = 200_000
    leaves = sample_checked(t, np.random.default_rng(0).random(draws))
    counts = np.bincount(leaves, minlength=t.capacity)
    assert counts[w.size :].sum() == 0  # padding leaves
    counts = counts[: w.size]
    pos = w > 0
    assert counts[~pos].sum() == 0
    expected = draws * w[pos] / w.sum()
    stat = float(((counts[pos] - expected) ** 2 / expected).sum())
    assert pos.sum() - 1 == 7
    assert stat < CHI2_999_DOF7, (stat, counts)


def test_sample_with_zero_total_raises():
    t = make(5)
    with pytest.raises(ValueError, match="total weight is 0"):
        t.sample(np.array([0.5]))
    t.set([1, 3], [2.0, 1.0])
    assert t.sample(np.array([0.0]))[0] == 1
    t.set([1, 3], [0.0, 0.0])
    with pytest.raises(ValueError, match="total weight is 0"):
        t.sample(np.array([0.5]))


@pytest.mark.parametrize(
    "arr",
    [np.zeros(15), np.zeros(32), np.zeros(16, dtype=np.float32), np.zeros((2, 8)), np.zeros(0)],
    ids=["short", "long", "float32", "2-d", "empty"],
)
def test_wrong_array_is_refused(arr):
    """A tree for 5 leaves needs exactly float64[16]."""
    with pytest.raises(ValueError, match=r"float64\[16\]"):
        SumTree(arr, 5)
