"""Lifo: the newest inserted item; reported probability 1.

The ring of fifo.py read from the other end: picks scan back from the tail, skipping holes, and
drop the trailing holes for good, so the common case (a Lifo remover evicting the item just
inserted, or a max_times_sampled=1 sampler consuming the newest) rewinds the tail and the ring
needs no compaction.
"""

from __future__ import annotations

import numpy as np

from .fifo import InsertionOrder


class Lifo(InsertionOrder):
    kind = "lifo"

    def _first(self, n: int) -> np.ndarray:
        """The ``n`` newest items, newest first, skipping holes (and dropping the trailing ones)."""
        out = np.empty(n, np.int64)
        return out[: self._ring.first_lifo(n, out)]
