"""The prioritized sampler draws item i with probability pᵢ^α / Σ pᵅ."""

from __future__ import annotations

import numpy as np

import shmreplay
from shmreplay.testing import chi_square, table_toml

# 0.999 quantile of the chi-square distribution with 7 degrees of freedom (8 items).
CHI2_7DOF_Q999 = 24.322


def test_prioritized_frequencies_match_p_alpha(daemon_factory):
    alpha = 0.6
    priorities = np.array([0.5, 1, 2, 3, 5, 8, 13, 21], dtype=np.float64)
    d = daemon_factory(
        table_toml(sampler=f'{{ kind = "prioritized", priority_exponent = {alpha} }}')
    )
    with shmreplay.attach(d.name, seed=1234) as client:
        t = client.table("replay")
        keys = []
        for i, p in enumerate(priorities):
            row = {"obs": np.zeros(8, np.float32), "action": i, "reward": 0.0, "done": False}
            keys.append(t.insert(row, priority=float(p)))
        t.flush()
        counts = np.zeros(len(priorities))
        reported = {}
        for _ in range(100):
            s = t.sample(1000, timeout=5)
            counts += np.bincount(s.data["action"], minlength=len(priorities))
            reported.update(
                zip(s.data["action"].tolist(), s.info.probability.tolist(), strict=True)
            )
    w = priorities**alpha
    expected_p = w / w.sum()
    stat = chi_square(counts, expected_p)
    assert stat < CHI2_7DOF_Q999, f"chi-square {stat:.1f} with counts {counts}"
    # The same test rejects a uniform sampler by a wide margin: it can tell them apart.
    uniform_stat = chi_square(np.full(len(priorities), counts.sum() / len(priorities)), expected_p)
    assert uniform_stat > 100 * CHI2_7DOF_Q999
    # Reported probabilities are exactly wᵢ / Σw.
    for i, prob in reported.items():
        np.testing.assert_allclose(prob, expected_p[i], rtol=1e-12)


def test_priority_update_changes_the_distribution(daemon_factory):
    d = daemon_factory(table_toml(sampler='{ kind = "prioritized", priority_exponent = 1.0 }'))
    with shmreplay.attach(d.name, seed=7) as client:
        t = client.table("replay")
        row = {"obs": np.zeros(8, np.float32), "action": 0, "reward": 0.0, "done": False}
        a = t.insert({**row, "action": 0}, priority=1.0)
        t.insert({**row, "action": 1}, priority=1.0)
        t.flush()
        t.update_priorities([a], [9.0])
        s = t.sample(20_000, timeout=5)
        share = (s.data["action"] == 0).mean()
        assert abs(share - 0.9) < 0.01
        np.testing.assert_allclose(s.info.probability[s.data["action"] == 0], 0.9)
        np.testing.assert_allclose(s.info.priority[s.data["action"] == 0], 9.0)


def test_uniform_frequencies_are_flat_whatever_the_priorities(daemon_factory):
    """The same chi-square, for Uniform: 8 items of very different priorities are drawn equally
    often (fixed seed), after deletions and re-inserts have reshuffled its dense array."""
    d = daemon_factory(table_toml(sampler='{ kind = "uniform" }'))
    with shmreplay.attach(d.name, seed=99) as client:
        t = client.table("replay")
        row = {"obs": np.zeros(8, np.float32), "reward": 0.0, "done": False}
        keys = [t.insert({**row, "action": i}, priority=float(2**i)) for i in range(12)]
        t.flush()
        t.delete(keys[8:])  # 8 left, in a reshuffled dense array
        counts = np.zeros(8)
        for _ in range(50):
            s = t.sample(1000, timeout=5)
            counts += np.bincount(s.data["action"], minlength=8)[:8]
            np.testing.assert_allclose(s.info.probability, 1 / 8)
    flat = np.full(8, 1 / 8)
    stat = chi_square(counts, flat)
    assert stat < CHI2_7DOF_Q999, f"chi-square {stat:.1f} with counts {counts}"
    # A sampler following the priorities would fail this test by far.
    w = 2.0 ** np.arange(8)
    assert chi_square(w / w.sum() * counts.sum(), flat) > 100 * CHI2_7DOF_Q999
