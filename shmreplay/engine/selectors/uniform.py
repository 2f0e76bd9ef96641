"""Uniform: every item equally likely; reported probability 1/N.

Draws take u = rng.random(n): item live[min(floor(u·count), count − 1)] of the dense set; victims
a partial Fisher–Yates on the set's live array (csrc/dense.h)."""

from __future__ import annotations

import numpy as np

from .base import ArraySpecs, DenseSet, Selector, TimesLeft


class Uniform(Selector):
    kind = "uniform"

    def __init__(self, arrays, spec, num_slots) -> None:
        super().__init__(arrays, spec, num_slots)
        self.items = DenseSet.from_arrays(arrays)

    @classmethod
    def array_specs(cls, num_slots: int) -> ArraySpecs:
        return DenseSet.array_specs(num_slots)

    def insert(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        self.items.insert(slots)

    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        pass  # priorities do not matter here

    def remove(self, slots: np.ndarray) -> None:
        self.items.remove(slots)

    def sample(
        self, n: int, rng: np.random.Generator, times_left: TimesLeft
    ) -> tuple[np.ndarray, np.ndarray]:
        count = self.items.count
        if count == 0:
            return np.empty(0, np.int64), np.empty(0)
        return self.items.draw(n, rng), np.full(n, 1.0 / count)

    def victims(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.items.draw_distinct(n, rng)

    def _c_selector(self) -> object:
        return self.items._c._selector()

    def clear(self) -> None:
        self.items.clear()

    def rebuild(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        self.items.rebuild(slots)
