"""A float64 sum-tree over a numpy array in shared memory: batched updates and draws, in C.

Layout: ``tree[1]`` is the root, node i has children 2i and 2i+1, leaf j lives at
``tree[capacity + j]`` with capacity the next power of two ≥ the number of leaves. Parents are
always recomputed from their children (never adjusted by a delta), so rounding errors cannot
accumulate over billions of updates: a node is exactly the float sum of its two children.

The work is done by the engine (``csrc/sumtree.c``); tests/reference/sumtree.py is the numpy
model it is held to.
"""

from __future__ import annotations

import numpy as np

from . import _native


def sumtree_capacity(num_leaves: int) -> int:
    """Leaves in the tree: the next power of two ≥ ``num_leaves`` (at least 1)."""
    return 1 << max(0, int(num_leaves) - 1).bit_length()


def last_wins(index: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop all but the last of repeated indices, keeping those last occurrences in call order
    (the order one-at-a-time updates would touch them: heaps break ties by it). numpy does not
    promise which of repeated indices an assignment keeps. O(n) in the engine (a hash set)."""
    index = np.asarray(index)
    if index.size < 2:
        return index, values
    keys = np.ascontiguousarray(index).reshape(-1)
    keys = keys.view(np.int64) if keys.dtype.kind in "iu" and keys.itemsize == 8 else keys
    keep = np.empty(keys.shape, dtype=bool)
    if _native.last_wins_mask(np.ascontiguousarray(keys, dtype=np.int64), keep) == keys.size:
        return index, values
    return index[keep], values[keep]


class SumTree:
    """Weights of ``num_leaves`` leaves; ``tree`` is a float64 array of 2·capacity entries."""

    def __init__(self, tree: np.ndarray, num_leaves: int) -> None:
        self.capacity = sumtree_capacity(num_leaves)
        if tree.dtype != np.float64 or tree.shape != (2 * self.capacity,):
            raise ValueError(
                f"sum-tree needs float64[{2 * self.capacity}], got {tree.dtype}{tree.shape}"
            )
        self.tree = tree
        self.num_leaves = int(num_leaves)
        self._c = _native.SumTree(tree, self.num_leaves)

    @property
    def total(self) -> float:
        return self._c.total

    def get(self, leaves: np.ndarray) -> np.ndarray:
        leaves = np.ascontiguousarray(leaves, dtype=np.int64)
        out = np.empty(leaves.shape)
        self._c.get(leaves.reshape(-1), out.reshape(-1))
        return out

    def set(self, leaves: np.ndarray, values: np.ndarray) -> None:
        """Set leaf weights in order (the last value wins for a repeated leaf), then their
        ancestors. A leaf outside [0, num_leaves) raises ValueError, changing nothing."""
        leaves = np.ascontiguousarray(np.atleast_1d(leaves), dtype=np.int64).reshape(-1)
        values = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
        if values.size != leaves.size:
            values = np.ascontiguousarray(np.broadcast_to(values, leaves.shape))
        self._c.set(leaves, values)

    def clear(self) -> None:
        self._c.clear()

    def rebuild(self, leaf_values: np.ndarray) -> None:
        """Replace every leaf with ``leaf_values`` (length num_leaves) and recompute all nodes."""
        values = np.ascontiguousarray(leaf_values, dtype=np.float64)
        if values.shape != (self.num_leaves,):
            values = np.ascontiguousarray(np.broadcast_to(values, (self.num_leaves,)))
        self._c.rebuild(values)

    def sample(self, u: np.ndarray) -> np.ndarray:
        """Leaves for uniform draws ``u`` in [0, 1), each with probability weight/total.

        Per draw, mass = u·total descends from the root: right (mass -= left weight) when the
        left weight is 0, or when mass >= the left weight and the right subtree weighs > 0; else
        left, with mass clamped to the left weight. So a leaf of weight 0 (or a padding leaf) is
        never returned, whatever the rounding. A total that is not a finite number > 0 raises
        ValueError; a tree whose nodes are not the sums of their children may raise
        CorruptStructure.
        """
        u = np.ascontiguousarray(u, dtype=np.float64)
        out = np.empty(u.shape, dtype=np.int64)
        self._c.sample(u.reshape(-1), out.reshape(-1))
        return out
