"""The reference model of the ordered selectors: Fifo and Lifo's insertion-order ring and the
Min/MaxHeap tournament tree, in numpy (the code shmreplay.engine.selectors ran before the C engine).

Same shared arrays, same results: tests/test_engine_ordered.py drives both with the same
operations and compares every array and every first(n) exactly. Where the model's results
depend on ties, the engine matches it when the present items' touches are distinct (always,
unless the arrays were corrupted).

The heap's model recomputes every ancestor of a changed leaf, level by level; the engine walks
up from each leaf only while the path changes (heap.c's propagate). Both leave the same tree:
a consistent tree (every inner node the winner of its children) is a function of its leaves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from shmreplay.config import SelectorSpec
from shmreplay.engine.rings import ring_get, ring_put
from shmreplay.engine.selectors.base import ArraySpecs, Deterministic
from shmreplay.engine.sumtree import last_wins, sumtree_capacity

HOLE = -1
_HEAD, _TAIL = 0, 1
# The ring holds twice as many entries as there are slots: holes left by removals far from the
# ends then force a compaction (O(slots)) at most once per ``slots`` inserts, O(1) per item.
RING_FACTOR = 2


class InsertionOrder(Deterministic):
    """A selector that picks by insertion order alone; subclasses choose the end it reads."""

    def __init__(self, arrays: dict[str, np.ndarray], spec: SelectorSpec, num_slots: int) -> None:
        super().__init__(arrays, spec, num_slots)
        self.order = arrays["order"]
        self.pos = arrays["pos"]
        self.ends = arrays["ends"][:, 0]  # absolute head and tail counters, one line each

    @classmethod
    def array_specs(cls, num_slots: int) -> ArraySpecs:
        return [
            ("order", "int64", (RING_FACTOR * num_slots,)),
            ("pos", "int64", (num_slots,)),
            ("ends", "int64", (2, 8)),
        ]

    def insert(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        k = len(slots)
        head, tail = int(self.ends[_HEAD]), int(self.ends[_TAIL])
        if tail - head + k > len(self.order):
            head, tail = self._compact(head, tail)
        ring_put(self.order, tail, slots)
        self.pos[slots] = np.arange(tail, tail + k)
        self.ends[_TAIL] = tail + k

    def _compact(self, head: int, tail: int) -> tuple[int, int]:
        entries = ring_get(self.order, head, tail - head)
        live = entries[entries != HOLE]
        self.order[: len(live)] = live
        self.pos[live] = np.arange(len(live))
        self.ends[_HEAD], self.ends[_TAIL] = 0, len(live)
        return 0, len(live)

    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        pass  # order does not depend on priority

    def check(self, size: int) -> str | None:
        head, tail = int(self.ends[_HEAD]), int(self.ends[_TAIL])
        if head < 0 or not size <= tail - head <= len(self.order):
            return (
                f"its order ring's head {head} and tail {tail} cannot hold {size} items in "
                f"{len(self.order)} entries"
            )
        return None

    def remove(self, slots: np.ndarray) -> None:
        self.order[self.pos[slots] % len(self.order)] = HOLE

    def clear(self) -> None:
        self.ends[_HEAD], self.ends[_TAIL] = 0, 0

    def rebuild(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        self.clear()
        self.insert(slots, priorities)


class Fifo(InsertionOrder):
    kind = "fifo"

    def _first(self, n: int) -> np.ndarray:
        """The ``n`` oldest items, oldest first, skipping holes (and dropping the leading ones)."""
        head, tail = int(self.ends[_HEAD]), int(self.ends[_TAIL])
        found: list[np.ndarray] = []
        got, start, window = 0, head, max(2 * n, 64)
        while got < n and start < tail:
            stop = min(tail, start + window)
            entries = ring_get(self.order, start, stop - start)
            live = entries[entries != HOLE]
            if start == head:  # drop the leading holes for good
                first = int(np.argmax(entries != HOLE)) if len(live) else stop - start
                head = start + first
                self.ends[_HEAD] = head
            found.append(live[: n - got])
            got += min(len(live), n - got)
            start, window = stop, window * 2
        return np.concatenate(found) if found else np.empty(0, np.int64)


class Lifo(InsertionOrder):
    kind = "lifo"

    def _first(self, n: int) -> np.ndarray:
        """The ``n`` newest items, newest first, skipping holes (and dropping the trailing ones)."""
        head, tail = int(self.ends[_HEAD]), int(self.ends[_TAIL])
        found: list[np.ndarray] = []
        got, stop, window = 0, tail, max(2 * n, 64)
        while got < n and stop > head:
            start = max(head, stop - window)
            newest_first = ring_get(self.order, start, stop - start)[::-1]
            is_live = newest_first != HOLE
            live = newest_first[is_live]
            if stop == tail:  # drop the trailing holes for good
                tail = stop - (int(np.argmax(is_live)) if len(live) else stop - start)
                self.ends[_TAIL] = tail
            found.append(live[: n - got])
            got += min(len(live), n - got)
            stop, window = start, window * 2
        return np.concatenate(found) if found else np.empty(0, np.int64)


EMPTY = -1
# Each level is 2**ARITY_BITS times narrower than the one below it. Numpy's per-call cost, not
# the elements, dominates the update of a few paths, so a few wide levels beat many binary ones:
# updating 256 of a million items took 2.3x as long with binary levels, 1.5x with 4-ary and 1.2x
# with 8-ary ones; 32-ary saved another 10% but widens every step of the top-n descent.
ARITY_BITS = 4
# A level no wider than this many times the number of nodes to recompute on it is recomputed
# whole: a node costs about the same either way, and slices skip the gathers and the duplicates.
WHOLE_LEVEL_FACTOR = 2
# The top-n descent starts on a level at least this wide: one partition of this many keys is
# cheaper than descending the levels above it one handful of numpy calls at a time.
START_WIDTH = 256
_NO_TOUCH = np.iinfo(np.int64).max  # sorts a child out of a touch comparison


def level_widths(num_slots: int) -> list[int]:
    """Widths of the tree's levels, leaves first: C, C/16, ..., 1."""
    widths = [sumtree_capacity(num_slots)]
    while widths[-1] > 1:
        widths.append(max(1, widths[-1] >> ARITY_BITS))
    return widths


