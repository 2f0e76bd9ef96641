"""Priorities at and beyond the limits: what is refused, and that what is accepted samples right.

A prioritized selector weighs an item p**α in a float64 sum-tree. Before the limit, α = 1 with two
priorities of 1.7e308 (or α = 2 with 1e160) made the total inf: every draw fell on one item of
priority 1, reported with probability 0, and a prioritized remover killed the daemon at its
first eviction. Now a table accepts priorities up to ``max_priority`` (its weights summed over a
full table stay finite) and refuses others with InvalidArgumentError naming that value, at
every way in: insert, insert_batch, reserve, Client.insert, the trajectory writer and
update_priorities.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import shmreplay
from shmreplay.config import FieldSpec, SelectorSpec, TableSpec
from shmreplay.engine.selectors.prioritized import priority_limit
from shmreplay.errors import InvalidArgumentError
from shmreplay.testing import local_table, table_toml

SIG = '\n[table.signature]\nx = { dtype = "int64" }\n'
ALPHA1 = '{ kind = "prioritized", priority_exponent = 1.0 }'
ALPHA2 = '{ kind = "prioritized", priority_exponent = 2.0 }'
# 0.999 quantile of the chi-square distribution with 2 degrees of freedom (3 items).
CHI2_2DOF_Q999 = 13.816


def _tables() -> str:
    return (
        table_toml("a1", max_size=1000, sampler=ALPHA1, signature=SIG)
        + table_toml("a2", max_size=1000, sampler=ALPHA2, signature=SIG)
        + table_toml("uni", max_size=1000, signature=SIG)
        + table_toml("rm1", max_size=1000, remover=ALPHA1, signature=SIG)
    )


def _limit(table: shmreplay.Table, alpha: float) -> float:
    """The limit the table must enforce, computed independently from α and its slot count."""
    return priority_limit(alpha, table.core.spec.num_slots)


# (table, priority or a function of the table's limit, accepted?, words the error must contain)
CASES = [
    ("a1", 1.7e308, False, ["largest accepted is", "clip"]),
    ("a2", 1e160, False, ["largest accepted is"]),
    ("rm1", 1.7e308, False, ["largest accepted is"]),
    ("a1", "limit", True, []),
    ("a2", "limit", True, []),
    ("rm1", "limit", True, []),
    ("a1", "above", False, ["largest accepted is"]),
    ("a2", "above", False, ["largest accepted is"]),
    ("uni", 1.7e308, True, []),  # no selector weighs priorities: any finite one
    ("a1", 0.0, True, []),
    ("a1", 10**400, False, ["finite number", "too large for a float"]),
    ("uni", 10**400, False, ["finite number"]),
    ("a1", "abc", False, ["real number"]),
    ("a1", "1.0", False, ["real number"]),
    ("a1", 1j, False, ["real number"]),
    ("a1", np.complex64(1j), False, ["real number"]),
    ("a1", np.str_("2"), False, ["real number"]),
    ("a1", math.nan, False, ["finite number >= 0"]),
    ("uni", math.inf, False, ["finite number >= 0"]),
    ("a1", -1.0, False, ["finite number >= 0"]),
    ("a1", np.float32("inf"), False, ["finite number >= 0"]),
]
ALPHA = {"a1": 1.0, "a2": 2.0, "rm1": 1.0, "uni": None}


def _value(case_value, table: shmreplay.Table, name: str):
    if case_value == "limit":
        return _limit(table, ALPHA[name])
    if case_value == "above":
        return float(np.nextafter(_limit(table, ALPHA[name]), np.inf))
    return case_value


def _paths(client: shmreplay.Client, t: shmreplay.Table, key: int):
    """Each way a priority gets into a table, as a function of the priority."""

    def insert(p):
        t.insert({"x": 1}, priority=p)

    def insert_batch_scalar(p):
        t.insert_batch({"x": np.arange(2)}, priorities=p)

    def insert_batch_list(p):
        t.insert_batch({"x": np.arange(2)}, priorities=[1.0, p])

    def reserve(p):
        with t.reserve(priority=p) as slot:
            slot["x"][...] = 3

    def client_insert(p):
        client.insert({"x": 4}, priorities={t.name: p})

    def trajectory(p):
        with client.trajectory_writer(num_keep_alive_refs=1) as w:
            w.append({"x": 5})
            w.create_item(t.name, priority=p, trajectory={"x": w.history["x"][-1]})

    def update(p):
        t.update_priorities([key], [p])

    def update_scalar(p):
        t.update_priorities(np.array([key], np.uint64), p)

    return {
        "insert": insert,
        "insert_batch": insert_batch_scalar,
        "insert_batch_list": insert_batch_list,
        "reserve": reserve,
        "Client.insert": client_insert,
        "trajectory_writer": trajectory,
        "update_priorities": update,
        "update_priorities_scalar": update_scalar,
    }


def test_extreme_priorities_are_refused_or_accepted_the_same_way_everywhere(daemon_factory):
    d = daemon_factory(_tables())
    with shmreplay.attach(d.name) as client:
        keys = {}
        for name in ALPHA:
            t = client.table(name)
            keys[name] = t.insert({"x": 0}, priority=1.0)
            t.flush()
        failures = []
        for name, value, accepted, words in CASES:
            t = client.table(name)
            p = _value(value, t, name)
            for path, put in _paths(client, t, keys[name]).items():
                where = f"{path} of {str(p)[:30]} into {name}"
                try:
                    put(p)
                except InvalidArgumentError as exc:
                    if accepted:
                        failures.append(f"{where}: refused: {exc}")
                    missing = [w for w in words if w not in str(exc)]
                    if missing:
                        failures.append(f"{where}: message lacks {missing}: {exc}")
                    if "largest accepted is" in words and repr(t.core.max_priority) not in str(exc):
                        failures.append(f"{where}: message does not name the limit: {exc}")
                except Exception as exc:  # OverflowError, plain ValueError, TypeError, ...
                    failures.append(f"{where}: {type(exc).__name__} instead of refusal: {exc}")
                else:
                    if not accepted:
                        failures.append(f"{where}: accepted")
            t.flush(timeout=10)
        assert not failures, "\n".join(failures)
        # What was accepted left every table sane: finite totals, probabilities > 0.
        for name in ALPHA:
            t = client.table(name)
            s = t.sample(200, timeout=5)
            prob = s.info.probability
            assert np.isfinite(prob).all() and (prob > 0).all() and (prob <= 1).all(), name
        assert d.running()
    # The limits themselves: the largest priorities whose weights, over every slot, stay finite.
    for alpha in (1.0, 2.0):
        n = 1000 + 1000  # max_size + the default headroom (min(max_size, 8192))
        lim = priority_limit(alpha, n)
        assert math.isfinite(lim**alpha * n * 2)
        assert np.nextafter(lim, np.inf) ** alpha > np.finfo(np.float64).max / (2 * 2048)


def test_sampling_probabilities_are_right_at_the_largest_accepted_priority(daemon_factory):
    """Two items at the limit, one at half of it, one at 1, behind 8,188 items of priority 0
    (so that they sit past the sum-tree's 4,096-wide shortcut level): the draws follow
    0.4 / 0.4 / 0.2 (chi-square), the priority-1 item (weight ~1e-305 of the total) is never
    drawn, and every reported probability is exactly weight / total, finite and > 0.

    It bites: a sum-tree descent that always goes right below the 4,096-wide level puts all
    20,000 draws on the priority-1 item."""
    d = daemon_factory(table_toml("t", max_size=8192, sampler=ALPHA1, signature=SIG))
    with shmreplay.attach(d.name, seed=11) as client:
        t = client.table("t")
        top = t.core.max_priority
        assert top == _limit(t, 1.0) and 1e300 < top < 1e308
        t.insert_batch({"x": np.full(8188, -1)}, priorities=0.0)
        # What made every draw fall on one item with probability 0 is refused, naming the limit.
        said = re.escape(f"for table 't': the largest accepted is {top!r}")
        with pytest.raises(InvalidArgumentError, match=said):
            t.insert_batch({"x": np.array([7, 8])}, priorities=[1.7e308, 1.7e308])
        prios = np.array([top, top, top / 2, 1.0])
        t.insert_batch({"x": np.arange(4)}, priorities=prios)
        t.flush()
        assert t.info().current_size == 8192
        counts = np.zeros(4)
        for _ in range(20):
            s = t.sample(1000, timeout=5)
            assert (s.data["x"] >= 0).all(), "drew an item of priority 0"
            counts += np.bincount(s.data["x"], minlength=4)
            expected = prios[s.data["x"]] / prios.sum()
            np.testing.assert_allclose(s.info.probability, expected, rtol=1e-12)
            assert (s.info.probability > 0).all()
    assert counts[3] == 0
    expected_p = np.array([0.4, 0.4, 0.2])
    exp = expected_p * counts[:3].sum()
    stat = float(((counts[:3] - exp) ** 2 / exp).sum())
    assert stat < CHI2_2DOF_Q999, f"chi-square {stat:.1f} with counts {counts}"
    # The same statistic rejects "always the first weighted leaf" and a uniform pick.
    for wrong in (np.array([1.0, 0, 0]), np.full(3, 1 / 3)):
        bad = wrong * counts[:3].sum()
        assert float(((bad - exp) ** 2 / exp).sum()) > 10 * CHI2_2DOF_Q999


def test_a_prioritized_remover_at_the_largest_priority_evicts_by_weight(daemon_factory):
    """A remover weighing p**1 with max_size 3: items at the limit are evicted before items of
    priority 1 and 1e-300 (whose share of the total is 0 in float64: they are evicted only when
    no weighted item is left). 1.7e308, which used to kill the daemon at the first eviction, is
    refused; the daemon keeps serving throughout. A remover that ignores priorities (uniform
    victims) fails it: items at the limit stay."""
    d = daemon_factory(table_toml("t", max_size=3, remover=ALPHA1, signature=SIG))
    with shmreplay.attach(d.name, seed=5) as client:
        t = client.table("t")
        top = t.core.max_priority
        with pytest.raises(InvalidArgumentError, match="largest accepted is"):
            t.insert({"x": 99}, priority=1.7e308)
        t.insert({"x": 0}, priority=1.0)
        t.insert({"x": 1}, priority=1e-300)
        t.flush()
        for i in range(2, 30):
            t.insert({"x": i}, priority=top)
            t.flush(timeout=5)
        # Several at once: 4 into a full table of 3 evicts 4, more than it has weighted items.
        t.insert_batch({"x": np.arange(100, 104)}, priorities=[top, 1e-300, 1e-300, 1e-300])
        t.flush(timeout=5)
        info = t.info()
        assert info.current_size == 3
        left = sorted(t.sample(300, timeout=5).data["x"].tolist())
        # Evicted by weight: 29 and 100 (at the limit), then 0 (priority 1, a share of ~6e-306
        # of the total), then one of the four whose share is 0, picked uniformly.
        assert len(set(left)) == 3 and set(left) <= {1, 101, 102, 103}, left
        assert d.running(), d.log(20)


def test_table_core_validates_update_priorities_itself(tmp_path):
    """TableCore.update_priorities is the last check before the selectors: it refuses a NaN, a
    negative or a too large priority whoever calls it, and changes nothing then."""
    spec = TableSpec(
        name="t",
        max_size=8,
        signature=(FieldSpec("x", (), "int64"),),
        sampler=SelectorSpec("prioritized", 1.0),
    )
    with local_table(spec) as core:
        with core.mutex:
            slots = core.lease(0, 2)
        core.gen[slots] += 2
        core.priority[slots] = 1.0
        with core.mutex:
            core.commit(slots)
        keys = core.key[slots]
        limit = core.max_priority
        assert limit == priority_limit(1.0, spec.num_slots)
        for bad in (np.nan, -1.0, np.inf, float(np.nextafter(limit, np.inf))):
            with pytest.raises(InvalidArgumentError):
                core.update_priorities(keys, np.array([2.0, bad]))
        assert core.priority[slots].tolist() == [1.0, 1.0]
        assert core.update_priorities(keys, np.array([limit, limit])) == 0
        assert core.sampler.tree.total == 2 * limit
