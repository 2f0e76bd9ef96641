"""Ring runs read and written with slices agree with modular indexing, across the wrap."""

from __future__ import annotations

import numpy as np
import pytest

from shmreplay.engine.rings import ring_get, ring_put


@pytest.mark.parametrize("start", [0, 3, 7, 8, 13, 1_000_003])
@pytest.mark.parametrize("count", [0, 1, 4, 8])
def test_get_and_put_match_modular_indexing(start, count):
    ring = np.arange(8) * 10
    idx = (start + np.arange(count)) % 8
    assert np.array_equal(ring_get(ring, start, count), ring[idx])
    got = ring_get(ring, start, count)
    got[:] = -1  # a copy, not a view
    assert (ring >= 0).all()
    values = np.arange(100, 100 + count)
    expected = ring.copy()
    expected[idx] = values
    ring_put(ring, start, values)
    assert np.array_equal(ring, expected)
