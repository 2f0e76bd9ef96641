"""Tests that a mutation check showed missing: each one fails deterministically when the code it
guards is broken in the way its docstring names (each was applied by hand, the test run and seen
failing, and the mutation reverted), against a real daemon and real shared memory.

Statistical checks use a fixed seed (``attach(seed=...)``) and a chi-square bound at the 0.9999
quantile, so a correct implementation passes by a wide margin and the mutations fail by orders of
magnitude. Critical values come from scipy.stats.chi2.ppf (scipy is not a dependency).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shmreplay
import shmreplay.engine.table
from shmreplay.engine.table import SLOT_MASK
from shmreplay.testing import STAMPED_SIGNATURE, chi_square, verify_stamped

# chi2.ppf(0.9999, dof)
CHI2_Q9999 = {1: 15.137, 4: 23.513, 31: 69.106}

UID_SIGNATURE = '[table.signature]\nuid = { dtype = "int64" }\n'


def uid_table(max_size: int, sampler: str, remover: str, extra: str = "") -> str:
    return (
        f'[[table]]\nname = "t"\nmax_size = {max_size}\nsampler = {sampler}\n'
        f"remover = {remover}\n{extra}\n{UID_SIGNATURE}"
    )


# -- the sum-tree below its 4,096-wide shortcut level ----------------------------------------------


def test_prioritized_sampling_of_a_table_wider_than_the_shortcut_level(daemon_factory):
    """100,000 items (a sum-tree of 131,072 leaves: 5 levels are descended below the 4,096-node
    level that sampling starts from by a cumsum), priority 1 + uid % 32, 200,000 draws: the
    frequency of each class uid % 32 must be ∝ 1 + class (chi-square, 31 degrees of freedom),
    and every reported probability exact.

    Mutation proof: ``SumTree._descend`` made to always go right (``right[:] = True`` after the
    comparison) passes every other test of the suite; here every draw lands on the last leaf of
    its 32-leaf block (class 31) and the chi-square is 3.1·10⁶ instead of < 69.
    """
    n, classes = 100_000, 32
    d = daemon_factory(
        uid_table(
            n,
            '{ kind = "prioritized", priority_exponent = 1.0 }',
            '{ kind = "fifo" }',
        )
    )
    uids = np.arange(n, dtype=np.int64)
    priorities = 1.0 + (uids % classes)
    with shmreplay.attach(d.name, seed=20261207) as client:
        t = client.table("t")
        t.insert_batch({"uid": uids}, priorities=priorities, timeout=30)
        t.flush(timeout=30)
        assert t.info().current_size == n
        counts = np.zeros(classes)
        total = priorities.sum()
        for _ in range(50):
            s = t.sample(4000, timeout=5)
            got = s.data["uid"]
            counts += np.bincount(got % classes, minlength=classes)
            np.testing.assert_allclose(s.info.probability, priorities[got] / total, rtol=1e-9)
    expected_p = np.arange(1, classes + 1) / np.arange(1, classes + 1).sum()
    stat = chi_square(counts, expected_p)
    assert stat < CHI2_Q9999[31], f"chi-square {stat:.1f}, counts by uid % 32: {counts}"


# -- removers ------------------------------------------------------------------------------------


def eviction_counts(t, priorities: list[float], trials: int) -> np.ndarray:
    """Fill a table of max_size len(priorities) - 1 with items 0..k-2, then insert item k-1: one
    item is evicted (chosen among all k, the new one included). Count which, over ``trials``."""
    k = len(priorities)
    evicted = np.zeros(k)
    uids = np.arange(k, dtype=np.int64)
    for _ in range(trials):
        t.reset(timeout=5)
        t.insert_batch({"uid": uids[:-1]}, priorities=priorities[:-1], timeout=5)
        t.flush(timeout=5)
        t.insert({"uid": uids[-1]}, priority=priorities[-1], timeout=5)
        t.flush(timeout=5)
        info = t.info()
        assert info.current_size == k - 1
        core = t.core  # no public "list the items": read the committed per-slot metadata
        present = core.data["uid"][core.state == shmreplay.engine.table.SlotState.READY]
        gone = sorted(set(range(k)) - set(present.tolist()))
        assert len(gone) == 1, gone
        evicted[gone[0]] += 1
    return evicted


def test_uniform_remover_evicts_every_item_equally_often_the_new_one_included(daemon_factory):
    """Over 400 trials, each of the 5 items (4 old, the new one) is the one evicted 1/5 of the
    time (chi-square ~4 against a bound of 23.5; the daemon's eviction draws are not seeded).

    Mutation proof: ``Uniform.victims`` returning the first items of its dense set
    (``self.items.live[:n].copy()``, a fifo in disguise) evicts item 0 every time: chi-square
    1600. A remover that never picked the new item would give it 0 evictions: chi-square 100.
    """
    d = daemon_factory(uid_table(4, '{ kind = "fifo" }', '{ kind = "uniform" }'))
    with shmreplay.attach(d.name, seed=5) as client:
        counts = eviction_counts(client.table("t"), [1.0] * 5, trials=400)
    stat = chi_square(counts, np.full(5, 0.2))
    assert stat < CHI2_Q9999[4], f"chi-square {stat:.1f}, evictions per item {counts}"


def test_prioritized_remover_evicts_in_proportion_to_p_alpha(daemon_factory):
    """Priorities 1, 2, 3, 4 and the new item 0, exponent 0.5: item i is evicted with
    probability √pᵢ / Σ√p, the new (weight 0) one never.

    Mutation proof: ``Prioritized.victims`` ignoring the weights (``rng.choice(live, n,
    replace=False)``) evicts uniformly: the new item went 90 times of 400 (counts [83, 74, 82,
    71, 90]) where it must never go.
    """
    d = daemon_factory(
        uid_table(4, '{ kind = "fifo" }', '{ kind = "prioritized", priority_exponent = 0.5 }')
    )
    with shmreplay.attach(d.name, seed=6) as client:
        counts = eviction_counts(client.table("t"), [1.0, 2.0, 3.0, 4.0, 0.0], trials=400)
    assert counts[4] == 0, f"an item of priority 0 was evicted: {counts}"
    w = np.sqrt([1.0, 2.0, 3.0, 4.0])
    stat = chi_square(counts[:4], w / w.sum())
    assert stat < CHI2_Q9999[4], f"chi-square {stat:.1f}, evictions per item {counts}"


def test_prioritized_remover_with_one_weighted_item_evicts_exactly_it(daemon_factory):
    """50 items of priority 0; 20 times, one chosen item gets priority 1 and a new item comes in:
    exactly the chosen one is evicted each time.

    Mutation proof: a remover ignoring priorities picks it 1 time in 51 (it failed at the first
    round: "evicted another item than 40").
    """
    d = daemon_factory(
        uid_table(50, '{ kind = "fifo" }', '{ kind = "prioritized", priority_exponent = 1.0 }')
    )
    rng = np.random.default_rng(3)
    with shmreplay.attach(d.name, seed=7) as client:
        t = client.table("t")
        keys = dict(
            enumerate(t.insert_batch({"uid": np.arange(50)}, priorities=0.0, timeout=5).tolist())
        )
        t.flush(timeout=5)
        for new_uid in range(50, 70):
            chosen = int(rng.choice(sorted(keys)))
            t.update_priorities([keys[chosen]], [1.0])
            keys[new_uid] = t.insert({"uid": new_uid}, priority=0.0, timeout=5)
            t.flush(timeout=5)
            del keys[chosen]
            assert t.update_priorities(list(keys.values()), [0.0] * len(keys)) == 0, (
                f"evicted another item than {chosen}"
            )
        assert t.info().current_size == 50 and t.info().total_evicted == 20


# -- the copy check of the sample path -------------------------------------------------------------

RECYCLER = textwrap.dedent(
    """
    import json
    import sys
    import numpy as np
    import shmreplay
    from shmreplay.testing import stamped_batch, stamped_row
    client = shmreplay.attach(sys.argv[1])
    t = client.table("t")
    # This process writes every item: the sampling process never asks for leases, so a slot
    # freed here can only come back to this process's writes.
    keys = t.insert_batch(stamped_batch(np.arange(10)), timeout=5)
    t.flush(timeout=5)
    print(json.dumps({"keys": dict(enumerate(keys.tolist()))}), flush=True)
    uid = 1_000_000
    for line in sys.stdin:
        key = int(line)
        slot = key & 0xFFFFFFFF
        assert t.delete([key]) == 0, "the sampled item was already gone"
        # Write new items until one of them lands in the freed slot: the daemon leases slots
        # from a FIFO free ring, so it comes round within a few times num_slots inserts.
        written = {}
        for _ in range(1_000):
            uid += 1
            new = t.insert(stamped_row(uid), timeout=5)
            written[uid] = new
            if new & 0xFFFFFFFF == slot:
                break
        else:
            raise SystemExit("the freed slot never came back")
        t.flush(timeout=5)
        print(json.dumps({"new_key": new, "new_uid": uid, "keys": written}), flush=True)
    client.close()
    """
)


COPY_PATHS = {
    # sample(8) of 10 items: one draw of 8, copied by TableCore.sample itself
    "one draw": ('{ kind = "min_size", min_size = 1 }', 8, {"timeout": 5}),
    # the ratio limiter allows 10 of 12 at first: the draw is short and copied by _deliver
    "short draw": (
        '{ kind = "custom", samples_per_insert = 1.0, min_size_to_sample = 1, '
        "min_diff = 0.0, max_diff = 1e9 }",
        12,
        {"timeout": 1.0, "partial": True},
    ),
}


@pytest.mark.parametrize("path", list(COPY_PATHS))
def test_a_row_recycled_between_draw_and_copy_is_drawn_again(daemon_factory, monkeypatch, path):
    """``shmreplay.engine.table.before_copy_hook`` runs in the sample path after the table lock is
    released and before the rows are copied. Here it has another process delete the first
    drawn item and write new items until one reuses its slot, so the copy reads a foreign row:
    the generation check must notice, draw again, and return only rows whose data belongs to
    the key reported with them.

    Mutation proof: with the check disabled (``intact = np.ones(len(sel.slots), bool)`` in
    ``TableCore.sample`` and ``_deliver``) the batch carries the recycler's new row under the
    deleted item's key, and the test fails on that row; with only one of the two disabled, the
    case of that path fails.
    """
    limiter, batch, kw = COPY_PATHS[path]
    extra = f"headroom = 8\nrate_limiter = {limiter}"
    d = daemon_factory(
        uid_table(10, '{ kind = "uniform" }', '{ kind = "fifo" }', extra).replace(
            UID_SIGNATURE, STAMPED_SIGNATURE
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", RECYCLER, d.name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        key_of = {int(u): k for u, k in json.loads(proc.stdout.readline())["keys"].items()}
        recycled: list[tuple[int, int]] = []  # (old key, new key)

        def recycle_first(core, slots):
            if recycled or core.name != "t":
                return
            old_key = int(core.key[slots[0]])
            proc.stdin.write(f"{old_key}\n")
            proc.stdin.flush()
            reply = json.loads(proc.stdout.readline())
            key_of.update((int(u), k) for u, k in reply["keys"].items())
            recycled.append((old_key, reply["new_key"]))

        with shmreplay.attach(d.name, seed=11) as client:
            t = client.table("t")
            monkeypatch.setattr(shmreplay.engine.table, "before_copy_hook", recycle_first)
            s = t.sample(batch, **kw)
            monkeypatch.setattr(shmreplay.engine.table, "before_copy_hook", None)
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The hook did recycle a drawn slot: the same slot, a new item, a new key.
    assert len(recycled) == 1
    old_key, new_key = recycled[0]
    assert new_key & int(SLOT_MASK) == old_key & int(SLOT_MASK) and new_key != old_key
    # Every row is intact and is the item of the key reported with it.
    assert len(s) >= min(batch, 10) and verify_stamped(s.data).all()
    for uid, key in zip(s.data["uid"].tolist(), s.info.key.tolist(), strict=True):
        assert key_of.get(uid) == key, f"row of uid {uid} returned under key {key:#x}"
    assert old_key not in s.info.key.tolist()
