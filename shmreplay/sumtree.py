"""A float64 sum-tree over a numpy array in shared memory, with vectorised updates and draws.

Layout: ``tree[1]`` is the root, node i has children 2i and 2i+1, leaf j lives at
``tree[capacity + j]`` with capacity the next power of two ≥ the number of leaves. Parents are
always recomputed from their children (never adjusted by a delta), so rounding errors cannot
accumulate over billions of updates: a node is exactly the float sum of its two children.
"""

from __future__ import annotations

import numpy as np


def sumtree_capacity(num_leaves: int) -> int:
    """Leaves in the tree: the next power of two ≥ ``num_leaves`` (at least 1)."""
    return 1 << max(0, int(num_leaves) - 1).bit_length()


def sumtree_nbytes(num_leaves: int) -> int:
    return 2 * sumtree_capacity(num_leaves) * 8


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
        self.depth = self.capacity.bit_length() - 1

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def get(self, leaves: np.ndarray) -> np.ndarray:
        return self.tree[self.capacity + np.asarray(leaves, dtype=np.int64)]

    def set(self, leaves: np.ndarray, values: np.ndarray) -> None:
        """Set leaf weights (the last value wins for a repeated leaf), then their ancestors."""
        leaves = np.asarray(leaves, dtype=np.int64)
        values = np.broadcast_to(np.asarray(values, dtype=np.float64), leaves.shape)
        if leaves.size == 0:
            return
        if leaves.size > 1:
            # numpy does not promise an order for repeated indices in an assignment
            rev_unique, rev_first = np.unique(leaves[::-1], return_index=True)
            if rev_unique.size != leaves.size:
                leaves, values = rev_unique, values[::-1][rev_first]
        tree = self.tree
        node = leaves + self.capacity
        tree[node] = values
        for _ in range(self.depth):
            node >>= 1  # repeated parents just compute the same exact sum twice
            tree[node] = tree[2 * node] + tree[2 * node + 1]

    def clear(self) -> None:
        self.tree[:] = 0.0

    def rebuild(self, leaf_values: np.ndarray) -> None:
        """Replace every leaf with ``leaf_values`` (length num_leaves) and recompute all nodes."""
        cap, tree = self.capacity, self.tree
        tree[:] = 0.0
        tree[cap : cap + self.num_leaves] = leaf_values
        lo = cap
        while lo > 1:
            hi, lo = lo, lo // 2
            tree[lo:hi] = tree[2 * lo : 2 * hi : 2] + tree[2 * lo + 1 : 2 * hi : 2]

    def sample(self, u: np.ndarray) -> np.ndarray:
        """Leaves for uniform draws ``u`` in [0, 1), each with probability weight/total.

        The descent never enters a subtree of zero weight, so rounding at a boundary cannot
        return a leaf of weight 0 (or a padding leaf beyond num_leaves).
        """
        total = self.tree[1]
        if not total > 0.0:
            raise ValueError("cannot sample from a sum-tree whose total weight is 0")
        tree = self.tree
        mass = np.asarray(u, dtype=np.float64) * total
        node = np.ones(mass.shape, dtype=np.int64)
        for _ in range(self.depth):
            left = 2 * node
            lw = tree[left]
            go_right = ((mass >= lw) & (tree[left + 1] > 0.0)) | (lw <= 0.0)
            mass -= np.where(go_right, lw, 0.0)
            node = left + go_right
        return node - self.capacity
