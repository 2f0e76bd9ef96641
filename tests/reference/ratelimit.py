"""Reference model of Reverb's rate limiter (shmreplay/engine/csrc/ratelimit.c).

The Python arithmetic shmreplay.engine.ratelimit.RateLimiter ran before it moved to C, on the same
shared parameter lines (float64) and control lines (int64): tests/test_engine_ratelimit.py
drives random counters and parameters through both and compares the answers exactly.

Where Python's arithmetic raised (``int()`` of a NaN or an infinite min_size_to_sample,
``math.floor`` of a NaN or an infinity) the model returns None and the engine reports
SHM_ECORRUPT (its binding raises ValueError). Python's integers are exact; so is the engine
(128-bit counters), and its float steps are these, in this order.
"""

from __future__ import annotations

import math

import numpy as np

from shmreplay.engine.layout import Ctrl, Param


def _floor(x: float) -> int | None:
    return math.floor(x) if math.isfinite(x) else None


def insert_allowance(params: np.ndarray, ctrl: np.ndarray, n: int, pending: int = 0) -> int | None:
    """How many of ``n`` inserts may go ahead, counting ``pending`` ones as already in."""
    spi = float(params[Param.SAMPLES_PER_INSERT])
    min_size = float(params[Param.MIN_SIZE_TO_SAMPLE])
    max_diff = float(params[Param.MAX_DIFF])
    if max_diff == math.inf:
        return n
    inserts = int(ctrl[Ctrl.INSERTS]) + pending
    deletes, samples = int(ctrl[Ctrl.DELETES]), int(ctrl[Ctrl.SAMPLES])
    if not math.isfinite(min_size):
        return None
    below_min = int(min_size) - (inserts - deletes)
    with np.errstate(all="ignore"):  # a zero ratio divides to an infinity: refused below
        x = float(np.float64(max_diff + float(samples)) / np.float64(spi)) - float(inserts) + 1e-9
    by_ratio = _floor(x)
    if by_ratio is None:
        return None
    return max(0, min(n, max(below_min, by_ratio)))


def sample_allowance(params: np.ndarray, ctrl: np.ndarray, n: int) -> int | None:
    """How many of ``n`` samples may go ahead now, committed one at a time as Reverb does."""
    inserts, deletes = int(ctrl[Ctrl.INSERTS]), int(ctrl[Ctrl.DELETES])
    if float(inserts - deletes) < float(params[Param.MIN_SIZE_TO_SAMPLE]):
        return 0
    min_diff = float(params[Param.MIN_DIFF])
    if min_diff == -math.inf:
        return n
    cursor = float(inserts) * float(params[Param.SAMPLES_PER_INSERT]) - float(
        int(ctrl[Ctrl.SAMPLES])
    )
    allowed = _floor(cursor - min_diff + 1e-9)
    if allowed is None:
        return None
    return max(0, min(n, allowed))


def blocks_inserts(params: np.ndarray) -> bool:
    """Whether inserts can be held back at all (MinSize's never are)."""
    return bool(params[Param.MAX_DIFF] != math.inf)
