"""Prioritized(priority_exponent α): item i drawn with weight pᵢ^α.

A priority of 0 has weight 0 even when α = 0 (numpy's 0**0 is 1, hence the explicit mask); when
every weight is 0 the draw falls back to uniform and reports 1/N. Weights live in a float64
sum-tree whose inner nodes are recomputed from their children on every update, so no drift
accumulates however many updates it sees.
"""

from __future__ import annotations

import numpy as np

from ..sumtree import SumTree, sumtree_capacity
from .base import ArraySpecs, DenseSet, Selector, TimesLeft


class Prioritized(Selector):
    kind = "prioritized"

    def __init__(self, arrays, spec, num_slots) -> None:
        super().__init__(arrays, spec, num_slots)
        self.exponent = float(spec.priority_exponent)
        self.tree = SumTree(arrays["tree"], num_slots)
        self.items = DenseSet.from_arrays(arrays, "all.")  # for the all-zero fallback

    @classmethod
    def array_specs(cls, num_slots: int) -> ArraySpecs:
        return [("tree", "float64", (2 * sumtree_capacity(num_slots),))] + DenseSet.array_specs(
            num_slots, "all."
        )

    def weights(self, priorities: np.ndarray) -> np.ndarray:
        p = np.asarray(priorities, dtype=np.float64)
        if self.exponent == 1.0:
            return p.copy()
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
        if total <= 0.0:
            return self.items.draw(n, rng), np.full(n, 1.0 / count)
        slots = self.tree.sample(rng.random(n))
        return slots, self.tree.get(slots) / total

    def victims(self, n: int, rng: np.random.Generator) -> np.ndarray:
        live = self.items.live[: self.items.count]
        w = self.tree.get(live)
        positive = int(np.count_nonzero(w))
        if positive < n:  # not enough weighted items: take those, then uniform among the rest
            first = live[w > 0]
            rest = live[w <= 0]
            return np.concatenate([first, rng.choice(rest, n - positive, replace=False)])
        return rng.choice(live, size=n, replace=False, p=w / w.sum())

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
