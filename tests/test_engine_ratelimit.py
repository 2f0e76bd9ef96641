"""The compiled rate limiter (shmreplay.engine._native.Limiter, csrc/ratelimit.c) against its
reference model (tests/reference/ratelimit.py): random counters and limiter configurations of
every kind through both, the answers compared exactly, hostile parameters mixed in.

Mutation proof (applied by hand to ratelimit.c and reverted): ``ceil`` instead of ``floor`` in
clamp_floor fails 7 of the 9 tests.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from shmreplay.config import RateLimiterSpec
from shmreplay.engine import _native
from shmreplay.engine.layout import LINE, Ctrl, Param
from shmreplay.engine.ratelimit import RateLimiter
from tests.reference import ratelimit as ref


def lines() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parameter and control lines as a segment holds them, and their column-0 views."""
    params = np.zeros((Param.COUNT, LINE), np.float64)
    ctrl = np.zeros((Ctrl.COUNT, LINE), np.int64)
    return params, ctrl, params[:, 0], ctrl[:, 0]


def random_spec(rng: np.random.Generator) -> RateLimiterSpec:
    kind = rng.integers(5)
    size = int(rng.integers(1, 1000))
    if kind == 0:
        return RateLimiterSpec.min_size(int(rng.integers(1, 100)))
    if kind == 1:
        spi = float(rng.choice([0.1, 0.3, 1.0, 2.5, 4.0, 1 / 3, rng.uniform(0.01, 50)]))
        min_size = int(rng.integers(1, 100))
        if rng.random() < 0.5:
            return RateLimiterSpec.sample_to_insert_ratio(
                spi, min_size, float(rng.uniform(2, 500) * max(1.0, spi))
            )
        target = spi * min_size
        lo = target - float(rng.uniform(0, 300))
        return RateLimiterSpec.sample_to_insert_ratio(
            spi, min_size, (lo, lo + float(rng.uniform(2, 500)) * max(1.0, spi))
        )
    if kind == 2:
        return RateLimiterSpec.queue(size)
    if kind == 3:
        return RateLimiterSpec.stack(size)
    lo = float(rng.choice([-math.inf, rng.uniform(-1000, 1000)]))
    hi = float(rng.choice([math.inf, max(lo, 0.0) + rng.uniform(0, 1000)]))
    return RateLimiterSpec.custom(float(rng.uniform(0.01, 10)), int(rng.integers(1, 100)), lo, hi)


def random_counters(rng: np.random.Generator, ctrl: np.ndarray) -> None:
    inserts = int(rng.integers(0, 5000))
    ctrl[Ctrl.INSERTS] = inserts
    ctrl[Ctrl.DELETES] = int(rng.integers(0, inserts + 1))
    ctrl[Ctrl.SAMPLES] = int(rng.integers(0, 4 * inserts + 10))


def compare(params: np.ndarray, ctrl: np.ndarray, lim, n: int, pending: int) -> None:
    want = ref.insert_allowance(params, ctrl, n, pending)
    if want is None:
        with pytest.raises(ValueError):
            lim.insert_allowance(n, pending)
    else:
        assert lim.insert_allowance(n, pending) == want, (params, ctrl, n, pending)
    want = ref.sample_allowance(params, ctrl, n)
    if want is None:
        with pytest.raises(ValueError):
            lim.sample_allowance(n)
    else:
        assert lim.sample_allowance(n) == want, (params, ctrl, n)
    assert lim.blocks_inserts() == ref.blocks_inserts(params)


@pytest.mark.parametrize("seed", range(4))
def test_every_kind_matches(seed: int) -> None:
    rng = np.random.default_rng(seed)
    _, _, params, ctrl = lines()
    limiter = RateLimiter(params, ctrl)
    for _ in range(3000):
        with warnings.catch_warnings():  # max_diff below the target: allowed, warned
            warnings.simplefilter("ignore")
            spec = random_spec(rng)
        RateLimiter.initialize(spec, params)
        random_counters(rng, ctrl)
        n = int(rng.choice([0, 1, int(rng.integers(1, 64)), 2048, 2048 * 16]))
        compare(params, ctrl, limiter._native, n, int(rng.integers(0, 3000)))


def test_edges_of_the_budget_match() -> None:
    """Counters placed where the floors flip (ratio bounds met exactly, fractional ratios)."""
    _, _, params, ctrl = lines()
    lim = _native.Limiter(params, ctrl)
    for spi in (0.1, 0.3, 1 / 3, 1.0, 2.5, 3.0):
        for max_diff in (0.0, 1.0, 2.9, 3.0, 10.0, 100.5):
            params[:] = [spi, 3.0, -max_diff - 5, max_diff, 1, 0, 0, 0]
            for inserts in range(0, 60, 3):
                for samples in range(0, 200, 7):
                    ctrl[Ctrl.INSERTS], ctrl[Ctrl.SAMPLES], ctrl[Ctrl.DELETES] = (
                        inserts,
                        samples,
                        inserts // 3,
                    )
                    for pending in (0, 1, 5):
                        compare(params, ctrl, lim, 17, pending)


HOSTILE = [
    math.nan,
    math.inf,
    -math.inf,
    0.0,
    -0.0,
    -1.0,
    1e300,
    -1e300,
    5e-324,
    2.0**63,
    -(2.0**63),
]


def test_hostile_values_answer_or_refuse() -> None:
    """Any parameter and counter another process could write: the same answer as the model,
    or ValueError exactly where Python's arithmetic raised; never a crash or an overflow."""
    rng = np.random.default_rng(7)
    _, _, params, ctrl = lines()
    lim = _native.Limiter(params, ctrl)
    big = [0, 1, -1, 2**62, -(2**62), 2**63 - 1, -(2**63)]
    for _ in range(20000):
        for i in range(4):
            params[i] = rng.choice(HOSTILE) if rng.random() < 0.4 else rng.uniform(-1e4, 1e4)
        for w in (Ctrl.INSERTS, Ctrl.SAMPLES, Ctrl.DELETES):
            ctrl[w] = (
                int(rng.choice(big)) if rng.random() < 0.2 else int(rng.integers(-1000, 10**6))
            )
        compare(params, ctrl, lim, int(rng.integers(0, 5000)), int(rng.integers(0, 5000)))


def test_limiter_reads_live_lines() -> None:
    """The engine reads the shared lines at each call (a reconfiguration is seen at once)."""
    _, _, params, ctrl = lines()
    limiter = RateLimiter(params, ctrl)
    RateLimiter.initialize(RateLimiterSpec.queue(10), params)
    assert limiter.insert_allowance(100) == 10
    ctrl[Ctrl.INSERTS] = 4
    assert limiter.insert_allowance(100) == 6
    assert limiter.blocks_inserts
    RateLimiter.initialize(RateLimiterSpec.min_size(1), params)
    assert limiter.insert_allowance(100) == 100 and not limiter.blocks_inserts


def test_bad_arguments() -> None:
    params, ctrl, _, _ = lines()
    with pytest.raises(TypeError):
        _native.Limiter(params[:, 0].astype(np.int64), ctrl[:, 0])
    with pytest.raises(TypeError):
        _native.Limiter(params[:2, 0], ctrl[:, 0])
    lim = _native.Limiter(params[:, 0], ctrl[:, 0])
    with pytest.raises(ValueError):
        lim.insert_allowance(-1)
    with pytest.raises(ValueError):
        lim.sample_allowance(-1)
