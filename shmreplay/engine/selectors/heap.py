"""MinHeap and MaxHeap: the lowest (highest) priority item, ties to the least recently inserted or
updated; reported probability 1.

Items are ordered by ``(key, touch)``, lowest first: key is the priority (MinHeap) or minus it
(MaxHeap), touch the number a selector-wide clock handed the item when it was last inserted or
updated. A 16-ary tournament tree finds the lowest. Its levels lie end to end in three arrays,
``key``, ``touch`` and ``slot``, leaves first, root last: leaf s is slot s (its key, +inf while
the slot holds no item; its touch; s itself, or -1), and an inner node holds a copy of the
(key, touch, slot) of the winner among its children, ``16i .. 16i+15`` on the level below (the
level under the root may have fewer). Priorities are finite (the client refuses others), so a
key of +inf means an empty subtree, and the root is the best item.

Copying the winner's key and touch into its parent, rather than looking them up by slot, makes
a node's children one contiguous row: recomputing a node reads two rows instead of gathering
from random slots, which is what costs at a million items.

The tree runs in C (csrc/heap.c, over the same shared arrays); the numpy version it is tested
against, array for array, is tests/reference/ordered_selectors.py. Costs for a batch of k over C
leaves (C the next power of two ≥ the slots; L = log16 C levels, 5 for a million slots):

- insert, update, remove: write k leaves, then recompute their ancestors level by level, each
  distinct ancestor once, one row of 16 children per node: O(16·k·L). A level no wider than
  ``WHOLE_LEVEL_FACTOR``·k is recomputed whole (with the levels above), which costs no more.
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
# Each level is 2**ARITY_BITS times narrower than the one below it (heap.h has the same).
ARITY_BITS = 4
# A level no wider than this many times the batch is recomputed whole (heap.h has the same).
WHOLE_LEVEL_FACTOR = 2
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
        self.key, self.touch, self.slot = arrays["key"], arrays["touch"], arrays["slot"]
        self._clock = arrays["clock"][:1]  # the last touch handed out (0 = none since clear)
        self.capacity = sumtree_capacity(num_slots)
        self._tree = _NativeHeap(
            self.key, self.touch, self.slot, arrays["clock"], num_slots, self.sign
        )

    @classmethod
    def array_specs(cls, num_slots: int) -> ArraySpecs:
        nodes = sum(level_widths(num_slots))
        return [
            ("key", "float64", (nodes,)),
            ("touch", "int64", (nodes,)),
            ("slot", "int64", (nodes,)),
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
