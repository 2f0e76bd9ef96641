"""Reading and writing runs of a ring buffer with slices instead of modular fancy indexing.

Rings here are numpy arrays indexed by ever-growing positions (position % len). A run of k
positions is at most two slices: copying them costs two memcpys instead of an arange, a modulo
and a gather, which matters on the daemon's commit path.
"""

from __future__ import annotations

import numpy as np


def ring_get(ring: np.ndarray, start: int, count: int) -> np.ndarray:
    """A copy of positions ``start .. start+count-1`` of ``ring`` (0 <= count <= its size)."""
    size = len(ring)
    if not 0 <= count <= size:
        raise ValueError(f"cannot read {count} positions of a ring of {size}")
    i = start % size
    if i + count <= size:
        return ring[i : i + count].copy()
    head = size - i
    return np.concatenate([ring[i:], ring[: count - head]])


def ring_put(ring: np.ndarray, start: int, values: np.ndarray) -> None:
    """Write ``values`` at positions ``start ..`` of ``ring``."""
    size, count = len(ring), len(values)
    if count > size:
        raise ValueError(f"cannot write {count} positions of a ring of {size}")
    i = start % size
    if i + count <= size:
        ring[i : i + count] = values
    else:
        head = size - i
        ring[i:] = values[:head]
        ring[: count - head] = values[head:]
