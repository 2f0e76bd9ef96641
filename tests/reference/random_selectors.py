"""Reference model of the dense set, Uniform and Prioritized (csrc/dense.c,
csrc/random_selectors.c): plain numpy over the same shared arrays, taking the same uniforms.

Every draw takes one uniform u in [0, 1) given by the caller:
- a dense-set draw is live[min(floor(u·count), count − 1)];
- distinct picks are a partial Fisher–Yates on live itself: for i in 0..n−1, m = count − i,
  j = min(floor(u_i·m), m − 1), swap live[j] and live[m − 1]; the picks are live[count − n:count];
- a weighted draw is the sum-tree descent of tests/reference/sumtree.py;
- prioritized victims: u_i for the i-th victim, successive weighted draws (each picked weight set
  to 0, all restored at the end) while the total is > 0, then distinct uniform picks among the
  zero-weight items in live order (Fisher–Yates on that list, each pick appended as made).
"""

from __future__ import annotations

import math

import numpy as np

from shmreplay.engine.selectors.base import CorruptStructure

from .sumtree import SumTreeModel

TINY = float(np.finfo(np.float64).tiny)
_pow = np.frompyfunc(math.pow, 2, 1)  # libm's pow(), which the engine calls too


def scale(u, m: int):
    """min(floor(u·m), m − 1): how a uniform picks one of m."""
    return np.minimum((np.asarray(u, dtype=np.float64) * m).astype(np.int64), m - 1)


def weights(priorities, exponent: float) -> np.ndarray:
    """p^α with C's pow(); p itself for α = 1; 0 for p <= 0 (even for α = 0)."""
    p = np.asarray(priorities, dtype=np.float64)
    if exponent == 1.0:
        return p.copy()
    w = np.zeros(p.shape)
    pos = p > 0
    if pos.any():
        w[pos] = _pow(p[pos], exponent).astype(np.float64)
    return w


class DenseModel:
    def __init__(self, live: np.ndarray, pos: np.ndarray, count: np.ndarray) -> None:
        self.live, self.pos, self._count = live, pos, count

    @property
    def count(self) -> int:
        return int(self._count[0])

    def insert(self, slots) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        n, k = self.count, len(slots)
        self.live[n : n + k] = slots
        self.pos[slots] = np.arange(n, n + k)
        self._count[0] = n + k

    def remove(self, slots) -> None:
        """Distinct members; the holes below the new end are filled by the tail's survivors in
        order; the tail keeps its contents."""
        slots = np.asarray(slots, dtype=np.int64)
        n, k = self.count, len(slots)
        if k == 0:
            return
        end = n - k
        p = self.pos[slots]
        if (
            end < 0
            or not ((p >= 0) & (p < n)).all()
            or not (self.live[p] == slots).all()
            or len(np.unique(slots)) != k
        ):
            raise CorruptStructure("not members")
        in_tail = p >= end
        holes = p[~in_tail]
        keep = np.ones(k, dtype=bool)
        keep[p[in_tail] - end] = False
        movers = self.live[end:n][keep]
        self.live[holes] = movers
        self.pos[movers] = holes
        self._count[0] = end

    def draw(self, u) -> np.ndarray:
        return self.live[scale(u, self.count)]

    def draw_distinct(self, u) -> np.ndarray:
        count, n = self.count, len(u)
        live, pos = self.live, self.pos
        for i in range(n):
            m = count - i
            j = int(scale(u[i], m))
            a, b = int(live[j]), int(live[m - 1])
            live[j], pos[b] = b, j
            live[m - 1], pos[a] = a, m - 1
        return live[count - n : count].copy()

    def clear(self) -> None:
        self._count[0] = 0

    def rebuild(self, slots) -> None:
        self.clear()
        self.insert(slots)


class UniformModel:
    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.items = DenseModel(arrays["live"], arrays["pos"], arrays["count"][:1])

    def insert(self, slots, priorities) -> None:
        self.items.insert(slots)

    def update(self, slots, priorities) -> None:
        pass

    def remove(self, slots) -> None:
        self.items.remove(slots)

    def sample(self, u) -> tuple[np.ndarray, np.ndarray]:
        count = self.items.count
        if count == 0:
            return np.empty(0, np.int64), np.empty(0)
        return self.items.draw(u), np.full(len(u), 1.0 / count)

    def victims(self, u) -> np.ndarray:
        return self.items.draw_distinct(u)

    def clear(self) -> None:
        self.items.clear()

    def rebuild(self, slots, priorities) -> None:
        self.items.rebuild(slots)


class PrioritizedModel:
    def __init__(self, arrays: dict[str, np.ndarray], num_slots: int, exponent: float) -> None:
        self.exponent = float(exponent)
        self.num_slots = num_slots
        self.tree = SumTreeModel(arrays["tree"], num_slots)
        self.items = DenseModel(arrays["all.live"], arrays["all.pos"], arrays["all.count"][:1])

    def insert(self, slots, priorities) -> None:
        self.tree.set(slots, weights(priorities, self.exponent))
        self.items.insert(slots)

    def update(self, slots, priorities) -> None:
        self.tree.set(slots, weights(priorities, self.exponent))

    def remove(self, slots) -> None:
        self.items.remove(slots)
        self.tree.set(slots, 0.0)

    def sample(self, u) -> tuple[np.ndarray, np.ndarray]:
        count = self.items.count
        if count == 0:
            return np.empty(0, np.int64), np.empty(0)
        total = self.tree.total
        if not total > 0.0:
            return self.items.draw(u), np.full(len(u), 1.0 / count)
        slots = self.tree.sample(u)
        prob = self.tree.get(slots) / total
        return slots, np.maximum(prob, TINY)

    def victims(self, u) -> np.ndarray:
        n = len(u)
        out: list[int] = []
        saved: list[float] = []
        while len(out) < n and self.tree.total > 0.0:
            leaf = int(self.tree.sample(u[len(out) : len(out) + 1])[0])
            saved.append(float(self.tree.get([leaf])[0]))
            out.append(leaf)
            self.tree.set([leaf], 0.0)
        if out:
            self.tree.set(out, saved)
        k = n - len(out)
        if k:
            live = self.items.live[: self.items.count]
            cand = [int(s) for s in live if not self.tree.tree[self.tree.capacity + s] > 0.0]
            for i in range(k):
                m = len(cand) - i
                j = int(scale(u[len(out)], m))
                cand[j], cand[m - 1] = cand[m - 1], cand[j]
                out.append(cand[m - 1])
        return np.array(out, dtype=np.int64)

    def clear(self) -> None:
        self.tree.clear()
        self.items.clear()

    def rebuild(self, slots, priorities) -> None:
        leaves = np.zeros(self.num_slots)
        leaves[np.asarray(slots, dtype=np.int64)] = weights(priorities, self.exponent)
        self.tree.rebuild(leaves)
        self.items.rebuild(slots)
