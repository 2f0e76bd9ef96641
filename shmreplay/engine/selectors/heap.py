"""MinHeap and MaxHeap: the lowest (highest) priority item, ties to the least recently inserted or
updated; reported probability 1.

Items are ordered by ``(key, touch)``, lowest first: key is the priority (MinHeap) or minus it
(MaxHeap), touch the number a selector-wide clock handed the item when it was last inserted or
updated. A 16-ary tournament tree finds the lowest. Its levels lie end to end in one array of
node records, ``nodes`` (int64, one row of three words per node: the key's float64 bits, the
touch, the slot; ``key``, ``touch`` and ``slot`` are views of its columns), leaves first, root
last: leaf s is slot s (its key, +inf while the slot holds no item; its touch; s itself, or -1),
and an inner node holds a copy of the record of the winner among its children, ``16i .. 16i+15``
on the level below (the level under the root may have fewer). Priorities are finite (the client
refuses others), so a key of +inf means an empty subtree, and the root is the best item.

A node's key, touch and slot share a cache line (or two adjacent ones), and copying the winner's
record into its parent, rather than looking it up by slot, makes a node's children one
contiguous row of 384 bytes: at a million items every line touched is a cache miss, and this is
what keeps their number low.

The tree runs in C (csrc/heap.c, over the same shared array); the numpy version it is tested
against, array for array, is tests/reference/ordered_selectors.py. Costs for a batch of k over C
leaves (C the next power of two ≥ the slots; L = log16 C levels, 5 for a million slots):

- insert, update, remove: write each leaf, then walk up from it while the path changes. A
  parent is a copy of its children's winner, so its own record settles it most of the time:
  the new leaf beats it (the parent becomes the leaf's copy, and the walk goes on), or loses to
  it while the winner is another child (nothing above changes: the walk stops). Only when the
  winner itself got worse (or on a tie) is the row of 16 children read again. A random insert,
  update or removal in a full tree reads the leaf and its parent, and a row about once in 16:
  O(k) expected, O(16·k·L) at worst. The tree that results is the one that recomputing every
  ancestor gives (what the model does), since a consistent tree is a function of its leaves.
- the best item: the root, O(1); ``sample(n)`` without max_times_sampled repeats it.
- the n best, best first (``victims(n)``, ``sample(n)`` with max_times_sampled): a pruned
  descent from the root. A node's winner beats every item below it, so the n best items lie
  below the n best nodes of every level: gather the children of the kept nodes, select the n
  best (introselect), step down. Once n nodes are kept, a child worse than the worst of them
  cannot be among the n best and is skipped as it is read, so each level gathers little more
  than n children: O(16·n·L) reads, then one sort of the n found (introsort). Ties are broken
  by touch, then by slot.

Everything read from the arrays is checked where it could address memory (a winner's slot, a
NaN key): CorruptStructure, which makes the table rebuild the selector.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ...config import SelectorSpec
from .._native import Heap as _NativeHeap
from ..sumtree import sumtree_capacity
from .base import ArraySpecs, Deterministic

EMPTY = -1
# A node record's words: the key's float64 bits, the touch, the slot (heap.h's shm_heap_node).
NODE_WORDS = 3
# Each level is 2**ARITY_BITS times narrower than the one below it (heap.h has the same).
ARITY_BITS = 4
# A clock beyond this is corrupt (it could overflow): check() reports it, rebuild() resets it.
MAX_CLOCK = 1 << 62


def level_widths(num_slots: int) -> list[int]:
    """Widths of the tree's levels, leaves first: C, C/16, ..., 1."""
    widths = [sumtree_capacity(num_slots)]
    while widths[-1] > 1:
        widths.append(max(1, widths[-1] >> ARITY_BITS))
    return widths


class Heap(Deterministic):
    """The tournament tree of the module docstring, ordered by ``(sign · priority, touch)``.

    Its arrays are shared; the table clears a new selector (zeroed keys would be items).
    """

    sign: ClassVar[float]

    def __init__(self, arrays: dict[str, np.ndarray], spec: SelectorSpec, num_slots: int) -> None:
        super().__init__(arrays, spec, num_slots)
        self.nodes = arrays["nodes"]
        # Views of the records' columns, indexed by node (leaf s is node s).
        self.key = self.nodes.view(np.float64)[:, 0]
        self.touch, self.slot = self.nodes[:, 1], self.nodes[:, 2]
        self._clock = arrays["clock"][:1]  # the last touch handed out (0 = none since clear)
        self.capacity = sumtree_capacity(num_slots)
        self._tree = _NativeHeap(self.nodes, arrays["clock"], num_slots, self.sign)

    @classmethod
    def array_specs(cls, num_slots: int) -> ArraySpecs:
        nodes = sum(level_widths(num_slots))
        return [
            ("nodes", "int64", (nodes, NODE_WORDS)),
            ("clock", "int64", (8,)),
        ]

    def _first(self, n: int) -> np.ndarray:
        """The ``n`` best items, best first (fewer if the table has fewer)."""
        out = np.empty(n, np.int64)
        return out[: self._tree.first(n, out)]

    # -- the Selector interface ----------------------------------------------------------------

    def insert(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        self._tree.insert(
            np.ascontiguousarray(slots, dtype=np.int64),
            np.ascontiguousarray(priorities, dtype=np.float64),
        )

    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """New priorities; each updated item counts as touched now (in batch order; a repeated
        slot keeps its last priority and counts as touched there)."""
        self._tree.update(
            np.ascontiguousarray(slots, dtype=np.int64),
            np.ascontiguousarray(priorities, dtype=np.float64),
        )

    def remove(self, slots: np.ndarray) -> None:
        self._tree.remove(np.ascontiguousarray(slots, dtype=np.int64))

    def _c_selector(self) -> object:
        return self._tree._selector()

    def clear(self) -> None:
        self._tree.clear()

    def check(self, size: int) -> str | None:
        clock = int(self._clock[0])
        if not 0 <= clock <= MAX_CLOCK:
            return f"its clock is {clock}, outside 0..{MAX_CLOCK}"
        return None

    def rebuild(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """Rebuild the tree from scratch. A present item keeps its touch when it is plausible
        (1 ≤ touch ≤ clock); the others (restored since clear, or caught mid-write) get fresh
        touches after every kept one, in insertion order. A slot caught mid-insert still holding
        its previous item's touch cannot be told apart and keeps it. A clock outside
        0..MAX_CLOCK counts as 0 (every touch unknown)."""
        self._tree.rebuild(
            np.ascontiguousarray(slots, dtype=np.int64),
            np.ascontiguousarray(priorities, dtype=np.float64),
        )


class MinHeap(Heap):
    kind = "min_heap"
    sign = 1.0


class MaxHeap(Heap):
    kind = "max_heap"
    sign = -1.0
