"""Reverb's rate limiter, with its counters and parameters in the table's shared memory.

State: ``inserts``, ``samples``, ``deletes`` (control lines). Parameters: samples_per_insert (spi),
min_size_to_sample, min_diff, max_diff (parameter lines, so a reconfiguration is seen by every
process at once). With ``size = inserts − deletes``:

- insert n is allowed if ``inserts + n − deletes ≤ min_size_to_sample``, else iff
  ``(inserts + n)·spi − samples ≤ max_diff``;
- sample n is blocked if ``size < min_size_to_sample``, else allowed iff
  ``inserts·spi − samples − n ≥ min_diff``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import RATE_LIMITER_KINDS, RateLimiterSpec
from . import _native
from .layout import Ctrl, Param


@dataclass(frozen=True)
class RateLimiterInfo:
    kind: str
    samples_per_insert: float
    min_size_to_sample: int
    min_diff: float
    max_diff: float
    inserts: int
    samples: int
    deletes: int
    insert_blocked: bool
    sample_blocked: bool


class RateLimiter:
    """Predicates over the shared counters. Call with the table mutex held for exact answers."""

    def __init__(self, params: np.ndarray, ctrl: np.ndarray) -> None:
        self.params = params
        self.ctrl = ctrl
        self._native = _native.Limiter(params, ctrl)

    @property
    def kind(self) -> str:
        # A parameter line any process of the group can write: checked before it indexes.
        k = float(self.params[Param.KIND])
        if k.is_integer() and 0 <= k < len(RATE_LIMITER_KINDS):
            return RATE_LIMITER_KINDS[int(k)]
        return f"corrupt ({k})"

    @staticmethod
    def initialize(spec: RateLimiterSpec, params: np.ndarray) -> None:
        """Write ``spec``'s parameters (at creation, or to reconfigure with the mutex held)."""
        params[Param.KIND] = RATE_LIMITER_KINDS.index(spec.kind)
        params[Param.SAMPLES_PER_INSERT] = spec.samples_per_insert
        params[Param.MIN_SIZE_TO_SAMPLE] = spec.min_size_to_sample
        params[Param.MIN_DIFF] = spec.min_diff
        params[Param.MAX_DIFF] = spec.max_diff

    @property
    def blocks_inserts(self) -> bool:
        """Whether inserts can be held back at all (MinSize's never are)."""
        return self._native.blocks_inserts()

    def insert_allowance(self, n: int, pending: int = 0) -> int:
        """How many of ``n`` inserts may go ahead, counting ``pending`` ones as already in.

        Computed in C (csrc/ratelimit.c, the daemon's loop calls the same function); the
        arithmetic is tests/reference/ratelimit.py's. ValueError where the shared parameters
        make no sense (a NaN, an infinite bound)."""
        return self._native.insert_allowance(n, pending)

    def sample_allowance(self, n: int) -> int:
        """How many of ``n`` samples may go ahead now, committed one at a time as Reverb does."""
        return self._native.sample_allowance(n)

    def info(self) -> RateLimiterInfo:
        p, c = self.params, self.ctrl
        return RateLimiterInfo(
            kind=self.kind,
            samples_per_insert=float(p[Param.SAMPLES_PER_INSERT]),
            min_size_to_sample=_whole(p[Param.MIN_SIZE_TO_SAMPLE]),
            min_diff=float(p[Param.MIN_DIFF]),
            max_diff=float(p[Param.MAX_DIFF]),
            inserts=int(c[Ctrl.INSERTS]),
            samples=int(c[Ctrl.SAMPLES]),
            deletes=int(c[Ctrl.DELETES]),
            insert_blocked=self.insert_allowance(1) < 1,
            sample_blocked=self.sample_allowance(1) < 1,
        )


def _whole(x: float) -> int | float:
    """``x`` as an int for reports, or as it is when it is no finite number (shared memory)."""
    x = float(x)
    return int(x) if math.isfinite(x) else x