# A node record's words: the key's float64 bits, the touch, the slot (heap.h's shm_heap_node).
NODE_WORDS = 3


@dataclass(frozen=True)
class _Level:
    """Views of one level of the tree (its nodes' key, touch and slot columns) and, for inner
    levels, of the one below."""

    key: np.ndarray
    touch: np.ndarray
    slot: np.ndarray
    bits: int = 0  # log2 of the arity: node i's children are i << bits ... on the level below
    below: _Level | None = None

    def recompute(self, nodes: np.ndarray | None) -> None:
        """Recompute ``nodes`` of this inner level from their children (None: every node)."""
        below, bits = self.below, self.bits
        if nodes is None:
            keys = below.key.reshape(-1, 1 << bits)
            touches = below.touch.reshape(-1, 1 << bits)
            first_child = np.arange(0, len(below.key), 1 << bits)
            nodes = slice(None)
        else:
            keys = below.key.reshape(-1, 1 << bits)[nodes]
            touches = below.touch.reshape(-1, 1 << bits)[nodes]
            first_child = nodes << bits
        best = keys.min(axis=1)  # NaN if a child's key is (corruption): it goes up to the root
        won = first_child + np.where(keys != best[:, None], _NO_TOUCH, touches).argmin(axis=1)
        # A copy of the winner's record (its key's bits too: -0.0 and 0.0 tie), NaN aside.
        self.key[nodes] = np.where(np.isnan(best), best, below.key.take(won))
        self.touch[nodes] = below.touch.take(won)
        self.slot[nodes] = below.slot.take(won)


