"""Fifo: the oldest inserted item; reported probability 1.

Items sit in a ring in insertion order (``order``), each remembering its ring position (``pos``).
Removal punches a hole (-1) that the ring skips and later compacts, so removing from the middle
(delete, max_times_sampled) is O(1) per item and the common case (evict or sample the oldest)
touches only the head. Lifo (lifo.py) keeps the same ring and reads it from the tail.
"""

from __future__ import annotations

import numpy as np

from ...config import SelectorSpec
from .._native import OrderRing
from .base import ArraySpecs, Deterministic

HOLE = -1
_HEAD, _TAIL = 0, 1
# The ring holds twice as many entries as there are slots: holes left by removals far from the
# ends then force a compaction (O(slots)) at most once per ``slots`` inserts, O(1) per item.
RING_FACTOR = 2


class InsertionOrder(Deterministic):
    """A selector that picks by insertion order alone; subclasses choose the end it reads.

    The ring's operations run in C (csrc/order.c, over the same shared arrays); the numpy
    version they are tested against is tests/reference/ordered_selectors.py. Entries read from
    the shared arrays are range-checked there: CorruptStructure, never a stray access."""

    def __init__(self, arrays: dict[str, np.ndarray], spec: SelectorSpec, num_slots: int) -> None:
        super().__init__(arrays, spec, num_slots)
        self.order = arrays["order"]
        self.pos = arrays["pos"]
        self.ends = arrays["ends"][:, 0]  # absolute head and tail counters, one line each
        self._ring = OrderRing(self.order, self.pos, arrays["ends"])

    @classmethod
    def array_specs(cls, num_slots: int) -> ArraySpecs:
        return [
            ("order", "int64", (RING_FACTOR * num_slots,)),
            ("pos", "int64", (num_slots,)),
            ("ends", "int64", (2, 8)),
        ]

    def insert(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        self._ring.insert(np.ascontiguousarray(slots, dtype=np.int64))

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
        self._ring.remove(np.ascontiguousarray(slots, dtype=np.int64))

    def _c_selector(self) -> object:
        return self._ring._selector(self.kind == "lifo")

    def clear(self) -> None:
        self._ring.clear()

    def rebuild(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        self._ring.rebuild(np.ascontiguousarray(slots, dtype=np.int64))


class Fifo(InsertionOrder):
    kind = "fifo"

    def _first(self, n: int) -> np.ndarray:
        """The ``n`` oldest items, oldest first, skipping holes (and dropping the leading ones)."""
        out = np.empty(n, np.int64)
        return out[: self._ring.first_fifo(n, out)]
