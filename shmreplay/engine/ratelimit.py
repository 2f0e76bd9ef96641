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

    @property
    def kind(self) -> str:
        return RATE_LIMITER_KINDS[int(self.params[Param.KIND])]

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
        return bool(self.params[Param.MAX_DIFF] != math.inf)

    def insert_allowance(self, n: int, pending: int = 0) -> int:
        """How many of ``n`` inserts may go ahead, counting ``pending`` ones as already in."""
        p = self.params
        spi, min_size, max_diff = (
            p[Param.SAMPLES_PER_INSERT],
            p[Param.MIN_SIZE_TO_SAMPLE],
            p[Param.MAX_DIFF],
        )
        if max_diff == math.inf:
            return n
        inserts = int(self.ctrl[Ctrl.INSERTS]) + pending
        deletes, samples = int(self.ctrl[Ctrl.DELETES]), int(self.ctrl[Ctrl.SAMPLES])
        below_min = int(min_size) - (inserts - deletes)
        by_ratio = math.floor((max_diff + samples) / spi - inserts + 1e-9)
        return max(0, min(n, max(below_min, by_ratio)))

    def sample_allowance(self, n: int) -> int:
        """How many of ``n`` samples may go ahead now, committed one at a time as Reverb does."""
        p, c = self.params, self.ctrl
        inserts, deletes = int(c[Ctrl.INSERTS]), int(c[Ctrl.DELETES])
        if inserts - deletes < p[Param.MIN_SIZE_TO_SAMPLE]:
            return 0
        min_diff = p[Param.MIN_DIFF]
        if min_diff == -math.inf:
            return n
        cursor = inserts * p[Param.SAMPLES_PER_INSERT] - int(c[Ctrl.SAMPLES])
        return max(0, min(n, math.floor(cursor - min_diff + 1e-9)))

    def info(self) -> RateLimiterInfo:
        p, c = self.params, self.ctrl
        return RateLimiterInfo(
            kind=self.kind,
            samples_per_insert=float(p[Param.SAMPLES_PER_INSERT]),
            min_size_to_sample=int(p[Param.MIN_SIZE_TO_SAMPLE]),
            min_diff=float(p[Param.MIN_DIFF]),
            max_diff=float(p[Param.MAX_DIFF]),
            inserts=int(c[Ctrl.INSERTS]),
            samples=int(c[Ctrl.SAMPLES]),
            deletes=int(c[Ctrl.DELETES]),
            insert_blocked=self.insert_allowance(1) < 1,
            sample_blocked=self.sample_allowance(1) < 1,
        )
