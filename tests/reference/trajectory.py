"""Reference model of the trajectory writer's batch gather (``_native.traj_gather``).

A column's history is a ring of ``rows`` steps: step ``s`` lives in row ``s % rows``. Item
``i`` of a batch selects ``length`` consecutive steps from ``starts[i]`` (wrapping round the
ring); the gather copies them into ``out[i]``. This is the numpy code TrajectoryWriter used
before the compiled gather: one index table and one take.
"""

from __future__ import annotations

import numpy as np


def gather(ring: np.ndarray, rows: int, starts: list[int], length: int, out: np.ndarray) -> None:
    """Fill ``out`` (``[len(starts), length, *step_shape]``, or ``[n, *step_shape]`` for
    one-step selections without time axis) from ``ring``; ValueError as the engine raises."""
    if not 1 <= length <= rows:
        raise ValueError(f"gather: need 1 <= length ({length}) <= rows ({rows})")
    if any(s < 0 for s in starts):
        raise ValueError("gather: a start step is negative")
    step = ring.reshape(rows, -1)
    r0 = np.asarray(starts, np.int64) % rows
    idx = (r0[:, None] + np.arange(length)) % rows  # [n, length] ring rows
    out.reshape(len(starts), length, step.shape[1])[...] = step[idx]
