"""The selector interface: how a table picks items to sample (sampler) or to evict (remover).

A selector's state lives in shared memory, in arrays the layout allocates from
:meth:`Selector.array_specs`, so every process that holds the table mutex sees one selector.
All methods are called with the table mutex held and take numpy arrays of slot indices: they are
vectorised over the batch (no per-item Python loop).

The per-slot metadata of the table is the source of truth; a selector's arrays are derived from it
and :meth:`Selector.rebuild` recreates them from scratch (the path taken after a process died
holding the mutex, and on restore).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import numpy as np

from ...config import SelectorSpec
from ...errors import SegmentError
from ...values import DBL_MAX
from .. import _native

ArraySpecs = list[tuple[str, str, tuple[int, ...]]]
# Given slots, how many more times each may be sampled (None: no max_times_sampled).
TimesLeft = Callable[[np.ndarray], np.ndarray] | None


class CorruptStructure(SegmentError):
    """A selector's shared arrays contradict themselves (they live in memory every sampler can
    write). The table rebuilds them from the per-slot metadata (TableCore.repair)."""


class Selector(ABC):
    kind: ClassVar[str]

    def __init__(self, arrays: dict[str, np.ndarray], spec: SelectorSpec, num_slots: int) -> None:
        self.arrays = arrays
        self.spec = spec
        self.num_slots = num_slots

    @classmethod
    @abstractmethod
    def array_specs(cls, num_slots: int) -> ArraySpecs:
        """Names, dtypes and shapes of the shared arrays this selector needs."""

    @abstractmethod
    def insert(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """Add new items, given in insertion order."""

    @abstractmethod
    def update(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """Change the priorities of items present (duplicates: the last one wins)."""

    @abstractmethod
    def remove(self, slots: np.ndarray) -> None:
        """Forget items present (distinct slots)."""

    @abstractmethod
    def sample(
        self, n: int, rng: np.random.Generator, times_left: TimesLeft
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pick up to ``n`` items to sample; returns (slots, probabilities).

        Random selectors draw independently (the same item may come twice). Deterministic ones
        return the item they would return on each of ``n`` successive samples, given
        ``times_left``; they may return fewer when the table runs out.
        """

    @abstractmethod
    def victims(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Pick ``n`` distinct items to evict (``n`` ≤ the number of items)."""

    @abstractmethod
    def clear(self) -> None:
        """Forget every item."""

    @abstractmethod
    def rebuild(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """Recreate the state from the items present, given in insertion order."""

    def _c_selector(self) -> object:
        """The compiled selector under this one, as a capsule for CommitTable.attach (the
        daemon's commit inserts, removes and evicts through it without Python)."""
        raise NotImplementedError(f"{self.kind}: no compiled selector")

    def options(self) -> dict[str, object]:
        """The selector's options, for table info."""
        return {"kind": self.kind}

    @property
    def max_priority(self) -> float:
        """The largest priority this selector accepts: any finite one (the largest float64),
        unless it computes with priorities (Prioritized overrides it). The client checks
        priorities against the smaller of a table's sampler's and remover's limits."""
        return DBL_MAX

    def check(self, size: int) -> str | None:
        """What is wrong with the selector's own counts for a table of ``size`` items, in O(1),
        or None. The table rebuilds the selector (:meth:`rebuild`) if something is: its arrays
        live in memory every sampler can write. This one checks every DenseSet it keeps."""
        for name, value in vars(self).items():
            if isinstance(value, DenseSet) and value.count != size:
                return f"its {name} set counts {value.count} items, the table holds {size}"
        return None


class Deterministic(Selector):
    """A selector that picks items in an order (insertion order, priority order) rather than at
    random: sampling and eviction both take the first items of that order, probability 1."""

    @abstractmethod
    def _first(self, n: int) -> np.ndarray:
        """The ``n`` items picked first, in picking order (fewer if the table has fewer)."""

    def sample(
        self, n: int, rng: np.random.Generator, times_left: TimesLeft
    ) -> tuple[np.ndarray, np.ndarray]:
        if times_left is None:  # the first item, every time
            slots = np.repeat(self._first(1), n)
        else:  # each item as many times as it may still be sampled, then the next one
            candidates = self._first(n)
            slots = np.repeat(candidates, times_left(candidates))[:n]
        return slots, np.ones(len(slots))

    def victims(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self._first(n)


class DenseSet:
    """The set of items as a dense array, for O(1) uniform draws and O(k) batched removal.

    ``live[:count]`` holds the slots in no particular order, ``pos[slot]`` a slot's index there.
    The work is done by the engine (``csrc/dense.c``); every index it reads from these shared
    arrays is range-checked first. tests/reference/random_selectors.py is its numpy model.
    """

    def __init__(self, live: np.ndarray, pos: np.ndarray, count: np.ndarray) -> None:
        self.live = live
        self.pos = pos
        self._count = count  # a 1-element view of an int64 on its own cache line
        self._c = _native.DenseSet(live, pos, count)

    @staticmethod
    def array_specs(num_slots: int, prefix: str = "") -> ArraySpecs:
        return [
            (prefix + "live", "int64", (num_slots,)),
            (prefix + "pos", "int64", (num_slots,)),
            (prefix + "count", "int64", (8,)),
        ]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "") -> DenseSet:
        return cls(arrays[prefix + "live"], arrays[prefix + "pos"], arrays[prefix + "count"][:1])

    @property
    def count(self) -> int:
        return int(self._count[0])

    def insert(self, slots: np.ndarray) -> None:
        """Append new members (ValueError for a slot out of range or past the capacity;
        CorruptStructure for a count out of range)."""
        self._c.insert(np.ascontiguousarray(slots, dtype=np.int64))

    def remove(self, slots: np.ndarray) -> None:
        """Remove distinct members. Raises CorruptStructure (changing nothing) if the arrays
        say they are not members, or count is out of range."""
        self._c.remove(np.ascontiguousarray(slots, dtype=np.int64))

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` members with replacement: u = rng.random(n), live[min(floor(u·count),
        count − 1)]."""
        out = np.empty(n, dtype=np.int64)
        self._c.draw(rng.random(n), out)
        return out

    def draw_distinct(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` distinct members: u = rng.random(n), a partial Fisher–Yates on live itself
        (csrc/dense.h), which reorders the set without changing it."""
        out = np.empty(n, dtype=np.int64)
        self._c.draw_distinct(rng.random(n), out)
        return out

    def clear(self) -> None:
        self._count[0] = 0

    def rebuild(self, slots: np.ndarray) -> None:
        self._c.rebuild(np.ascontiguousarray(slots, dtype=np.int64))