class Heap(Deterministic):
    """The tournament tree of the module docstring, ordered by ``(sign · priority, touch)``.

    Its arrays are shared; the table clears a new selector (zeroed keys would be items).
    """

    sign: ClassVar[float]

    def __init__(self, arrays: dict[str, np.ndarray], spec: SelectorSpec, num_slots: int) -> None:
        super().__init__(arrays, spec, num_slots)
        self.nodes = arrays["nodes"]
        self.key = self.nodes.view(np.float64)[:, 0]
        self.touch, self.slot = self.nodes[:, 1], self.nodes[:, 2]
        self._clock = arrays["clock"][:1]  # the last touch handed out (0 = none since clear)
        levels: list[_Level] = []
        start = 0
        for width in level_widths(num_slots):
            part = slice(start, start + width)
            below = levels[-1] if levels else None
            bits = (len(below.key) // width).bit_length() - 1 if below else 0
            levels.append(_Level(self.key[part], self.touch[part], self.slot[part], bits, below))
            start += width
        self._levels = levels  # leaves first, root last
        self.capacity = len(levels[0].key)

    @classmethod
    def array_specs(cls, num_slots: int) -> ArraySpecs:
        nodes = sum(level_widths(num_slots))
        return [
            ("nodes", "int64", (nodes, NODE_WORDS)),
            ("clock", "int64", (8,)),
        ]

    # -- the tree ------------------------------------------------------------------------------

    def _refresh(self, slots: np.ndarray) -> None:
        """Recompute the ancestors of the leaves of ``slots``."""
        nodes = np.array(slots, dtype=np.int64)
        for i, level in enumerate(self._levels[1:], start=1):
            nodes >>= level.bits  # repeated parents compute the same winner twice
            if len(level.key) <= WHOLE_LEVEL_FACTOR * len(nodes):
                self._recompute_from(i)
                return
            level.recompute(nodes)

    def _recompute_from(self, first: int) -> None:
        """Recompute every node of inner level ``first`` (≥ 1) and of the levels above."""
        for level in self._levels[first:]:
            level.recompute(None)

    def _set_keys(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """Give ``slots`` their keys and fresh touches, in batch order."""
        k = len(slots)
        t0 = int(self._clock[0])
        self.key[slots] = self.sign * np.asarray(priorities, dtype=np.float64)
        # Touches before the clock: a process dying in between leaves touches above the clock,
        # which rebuild() recognises as unknown.
        self.touch[slots] = np.arange(t0 + 1, t0 + 1 + k)
        self._clock[0] = t0 + k

    @staticmethod
    def _top(keys: np.ndarray, touches: np.ndarray, n: int) -> np.ndarray:
        """Indices of the ``n`` lowest (key, touch) pairs (all if fewer), in no order."""
        if len(keys) <= n:
            return np.arange(len(keys))
        cut = np.partition(keys, n - 1)[n - 1]
        below = np.flatnonzero(keys < cut)
        tied = np.flatnonzero(keys == cut)
        need = n - len(below)
        if need < len(tied):
            tied = tied[np.argpartition(touches.take(tied), need - 1)[:need]]
        return np.concatenate([below, tied])

    def _first(self, n: int) -> np.ndarray:
        """The ``n`` best items, best first (fewer if the table has fewer)."""
        root = self._levels[-1]
        if n <= 1:
            return root.slot.copy() if n == 1 and root.key[0] < np.inf else np.empty(0, np.int64)
        # From the narrowest level at least max(n, START_WIDTH) wide (or the leaves) down.
        depth = next(
            i
            for i in range(len(self._levels) - 1, -1, -1)
            if i == 0 or len(self._levels[i].key) >= max(n, START_WIDTH)
        )
        nodes = np.arange(len(self._levels[depth].key))
        for i in range(depth, -1, -1):
            level = self._levels[i]
            nodes = nodes[self._top(level.key.take(nodes), level.touch.take(nodes), n)]
            if i:
                arity = 1 << level.bits
                nodes = ((nodes << level.bits)[:, None] + np.arange(arity)).ravel()
        keys, touches = self.key.take(nodes), self.touch.take(nodes)
        present = keys < np.inf  # empties were kept only when fewer than n items are present
        order = np.lexsort((touches[present], keys[present]))
        return nodes[present][order]

    # -- the Selector interface ----------------------------------------------------------------

    def insert(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        if len(slots) == 0:
            return
        self._set_keys(slots, priorities)
        self.slot[slots] = slots
        self._refresh(slots)

    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """New priorities; each updated item counts as touched now (in batch order)."""
        if len(slots) == 0:
            return
        slots, priorities = last_wins(slots, np.asarray(priorities))
        self._set_keys(slots, priorities)
        self._refresh(slots)

    def remove(self, slots: np.ndarray) -> None:
        if len(slots) == 0:
            return
        self.key[slots] = np.inf
        self.slot[slots] = EMPTY
        self._refresh(slots)

    def clear(self) -> None:
        self.key[:] = np.inf
        self.slot[:] = EMPTY
        self.touch[:] = 0  # so that stale touches cannot pass for plausible ones later
        self._clock[0] = 0

    def rebuild(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """Rebuild the tree from scratch. A present item keeps its touch when it is plausible
        (1 ≤ touch ≤ clock); the others (restored since clear, or caught mid-write) get fresh
        touches after every kept one, in insertion order. A slot caught mid-insert still holding
        its previous item's touch cannot be told apart and keeps it."""
        slots = np.asarray(slots, dtype=np.int64)
        clock = int(self._clock[0])
        touches = self.touch[slots]
        unknown = slots[(touches < 1) | (touches > clock)]
        self.touch[unknown] = np.arange(clock + 1, clock + 1 + len(unknown))
        self._clock[0] = clock + len(unknown)
        leaves = self._levels[0]
        leaves.key[:] = np.inf
        leaves.slot[:] = EMPTY
        leaves.key[slots] = self.sign * np.asarray(priorities, dtype=np.float64)
        leaves.slot[slots] = slots
        self._recompute_from(1)


class MinHeap(Heap):
    kind = "min_heap"
    sign = 1.0


class MaxHeap(Heap):
    kind = "max_heap"
    sign = -1.0
