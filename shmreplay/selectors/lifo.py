"""Lifo: the newest inserted item; reported probability 1.

The ring of fifo.py read from the other end: picks scan back from the tail, skipping holes, and
drop the trailing holes for good, so the common case (a Lifo remover evicting the item just
inserted, or a max_times_sampled=1 sampler consuming the newest) rewinds the tail and the ring
needs no compaction.
"""

from __future__ import annotations

import numpy as np

from ..rings import ring_get
from .fifo import _HEAD, _TAIL, HOLE, InsertionOrder


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
