"""Prioritized(priority_exponent α): item i drawn with weight pᵢ^α.

A priority of 0 has weight 0 even when α = 0 (numpy's 0**0 is 1, hence the explicit mask); when
every weight is 0 the draw falls back to uniform and reports 1/N. Weights live in a float64
sum-tree whose inner nodes are recomputed from their children on every update, so no drift
accumulates however many updates it sees.

Weights are exact float64 values and must stay finite: priorities above :func:`priority_limit`
are refused (the client checks them against ``max_priority`` before they reach the table), so
that one item's weight, and the sum of a full table's weights, never overflow. Without the
limit two priorities of 1.7e308 at α = 1 made the total inf: every draw then fell on one item,
reported with probability 0, and a prioritized remover raised at the next eviction.
"""

from __future__ import annotations

import numpy as np

from ..sumtree import SumTree, sumtree_capacity
from ..values import DBL_MAX
from .base import ArraySpecs, DenseSet, Selector, TimesLeft

# The smallest positive normal float64: a reported probability below it (an item whose weight
# is below total·2**-1022: 0 or a subnormal, whose reciprocal overflows) is raised to it, so
# that 1/probability (importance weights) stays finite.
_TINY = float(np.finfo(np.float64).tiny)


def weight_limit(num_slots: int) -> float:
    """The largest weight one item may have in a table of ``num_slots`` slots.

    DBL_MAX / (2 · capacity), capacity being the sum-tree's power-of-two leaf count: a full
    table's weights then add up to at most DBL_MAX / 2, and every inner node, cumulative sum and
    ``u · total`` of a draw stays finite with room for rounding. A power of two, so exact.
    """
    return DBL_MAX / (2 * sumtree_capacity(num_slots))


def _weight(p: float, exponent: float) -> float:
    """The weight of priority ``p`` exactly as :meth:`Prioritized.weights` computes it."""
    if exponent == 1.0:
        return p
    with np.errstate(over="ignore"):
        return float(np.power(np.float64(p), exponent)) if p > 0 else 0.0


def priority_limit(exponent: float, num_slots: int) -> float:
    """The largest priority whose weight ``p ** exponent`` fits :func:`weight_limit`.

    DBL_MAX when every finite priority fits (α = 0, or α small enough that DBL_MAX**α does).
    Otherwise found by bisection over the float64 bit patterns (ordered like the values for
    positive floats), with the weight computed exactly as the sampler computes it, so that
    exactly the priorities ≤ the result are accepted: no rounding of a root can let one more in.
    """
    w_max = weight_limit(num_slots)
    exponent = float(exponent)
    if exponent == 0.0 or _weight(DBL_MAX, exponent) <= w_max:
        return DBL_MAX
    if exponent == 1.0:
        return w_max
    bits = np.array([0.0, DBL_MAX]).view(np.int64)
    lo, hi = int(bits[0]), int(bits[1])  # weight(lo) <= w_max < weight(hi)
    while hi - lo > 1:  # 63 steps at most
        mid = (lo + hi) // 2
        if _weight(float(np.int64(mid).view(np.float64)), exponent) <= w_max:
            lo = mid
        else:
            hi = mid
    return float(np.int64(lo).view(np.float64))


class Prioritized(Selector):
    kind = "prioritized"

    def __init__(self, arrays, spec, num_slots) -> None:
        super().__init__(arrays, spec, num_slots)
        self.exponent = float(spec.priority_exponent)
        self.tree = SumTree(arrays["tree"], num_slots)
        self.items = DenseSet.from_arrays(arrays, "all.")  # for the all-zero fallback
        self._max_priority = priority_limit(self.exponent, num_slots)

    @classmethod
    def array_specs(cls, num_slots: int) -> ArraySpecs:
        return [("tree", "float64", (2 * sumtree_capacity(num_slots),))] + DenseSet.array_specs(
            num_slots, "all."
        )

    @property
    def max_priority(self) -> float:
        """The largest priority accepted: :func:`priority_limit` of α and the slot count."""
        return self._max_priority

    def weights(self, priorities: np.ndarray) -> np.ndarray:
        """pᵢ^α, 0 for pᵢ = 0. The priorities are checked already (0 <= p <= max_priority):
        by the client and TableCore.update_priorities, by the daemon's commit
        (check_published), and clamped by TableCore when it reads them back from shared memory
        to rebuild (see TableCore.sane_priorities)."""
        p = np.asarray(priorities, dtype=np.float64)
        if self.exponent == 1.0:
            return p
        with np.errstate(under="ignore"):  # a tiny priority weighs 0: it is never drawn
            return np.where(p > 0, np.power(p, self.exponent), 0.0)

    def insert(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        self.tree.set(slots, self.weights(priorities))
        self.items.insert(slots)

    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        self.tree.set(slots, self.weights(priorities))

    def remove(self, slots: np.ndarray) -> None:
        self.tree.set(slots, np.zeros(len(slots)))
        self.items.remove(slots)

    def sample(
        self, n: int, rng: np.random.Generator, times_left: TimesLeft
    ) -> tuple[np.ndarray, np.ndarray]:
        count = self.items.count
        if count == 0:
            return np.empty(0, np.int64), np.empty(0)
        total = self.tree.total
        if not total > 0.0:
            return self.items.draw(n, rng), np.full(n, 1.0 / count)
        slots = self.tree.sample(rng.random(n))
        # Only leaves of weight > 0 are drawn; their weight/total is > 0 unless it underflows.
        prob = self.tree.get(slots)  # a new array: divided in place
        prob /= total
        np.maximum(prob, _TINY, out=prob)
        return slots, prob

    def check(self, size: int) -> str | None:
        # The tree lives in shared memory: a total that is not a finite number >= 0 would make
        # every draw and eviction fail; the table rebuilds it from the per-slot priorities.
        total = float(self.tree.total)
        if not 0.0 <= total < np.inf:
            return f"its sum-tree total is {total}"
        return super().check(size)

    def victims(self, n: int, rng: np.random.Generator) -> np.ndarray:
        live = self.items.live[: self.items.count]
        w = self.tree.get(live)
        total = float(w.sum())  # finite: every weight is at most weight_limit
        # Items count as weighted by their share, not their weight: a weight that is tiny next
        # to the total has share 0, and rng.choice refuses more picks than non-zero shares.
        p = w / total if total > 0.0 else np.zeros(len(w))
        positive = int(np.count_nonzero(p))
        if positive < n:  # not enough weighted items: take those, then uniform among the rest
            first = live[p > 0]
            rest = live[p <= 0]
            return np.concatenate([first, rng.choice(rest, n - positive, replace=False)])
        return rng.choice(live, size=n, replace=False, p=p)

    def clear(self) -> None:
        self.tree.clear()
        self.items.clear()

    def rebuild(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        leaves = np.zeros(self.num_slots)
        leaves[slots] = self.weights(priorities)
        self.tree.rebuild(leaves)
        self.items.rebuild(slots)

    def options(self) -> dict[str, object]:
        return {"kind": self.kind, "priority_exponent": self.exponent}
