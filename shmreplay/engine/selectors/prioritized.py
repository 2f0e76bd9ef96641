"""Prioritized(priority_exponent α): item i drawn with weight pᵢ^α.

A priority of 0 has weight 0 even when α = 0 (pow(0, 0) is 1, hence the explicit case); when
every weight is 0 the draw falls back to uniform and reports 1/N. Weights live in a float64
sum-tree whose inner nodes are recomputed from their children on every update, so no drift
accumulates however many updates it sees. The work is done by the engine
(``csrc/random_selectors.c``); tests/reference/random_selectors.py is its numpy model.

A reported probability below the smallest positive normal float64 (an item whose weight is below
total·2**-1022, whose reciprocal overflows) is raised to it, so that 1/probability (importance
weights) stays finite.

Weights are exact float64 values and must stay finite: priorities above :func:`priority_limit`
are refused (the client checks them against ``max_priority`` before they reach the table), so
that one item's weight, and the sum of a full table's weights, never overflow. Without the
limit two priorities of 1.7e308 at α = 1 made the total inf: every draw then fell on one item,
reported with probability 0, and a prioritized remover raised at the next eviction.
"""

from __future__ import annotations

import numpy as np

from ...values import DBL_MAX
from .. import _native
from ..sumtree import SumTree, sumtree_capacity
from .base import ArraySpecs, DenseSet, Selector, TimesLeft


def weight_limit(num_slots: int) -> float:
    """The largest weight one item may have in a table of ``num_slots`` slots.

    DBL_MAX / (2 · capacity), capacity being the sum-tree's power-of-two leaf count: a full
    table's weights then add up to at most DBL_MAX / 2, and every inner node, cumulative sum and
    ``u · total`` of a draw stays finite with room for rounding. A power of two, so exact.
    """
    return DBL_MAX / (2 * sumtree_capacity(num_slots))


def priority_limit(exponent: float, num_slots: int) -> float:
    """The largest priority whose weight ``p ** exponent`` fits :func:`weight_limit`.

    DBL_MAX when every finite priority fits (α = 0, or α small enough that DBL_MAX**α does).
    Otherwise found by bisection over the float64 bit patterns (ordered like the values for
    positive floats), in C with the very weight function the selector uses (``shm_weight``:
    pow(), p itself for α = 1, 0 for p = 0), so that exactly the priorities ≤ the result are
    accepted: no rounding of a root can let one more in.
    """
    return _native.priority_limit(float(exponent), weight_limit(num_slots))


class Prioritized(Selector):
    """Thin wrapper over the engine's ``Prioritized`` (csrc/random_selectors.h)."""

    kind = "prioritized"

    def __init__(self, arrays, spec, num_slots) -> None:
        super().__init__(arrays, spec, num_slots)
        self.exponent = float(spec.priority_exponent)
        self.tree = SumTree(arrays["tree"], num_slots)
        self.items = DenseSet.from_arrays(arrays, "all.")  # for the all-zero fallback
        self._max_priority = priority_limit(self.exponent, num_slots)
        self._c = _native.Prioritized(
            arrays["tree"],
            arrays["all.live"],
            arrays["all.pos"],
            arrays["all.count"][:1],
            self.exponent,
        )

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
        """pᵢ^α, 0 for pᵢ = 0, computed by the engine's weight function (as insert does). The
        priorities are checked already (0 <= p <= max_priority): by the client and
        TableCore.update_priorities, by the daemon's commit (check_published), and clamped by
        TableCore when it reads them back from shared memory to rebuild (see
        TableCore.sane_priorities)."""
        p = np.asarray(priorities, dtype=np.float64)
        return np.array([_native.weight(float(x), self.exponent) for x in p.reshape(-1)]).reshape(
            p.shape
        )

    def insert(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        self._c.insert(_slots(slots), _prios(priorities))

    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        self._c.update(_slots(slots), _prios(priorities))

    def remove(self, slots: np.ndarray) -> None:
        self._c.remove(_slots(slots))

    def sample(
        self, n: int, rng: np.random.Generator, times_left: TimesLeft
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` draws from u = rng.random(n): the sum-tree leaf of each u, with probability
        max(weight/total, smallest normal); when every weight is 0, live[floor(u·count)] with
        probability 1/count."""
        if self.items.count == 0:
            return np.empty(0, np.int64), np.empty(0)
        slots = np.empty(n, dtype=np.int64)
        prob = np.empty(n)
        self._c.sample(rng.random(n), slots, prob)
        return slots, prob

    def check(self, size: int) -> str | None:
        # The tree lives in shared memory: a total that is not a finite number >= 0 would make
        # every draw and eviction fail; the table rebuilds it from the per-slot priorities.
        total = float(self.tree.total)
        if not 0.0 <= total < np.inf:
            return f"its sum-tree total is {total}"
        return super().check(size)

    def victims(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` distinct items weighted without replacement, from u = rng.random(n), one per
        victim in order: successive sum-tree draws, each picked weight set to 0 until the n are
        chosen, then restored; once no weight is left, uniform distinct picks among the
        zero-weight items (csrc/random_selectors.h)."""
        out = np.empty(n, dtype=np.int64)
        self._c.victims(rng.random(n), out)
        return out

    def _c_selector(self) -> object:
        return self._c._selector()

    def clear(self) -> None:
        self._c.clear()

    def rebuild(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        self._c.rebuild(_slots(slots), _prios(priorities))

    def options(self) -> dict[str, object]:
        return {"kind": self.kind, "priority_exponent": self.exponent}


def _slots(slots: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(slots, dtype=np.int64).reshape(-1)


def _prios(priorities: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(priorities, dtype=np.float64).reshape(-1)
