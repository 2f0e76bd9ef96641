"""Reference models of the trajectory writer's batch gather (``_native.traj_gather``) and of the
n-step adder's window sum (``_native.NStepWindow``).

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


def nstep_window(rewards: list[float], discounts: list[float], gamma: float) -> tuple[float, float]:
    """(R, D) of a window, oldest step first, summed forward in plain Python floats as the
    adder summed it before the compiled window (the engine must give the same bits)::

        R = sum_k w_k r_k,  D = w_L,  w_0 = 1,  w_{k+1} = w_k * (gamma * d_k)
    """
    ret, weight = 0.0, 1.0
    for r, d in zip(rewards, discounts, strict=True):
        ret += weight * r
        weight *= gamma * d
    return ret, weight
