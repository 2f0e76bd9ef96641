"""Reference model of the sum-tree (csrc/sumtree.c): plain numpy over the same float64 array.

Layout: ``tree[1]`` is the root, node i has children 2i and 2i+1, leaf j at ``tree[capacity + j]``.
Every node is the float sum of its two children, recomputed from them after a change, so the
engine and this model give the same bits whatever the order they recompute in.
"""

from __future__ import annotations

import numpy as np

from shmreplay.engine.sumtree import sumtree_capacity


def last_wins(index: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All but the last of repeated indices dropped, those last occurrences in call order."""
    if index.size < 2:
        return index, values
    _, first_from_end = np.unique(index[::-1], return_index=True)
    keep = np.sort(len(index) - 1 - first_from_end)
    return index[keep], values[keep]


class SumTreeModel:
    def __init__(self, tree: np.ndarray, num_leaves: int) -> None:
        self.capacity = sumtree_capacity(num_leaves)
        assert tree.dtype == np.float64 and tree.shape == (2 * self.capacity,)
        self.tree = tree
        self.num_leaves = int(num_leaves)
        self.depth = self.capacity.bit_length() - 1

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def get(self, leaves) -> np.ndarray:
        leaves = np.asarray(leaves, dtype=np.int64)
        if ((leaves < 0) | (leaves >= self.num_leaves)).any():
            raise ValueError("leaf out of range")
        return self.tree[self.capacity + leaves]

    def set(self, leaves, values) -> None:
        """Sequential semantics (the last value wins for a repeated leaf), then every ancestor of
        a leaf set recomputed from its children, level by level."""
        leaves = np.atleast_1d(np.asarray(leaves, dtype=np.int64))
        values = np.broadcast_to(np.asarray(values, dtype=np.float64), leaves.shape)
        if leaves.size == 0:
            return
        if ((leaves < 0) | (leaves >= self.num_leaves)).any():
            raise ValueError("leaf out of range")
        leaves, values = last_wins(leaves, values)
        tree = self.tree
        node = leaves + self.capacity
        tree[node] = values
        while node[0] > 1:
            node = np.unique(node >> 1)
            tree[node] = tree[2 * node] + tree[2 * node + 1]

    def clear(self) -> None:
        self.tree[:] = 0.0

    def recompute(self) -> None:
        tree, lo = self.tree, self.capacity // 2
        while lo >= 1:
            tree[lo : 2 * lo] = tree[2 * lo : 4 * lo : 2] + tree[2 * lo + 1 : 4 * lo : 2]
            lo >>= 1

    def rebuild(self, leaf_values) -> None:
        cap = self.capacity
        self.tree[:] = 0.0
        self.tree[cap : cap + self.num_leaves] = leaf_values
        self.recompute()

    def sample(self, u) -> np.ndarray:
        """Per draw, mass = u·total descends from the root: at a node with left weight lw and
        right weight rw, right (mass -= lw) when lw <= 0 or (mass >= lw and rw > 0), else left
        with mass = min(mass, lw). Never a leaf of weight 0 or padding."""
        tree = self.tree
        total = tree[1]
        if not 0.0 < total < np.inf:
            raise ValueError(f"cannot sample from a sum-tree whose total weight is {total}")
        mass = np.asarray(u, dtype=np.float64) * total
        node = np.ones(mass.shape, dtype=np.int64)
        for _ in range(self.depth):
            left = 2 * node
            lw = tree[left]
            go_right = (lw <= 0.0) | ((mass >= lw) & (tree[left + 1] > 0.0))
            mass = np.where(go_right, mass - lw, np.minimum(mass, lw))
            node = left + go_right
        leaf = node - self.capacity
        assert (leaf < self.num_leaves).all() and (tree[node] > 0.0).all()
        return leaf
