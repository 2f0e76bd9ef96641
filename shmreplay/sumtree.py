"""A float64 sum-tree over a numpy array in shared memory, with vectorised updates and draws.

Layout: ``tree[1]`` is the root, node i has children 2i and 2i+1, leaf j lives at
``tree[capacity + j]`` with capacity the next power of two ≥ the number of leaves. Parents are
always recomputed from their children (never adjusted by a delta), so rounding errors cannot
accumulate over billions of updates: a node is exactly the float sum of its two children.
"""

from __future__ import annotations

import numpy as np

# Sampling starts with a cumsum over the level of this many nodes instead of descending the
# levels above it one numpy call at a time.
SHORTCUT_WIDTH = 4096
# Levels up to this many times wider than the batch are recomputed whole: slices beat fancy
# indexing until then.
WHOLE_LEVEL_FACTOR = 16


def sumtree_capacity(num_leaves: int) -> int:
    """Leaves in the tree: the next power of two ≥ ``num_leaves`` (at least 1)."""
    return 1 << max(0, int(num_leaves) - 1).bit_length()


def sumtree_nbytes(num_leaves: int) -> int:
    return 2 * sumtree_capacity(num_leaves) * 8


def last_wins(index: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop all but the last of repeated indices, keeping those last occurrences in call order
    (the order one-at-a-time updates would touch them: heaps break ties by it). numpy does not
    promise which of repeated indices an assignment keeps."""
    if index.size < 2:
        return index, values
    ordered = np.sort(index)
    if not (ordered[1:] == ordered[:-1]).any():
        return index, values
    _, first_from_end = np.unique(index[::-1], return_index=True)
    keep = np.sort(len(index) - 1 - first_from_end)
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
        self.depth = self.capacity.bit_length() - 1

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def get(self, leaves: np.ndarray) -> np.ndarray:
        return self.tree[self.capacity + np.asarray(leaves, dtype=np.int64)]

    def set(self, leaves: np.ndarray, values: np.ndarray) -> None:
        """Set leaf weights (the last value wins for a repeated leaf), then their ancestors."""
        leaves = np.atleast_1d(np.asarray(leaves, dtype=np.int64))
        values = np.asarray(values, dtype=np.float64)
        if values.shape != leaves.shape:
            values = np.broadcast_to(values, leaves.shape)
        if leaves.size == 0:
            return
        leaves, values = last_wins(leaves, values)
        tree = self.tree
        node = leaves + self.capacity
        tree[node] = values
        width = self.capacity  # nodes on the current level
        left = np.empty_like(node)
        while width > 1:
            node >>= 1  # repeated parents just compute the same exact sum twice
            width >>= 1
            if width <= WHOLE_LEVEL_FACTOR * len(node):
                self._recompute_levels(width)  # near the root a whole level costs no more
                return
            np.add(node, node, out=left)
            tree[node] = tree.take(left) + tree.take(left + 1)

    def _recompute_levels(self, width: int) -> None:
        """Recompute every node on the level of ``width`` nodes and all levels above it."""
        tree = self.tree
        lo = width
        while lo >= 1:
            np.add(tree[2 * lo : 4 * lo : 2], tree[2 * lo + 1 : 4 * lo : 2], out=tree[lo : 2 * lo])
            lo >>= 1

    def clear(self) -> None:
        self.tree[:] = 0.0

    def rebuild(self, leaf_values: np.ndarray) -> None:
        """Replace every leaf with ``leaf_values`` (length num_leaves) and recompute all nodes."""
        cap, tree = self.capacity, self.tree
        tree[:] = 0.0
        tree[cap : cap + self.num_leaves] = leaf_values
        if cap > 1:
            self._recompute_levels(cap // 2)
        else:
            tree[1] = tree[cap]

    def sample(self, u: np.ndarray) -> np.ndarray:
        """Leaves for uniform draws ``u`` in [0, 1), each with probability weight/total.

        Never returns a leaf of weight 0 (or a padding leaf beyond num_leaves), whatever the
        rounding at boundaries.
        """
        tree = self.tree
        if not 0.0 < tree[1] < np.inf:  # an inf total would put every draw on one leaf
            raise ValueError(f"cannot sample from a sum-tree whose total weight is {tree[1]}")
        u = np.asarray(u, dtype=np.float64)
        # The top of the tree is skipped: one cumsum over a level of ≤ SHORTCUT_WIDTH nodes and
        # a searchsorted pick the node on that level, then the descent continues from there.
        width = min(self.capacity, SHORTCUT_WIDTH)
        cum = np.cumsum(tree[width : 2 * width])
        mass = u * cum[-1]
        j = np.searchsorted(cum, mass, side="right")  # cum[j-1] <= mass < cum[j]
        np.minimum(j, width - 1, out=j)
        mass -= np.where(j > 0, cum.take(j - 1), 0.0)
        node = self._descend(mass, j + width, (self.capacity // width).bit_length() - 1)
        # Rounding at a boundary (mass ≈ a node's sum) can step into a zero-weight right
        # subtree; it is rare, so those few draws are redone with a guarded descent.
        bad = tree.take(node) <= 0.0
        if bad.any():
            node[bad] = self._descend_guarded(u[bad] * tree[1])
        return node - self.capacity

    def _descend(self, mass: np.ndarray, node: np.ndarray, levels: int) -> np.ndarray:
        # numpy calls dominate at batch sizes of a few hundred: keep them to five per level
        tree = self.tree
        lw = np.empty_like(mass)
        right = np.empty(mass.shape, dtype=bool)
        for _ in range(levels):
            node += node
            tree.take(node, out=lw)
            np.greater_equal(mass, lw, out=right)
            mass -= lw * right
            node += right
        return node

    def _descend_guarded(self, mass: np.ndarray) -> np.ndarray:
        tree = self.tree
        node = np.ones(mass.shape, dtype=np.int64)
        for _ in range(self.depth):
            left = 2 * node
            lw = tree[left]
            go_right = ((mass >= lw) & (tree[left + 1] > 0.0)) | (lw <= 0.0)
            mass = np.where(go_right, mass - lw, np.minimum(mass, lw))
            node = left + go_right
        return node
