"""Fifo: the oldest inserted item; reported probability 1.

Items sit in a ring in insertion order (``order``), each remembering its ring position (``pos``).
Removal punches a hole (-1) that the ring skips and later compacts, so removing from the middle
(delete, max_times_sampled) is O(1) per item and the common case (evict or sample the oldest)
touches only the head. Lifo (lifo.py) keeps the same ring and reads it from the tail.
"""

from __future__ import annotations

import numpy as np

from ..config import SelectorSpec
from ..rings import ring_get, ring_put
from .base import ArraySpecs, Deterministic

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
