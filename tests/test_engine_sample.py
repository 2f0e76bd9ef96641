"""Differential tests of the sample concern: the engine (shmreplay.engine._native.SampleCore)
against the reference model (tests/reference/sample.py) on the same random tables and draws,
comparing every output and every shared array exactly; the seqlock check of the row copy; and
hostile contents of the shared arrays (an error, never a crash)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from shmreplay.engine._native import SampleCore

import shmreplay
import shmreplay.engine.table
from shmreplay.engine.layout import LINE, Ctrl, Param
from tests.reference import ratelimit as ref_limiter
from tests.reference import sample as ref

CTRL_ROWS = 16


def make_table(rng, num_slots: int, mts: int, ready_fraction: float = 0.9):
    """Random per-slot arrays: the engine's (over ctrl) and the model's (copies)."""
    if mts > 0:
        times = rng.integers(0, mts, num_slots).astype(np.int32)
    else:
        times = rng.integers(0, 5, num_slots).astype(np.int32)
    times[rng.random(num_slots) < 0.3] = 0
    tags = rng.integers(1, 2**31, num_slots).astype(np.uint64)
    key = (tags << np.uint64(32)) | np.arange(num_slots, dtype=np.uint64)
    priority = rng.random(num_slots)
    gen = rng.integers(0, 1000, num_slots).astype(np.int64) * 2
    state = np.where(rng.random(num_slots) < ready_fraction, 2, 1).astype(np.uint8)
    owner = np.full(num_slots, -1, np.int32)
    free = np.full(num_slots, -7, np.int64)
    ctrl = np.zeros((CTRL_ROWS, LINE), np.int64)
    data = [
        rng.random((num_slots, 3)).astype(np.float32),
        rng.integers(0, 2**60, num_slots).astype(np.int64),
        (rng.random((num_slots, 2, 5)) < 0.5),
    ]
    core = SampleCore(
        times, key, priority, gen, state, owner, free, ctrl,
        Ctrl.SAMPLES * LINE, Ctrl.TOTAL_SAMPLED * LINE, Ctrl.UNIQUE_SAMPLED * LINE,
        Ctrl.SIZE * LINE, Ctrl.DELETES * LINE, Ctrl.FREE_TAIL * LINE, mts, data,
    )  # fmt: skip
    model = ref.Table(
        times.copy(), key.copy(), priority.copy(), gen.copy(), state.copy(), owner.copy(), mts
    )
    model.free = free.copy()
    return core, model, (times, key, priority, gen, state, ctrl, data, owner, free)


def engine_select(core, slots, probability, size, count):
    k = len(slots)
    kept, kept_probability = np.empty(k, np.int64), np.empty(k)
    outs = [np.empty(k, d) for d in (np.uint64, np.float64, np.int32, np.int64, np.int64)]
    exhausted = np.empty(k, np.int64)
    slots.flags.writeable = probability.flags.writeable = False  # only read
    taken, nex = core.select(
        slots, probability, kept, kept_probability, *outs, exhausted, size, count
    )
    slots.flags.writeable = probability.flags.writeable = True
    key, priority, times, gen, table_size = (o[:taken] for o in outs)
    return ref.Selection(
        kept[:taken],
        kept_probability[:taken],
        key,
        priority,
        times,
        gen,
        table_size,
        exhausted[:nex],
    )


def assert_same(model, arrays):
    times, key, priority, gen, state, ctrl, _, owner, free = arrays
    assert np.array_equal(times, model.times_sampled)
    assert np.array_equal(key, model.key)
    assert np.array_equal(priority, model.priority)
    assert np.array_equal(gen, model.gen)
    assert np.array_equal(state, model.state)
    assert ctrl[Ctrl.SAMPLES, 0] == model.samples
    assert ctrl[Ctrl.TOTAL_SAMPLED, 0] == model.total_sampled
    assert ctrl[Ctrl.UNIQUE_SAMPLED, 0] == model.unique_sampled
    assert np.array_equal(owner, model.owner) and np.array_equal(free, model.free)
    assert ctrl[Ctrl.FREE_TAIL, 0] == model.free_tail
    assert ctrl[Ctrl.SIZE, 0] == model.size and ctrl[Ctrl.DELETES, 0] == model.deletes


@pytest.mark.parametrize("num_slots", [1, 2, 7, 100, 1000])
@pytest.mark.parametrize("mts", [0, 1, 2, 3, 7])
def test_select_matches_the_reference(num_slots, mts):
    rng = np.random.default_rng(num_slots * 100 + mts)
    core, model, arrays = make_table(rng, num_slots, mts)
    for step in range(60):
        k = int(rng.choice([0, 1, 2, 5, 64, 256, 600]))
        # Few distinct slots make repeated draws (and exhaustion within a batch) common.
        span = int(rng.integers(1, num_slots + 1))
        slots = rng.integers(0, span, k).astype(np.int64)
        probability = rng.random(k)
        size = int(rng.integers(1, num_slots + 1))
        count = bool(step % 3)
        got = engine_select(core, slots, probability, size, count)
        want = ref.select(model, slots, probability, size, count)
        for f in ("slots", "probability", "key", "priority", "times_sampled", "gen", "table_size"):
            a, b = getattr(got, f), getattr(want, f)
            assert a.dtype == b.dtype and np.array_equal(a, b), (step, f)
        assert np.array_equal(got.exhausted, want.exhausted), step
        assert_same(model, arrays)
        # The exhausted items are removed, RELEASING for this sampler (channel 5).
        core.removed(got.exhausted, 5)
        ref.removed(model, want.exhausted, 5)
        assert_same(model, arrays)
        # After the copy, it releases them (some taken back meanwhile by another channel).
        if len(want.exhausted) and step % 4 == 0:
            stolen = want.exhausted[: len(want.exhausted) // 3]
            arrays[7][stolen] = model.owner[stolen] = 9
        assert core.release(got.exhausted, 5) == ref.release(model, want.exhausted, 5)
        assert_same(model, arrays)
        if mts > 0 and step % 5 == 0:  # a sampler never draws exhausted items: reset them
            arrays[0][arrays[0] >= mts] = 0
            model.times_sampled[model.times_sampled >= mts] = 0


def test_select_of_a_million_slots():
    rng = np.random.default_rng(5)
    n = 1_000_000
    core, model, arrays = make_table(rng, n, 3)
    for k in (100_000, 256):
        slots = rng.integers(0, n // 4, k).astype(np.int64)
        probability = rng.random(k)
        got = engine_select(core, slots, probability, n, True)
        want = ref.select(model, slots, probability, n, True)
        assert np.array_equal(got.slots, want.slots)
        assert np.array_equal(got.times_sampled, want.times_sampled)
        assert np.array_equal(got.table_size, want.table_size)
        assert np.array_equal(got.exhausted, want.exhausted)
        assert_same(model, arrays)


def test_gather_matches_the_reference_and_checks_generations():
    rng = np.random.default_rng(2)
    for num_slots in (1, 3, 1000):
        core, _, arrays = make_table(rng, num_slots, 0)
        data, gen = arrays[6], arrays[3]
        for k in (1, 5, 300):
            slots = rng.integers(0, num_slots, k).astype(np.int64)
            snap = gen[slots].copy()
            moved = rng.random(k) < 0.2
            snap[moved] -= 2  # as if the slot was rewritten since the selection
            for positions in (None, rng.permutation(k + 3)[:k].astype(np.int64)):
                rows = k + 3
                out = tuple(np.zeros((rows, *a.shape[1:]), a.dtype) for a in data)
                want_out = [o.copy() for o in out]
                intact = np.empty(k, np.bool_)
                n_intact = core.gather(slots, snap, out, positions, intact)
                want = ref.gather(data, gen, slots, snap, want_out, positions)
                assert np.array_equal(intact, want) and n_intact == int(want.sum())
                assert np.array_equal(intact, ~moved)
                for a, b in zip(out, want_out, strict=True):
                    assert np.array_equal(a, b)


@pytest.mark.parametrize("num_slots", [1, 5, 1000])
def test_update_and_present_match_the_reference(num_slots):
    rng = np.random.default_rng(num_slots)
    core, model, arrays = make_table(rng, num_slots, 0, ready_fraction=0.7)
    key = arrays[1]
    for _ in range(40):
        n = int(rng.choice([0, 1, 2, 10, 256]))
        keys = key[rng.integers(0, num_slots, n)].copy()
        stale = rng.random(n) < 0.2  # an old tag, or a slot beyond the table
        keys[stale] ^= np.uint64(1) << np.uint64(40)
        keys[rng.random(n) < 0.05] = np.uint64(num_slots + 3)
        prio = rng.random(n)
        slots, stored = np.empty(n, np.int64), np.empty(n)
        found, missing = core.update(keys, prio, slots, stored)
        s, p, want_missing = ref.update(model, keys, prio)
        assert np.array_equal(slots[:found], s) and np.array_equal(stored[:found], p)
        assert missing == want_missing
        assert_same(model, arrays)
        victims = np.empty(n, np.int64)
        k = core.present(keys, victims)
        want_victims = ref.present(model, keys)
        assert np.array_equal(victims[:k], want_victims)
        if rng.random() < 0.3:  # delete them: FREE
            core.removed(victims[:k], -1)
            ref.removed(model, want_victims, None)
            assert_same(model, arrays)


def test_a_generation_moved_before_the_copy_is_drawn_again(daemon_factory, monkeypatch):
    """before_copy_hook moves the first drawn slot's generation (as a writer that recycled the
    slot would): the copy reports it not intact, and the sample path draws again (one more
    draw counted in TOTAL_SAMPLED)."""
    d = daemon_factory(
        '[[table]]\nname = "t"\nmax_size = 50\nsampler = { kind = "uniform" }\n'
        'remover = { kind = "fifo" }\n[table.signature]\nuid = { dtype = "int64" }\n'
    )
    with shmreplay.attach(d.name, seed=3) as client:
        t = client.table("t")
        for i in range(50):
            t.insert({"uid": i})
        t.flush()
        core = t.core
        seen, reports = [], []

        def move_gen(c, slots):
            if not seen:
                seen.append(int(slots[0]))
                c.gen[slots[0]] += 2  # what a writer's seqlock does to a recycled slot

        gather = shmreplay.engine.table.TableCore._gather

        def spy(self, sel, out, positions, intact):
            n = gather(self, sel, out, positions, intact)
            reports.append((sel.slots.copy(), intact.copy(), n))
            return n

        before = int(core.ctrl[Ctrl.TOTAL_SAMPLED])
        monkeypatch.setattr(shmreplay.engine.table.TableCore, "_gather", spy)
        monkeypatch.setattr(shmreplay.engine.table, "before_copy_hook", move_gen)
        s = t.sample(8, timeout=5)
        monkeypatch.setattr(shmreplay.engine.table, "before_copy_hook", None)
    assert len(s) == 8 and len(seen) == 1
    slots, intact, n = reports[0]
    # Every draw of the moved slot (uniform draws repeat items) is reported, and only those.
    assert np.array_equal(intact, slots != seen[0]) and n == int(intact.sum()) < 8
    assert len(reports) == 2 and reports[1][1].all()  # drawn again, copied intact
    assert len(reports[1][0]) == 8 - n
    assert int(core.ctrl[Ctrl.TOTAL_SAMPLED]) == before + 8 + (8 - n)


HOSTILE = textwrap.dedent(
    """
    import numpy as np
    from shmreplay.engine._native import SampleCore
    from shmreplay.engine.layout import LINE, Ctrl

    def corrupt(exc):  # the selectors' CorruptStructure, wherever its module lives
        return type(exc).__name__ == "CorruptStructure"

    rng = np.random.default_rng(0)
    n = 64
    times = rng.integers(-2**31, 2**31, n).astype(np.int32)
    key = rng.integers(0, 2**63, n).astype(np.uint64) * np.uint64(2)
    key[:8] = np.arange(8, dtype=np.uint64) | (np.uint64(7) << np.uint64(32))
    priority = rng.standard_normal(n) * 1e300
    gen = rng.integers(-2**63, 2**63 - 1, n)
    owner = rng.integers(-2**31, 2**31, n).astype(np.int32)
    owner[:32] = 1
    free = np.zeros(n, np.int64)
    state = rng.integers(0, 256, n).astype(np.uint8)
    state[:8] = 2
    ctrl = rng.integers(-2**63, 2**63 - 1, (16, LINE))
    data = [rng.random((n, 4))]
    core = SampleCore(times, key, priority, gen, state, owner, free, ctrl, Ctrl.SAMPLES * LINE,
                      Ctrl.TOTAL_SAMPLED * LINE, Ctrl.UNIQUE_SAMPLED * LINE, Ctrl.SIZE * LINE,
                      Ctrl.DELETES * LINE, Ctrl.FREE_TAIL * LINE, 3, data)
    k = 300
    outs = [np.empty(k, d) for d in
            (np.int64, np.float64, np.uint64, np.float64, np.int32, np.int64, np.int64)]
    for bad in (-1, n, 2**62, -2**63):
        slots = rng.integers(0, n, k)
        slots[rng.integers(k)] = bad
        before = (times.copy(), ctrl.copy())
        try:
            core.select(slots, rng.random(k), *outs, np.empty(k, np.int64), n, True)
        except Exception as exc:
            assert corrupt(exc) and "corrupt" in str(exc), exc
        else:
            raise AssertionError("a slot outside the table was accepted")
        assert np.array_equal(times, before[0]) and np.array_equal(ctrl, before[1])
        intact = np.empty(k, np.bool_)
        try:
            core.gather(slots, gen[:k % n].repeat(k), (np.empty((k, 4)),), None, intact)
        except Exception as exc:
            assert corrupt(exc), exc
        else:
            raise AssertionError("gather accepted a slot outside the table")
    # Garbage counts and times: any values, no crash; the draws stay in range.
    slots = rng.integers(0, n, k)
    core.select(slots, rng.random(k), *outs, np.empty(k, np.int64), -5, True)
    # Positions outside the output are refused.
    try:
        core.gather(slots[:4], gen[:4], (np.empty((4, 4)),), np.array([0, 1, 2, 9]),
                    np.empty(4, np.bool_))
    except ValueError:
        pass
    else:
        raise AssertionError("a position outside the output was accepted")
    # Garbage keys: only present ones (the first 8 slots hold keys of tag 7) are touched.
    keys = np.concatenate([rng.integers(0, 2**63, 1000).astype(np.uint64) * np.uint64(2),
                           key[:8]])
    found, missing = core.update(keys, np.ones(len(keys)), np.empty(len(keys), np.int64),
                                 np.empty(len(keys)))
    assert found == 8, found
    assert core.present(keys, np.empty(len(keys), np.int64)) == 8
    try:
        core.removed(np.array([0, n]), 1)
    except Exception as exc:
        assert corrupt(exc), exc
    else:
        raise AssertionError("removed accepted a slot outside the table")
    # A free ring's tail of any value: one that fits takes the push; one that does not
    # (free_ring.h's rule) is refused before any slot changes, for the caller's repair.
    state[:32] = 3
    for tail in (-2**63, -1, -65, 2**63 - 1, 2**63 - n, 12345, 2**63 - 1 - n):
        ctrl[Ctrl.FREE_TAIL, 0] = tail
        state[:4] = 3
        owner[:4] = 1
        if 0 <= tail <= 2**63 - 1 - n:
            assert core.release(np.arange(4), 1) == 4
            assert ctrl[Ctrl.FREE_TAIL, 0] == tail + 4
        else:
            try:
                core.release(np.arange(4), 1)
            except Exception as exc:
                assert corrupt(exc), exc
            else:
                raise AssertionError(f"release pushed at FREE_TAIL {tail}")
            assert ctrl[Ctrl.FREE_TAIL, 0] == tail and (state[:4] == 3).all()
    try:
        core.release(np.array([-1]), 1)
    except Exception as exc:
        assert corrupt(exc), exc
    else:
        raise AssertionError("release accepted a slot outside the table")
    print("ok")
    """
)


def test_hostile_shared_arrays_give_errors_not_crashes():
    """Garbage in every shared array the sample path reads, and slot indices outside the table:
    CorruptStructure (the table rebuilds its structures; a position outside the caller's output
    is a ValueError), never a crash;
    run in a subprocess so that a segfault fails this test instead of killing pytest."""
    r = subprocess.run([sys.executable, "-c", HOSTILE], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_rows_rewritten_during_the_copy_are_never_reported_intact():
    """A writer thread rewrites rows with the seqlock protocol (gen odd, row, gen even) while
    gather copies them with the GIL released: every row reported intact is one whole row (all
    its values equal), whatever the interleaving. (x86 orders the writer's numpy stores; the
    C writer uses the release fence of protocol.md.)"""
    import threading

    num_slots, width = 8, 512
    rng = np.random.default_rng(9)
    core, _, arrays = make_table(rng, num_slots, 0)
    gen = arrays[3]
    gen[:] = 0
    rows = np.zeros((num_slots, width))
    core = SampleCore(
        *arrays[:5], arrays[7], arrays[8], arrays[5],
        Ctrl.SAMPLES * LINE, Ctrl.TOTAL_SAMPLED * LINE, Ctrl.UNIQUE_SAMPLED * LINE,
        Ctrl.SIZE * LINE, Ctrl.DELETES * LINE, Ctrl.FREE_TAIL * LINE, 0, [rows],
    )  # fmt: skip
    stop = threading.Event()

    def writer():
        v = 0.0
        while not stop.is_set():
            for s in range(num_slots):
                v += 1.0
                gen[s] += 1
                rows[s] = v
                gen[s] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    torn_seen = intact_seen = 0
    try:
        k = 4096
        slots = np.tile(np.arange(num_slots), k // num_slots).astype(np.int64)
        out = np.empty((k, width))
        intact = np.empty(k, np.bool_)
        for _ in range(200):
            snap = gen[slots].copy()
            even = snap % 2 == 0  # a READY slot's generation is even when selected
            core.gather(slots, snap, (out,), None, intact)
            ok = intact & even
            whole = (out == out[:, :1]).all(axis=1)
            assert whole[ok].all(), "a torn row was reported intact"
            torn_seen += int((~whole).sum())
            intact_seen += int(ok.sum())
    finally:
        stop.set()
        thread.join()
    assert intact_seen > 0


def test_a_draw_outside_the_table_rebuilds_the_selectors_and_draws_again(daemon_factory):
    """A sampler whose (corrupt) structures yield a slot outside the table, on the Python path
    (a draw made in Python: the bookkeeping refuses it before writing anything) and on the
    one-call path (the engine's draw refuses the dense set's entries and hands over to the
    Python path, whose draw raises): CorruptStructure, the table rebuilds its selectors from
    the per-slot metadata (REPAIRS grows) and draws again; only the second draw is counted."""
    d = daemon_factory(
        '[[table]]\nname = "t"\nmax_size = 20\nsampler = { kind = "uniform" }\n'
        'remover = { kind = "fifo" }\n[table.signature]\nuid = { dtype = "int64" }\n'
    )
    with shmreplay.attach(d.name, seed=1) as client:
        t = client.table("t")
        for i in range(20):
            t.insert({"uid": i})
        t.flush()
        core = t.core
        # The Python path: a deterministic sampler's, or a draw the one-call path hands over.
        core.__dict__["_one_call"] = False
        draw = core.sampler.sample
        calls = []

        def corrupt_once(n, rng, times_left):
            slots, p = draw(n, rng, times_left)
            if not calls:
                slots = slots.copy()
                slots[0] = core.num_slots + 5
            calls.append(n)
            return slots, p

        core.sampler.sample = corrupt_once
        times_before = core.times_sampled.copy()
        repairs = int(core.ctrl[Ctrl.REPAIRS])
        s = t.sample(4, timeout=5)
        assert len(s) == 4 and len(calls) == 2
        assert int(core.ctrl[Ctrl.REPAIRS]) == repairs + 1
        # Only the second draw was counted.
        assert int((core.times_sampled - times_before).sum()) == 4
        # The one-call path: every entry of the sampler's dense set points outside the table.
        del core.sampler.sample, core.__dict__["_one_call"]
        core.sampler.items.live[:20] = core.num_slots + 5
        times_before = core.times_sampled.copy()
        s = t.sample(4, timeout=5)
        assert len(s) == 4 and int(core.ctrl[Ctrl.REPAIRS]) == repairs + 2
        assert int((core.times_sampled - times_before).sum()) == 4
        assert set(core.sampler.items.live[:20]) == set(range(20))


PRIORITIZED = '{ kind = "prioritized", priority_exponent = 0.6 }'
UNIFORM = '{ kind = "uniform" }'
TWIN_TABLES = "".join(
    f'[[table]]\nname = "{name}"\nmax_size = 64\nmax_times_sampled = {mts}\n'
    f'sampler = {sampler}\nremover = {{ kind = "fifo" }}\n'
    'rate_limiter = { kind = "custom", samples_per_insert = 2.0, min_size_to_sample = 4, '
    "min_diff = -2.0, max_diff = 1e9 }\n"
    '[table.signature]\nuid = { dtype = "int64" }\nobs = { shape = [3], dtype = "float32" }\n'
    for twin, mts, sampler in (("a", 3, PRIORITIZED), ("b", 0, PRIORITIZED), ("c", 2, UNIFORM))
    for name in (f"one_{twin}", f"py_{twin}")
)


@pytest.mark.parametrize("suffix", ["a", "b", "c"])
def test_the_one_call_path_samples_as_the_python_path(daemon_factory, suffix):
    """Twin tables filled alike, sampled with the same seed, one through SampleCore.sample (one
    call) and one through the Python steps (_select, _gather): the same rows, the same info,
    the same per-slot metadata, counters and selector arrays after every batch; with
    max_times_sampled (a, c: exhausted items removed and released, draws dropped) and without
    (b), Prioritized (a, b) and Uniform (c), until a rate limiter lets only part of a batch
    through."""
    d = daemon_factory(TWIN_TABLES)
    with shmreplay.attach(d.name) as client:
        one, py = client.table(f"one_{suffix}"), client.table(f"py_{suffix}")
        rng = np.random.default_rng(4)
        rows = {"uid": np.arange(48), "obs": rng.random((48, 3)).astype(np.float32)}
        prios = rng.random(48) + 0.1
        for t in (one, py):
            t.insert_batch(rows, priorities=prios)
            t.flush()
            t.core.rng = np.random.default_rng(11)
        py.core.__dict__["_one_call"] = False
        assert one.core._one_call
        deleted = 0
        # The limiter allows 98 samples (the last batch gets 2 of its 15, after the timeout);
        # c's 48 items can be sampled twice each while 4 are left (min_size_to_sample): its
        # last batch times out on both paths.
        short = 0
        for n in (1, 5, 16, 2, 33, 7, 3, 9, 20, 15):
            got = []
            for t in (one, py):
                try:
                    got.append(t.sample(n, timeout=0.2, partial=True))
                except shmreplay.RateLimiterTimeout:
                    got.append(None)
            if got == [None, None]:
                assert suffix == "c" and n == 15
                continue
            a, b = got
            assert len(a) == len(b) > 0
            short += len(a) < n
            for f in ("uid", "obs"):
                assert np.array_equal(a.data[f], b.data[f])
            for f in ("key", "probability", "priority", "times_sampled", "table_size"):
                x, y = getattr(a.info, f), getattr(b.info, f)
                assert x.dtype == y.dtype and np.array_equal(x, y), f
            arrays = [t.core.segment.arrays for t in (one, py)]
            for name, arr in arrays[0].items():
                if name.startswith(("meta.", "sampler.", "remover.", "free")):
                    assert np.array_equal(arr, arrays[1][name]), name
            counters = [
                Ctrl.SIZE, Ctrl.SAMPLES, Ctrl.DELETES, Ctrl.TOTAL_SAMPLED,
                Ctrl.UNIQUE_SAMPLED, Ctrl.FREE_HEAD, Ctrl.FREE_TAIL,
            ]  # fmt: skip
            assert [int(one.core.ctrl[c]) for c in counters] == [
                int(py.core.ctrl[c]) for c in counters
            ]
            deleted = int(one.core.ctrl[Ctrl.DELETES])
        assert (deleted > 0) == (suffix != "b") and short > 0


def test_threads_sampling_one_handle_share_the_one_call_path_safely(daemon_factory):
    """Two threads sample through one Table handle, with copies large enough that the GIL is
    released during them: a call that finds the scratch in use takes the Python path (about a
    third of the calls did when this was written). Every row matches its key's item and
    TOTAL_SAMPLED counts every draw once."""
    import threading

    d = daemon_factory(
        '[[table]]\nname = "t"\nmax_size = 64\n'
        'sampler = { kind = "prioritized", priority_exponent = 1.0 }\n'
        'remover = { kind = "fifo" }\n[table.signature]\n'
        'uid = { dtype = "int64" }\nblob = { shape = [8192], dtype = "int64" }\n'
    )
    with shmreplay.attach(d.name) as client:
        t = client.table("t")
        uids = np.arange(64)
        t.insert_batch({"uid": uids, "blob": np.repeat(uids, 8192).reshape(64, 8192)})
        t.flush()
        slot_uid = {}
        before = int(t.core.ctrl[Ctrl.TOTAL_SAMPLED])
        errors, counts = [], [0, 0]

        def run(i):
            try:
                for _ in range(150):
                    s = t.sample(8, timeout=5)
                    assert (s.data["blob"] == s.data["uid"][:, None]).all()
                    for k, u in zip(s.info.key.tolist(), s.data["uid"].tolist(), strict=True):
                        assert slot_uid.setdefault(k, u) == u
                    counts[i] += len(s)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors, errors
        assert int(t.core.ctrl[Ctrl.TOTAL_SAMPLED]) - before == sum(counts) == 2 * 150 * 8


def test_the_engine_allowance_is_the_rate_limiter_s(daemon_factory):
    """The limiter check of the one-call path, read from the table's own counters and parameter
    lines, against the limiter's reference model over random and hostile values (NaN,
    infinities, counters near the int64 limits): the same count, or SHM_ECORRUPT (-2: the
    one-call path then hands over to the Python path) exactly where the model finds no number.
    The table lock is held throughout; everything is restored."""
    d = daemon_factory(
        '[[table]]\nname = "t"\nmax_size = 16\nsampler = { kind = "uniform" }\n'
        'remover = { kind = "fifo" }\n[table.signature]\nuid = { dtype = "int64" }\n'
    )
    with shmreplay.attach(d.name) as client:
        core = client.table("t").core
        engine = core._engine
        rng = np.random.default_rng(7)
        floats = [0.0, 1.0, 2.5, -3.0, 1e18, -1e300, np.inf, -np.inf, np.nan, 1e-9, 7.0]
        ints = [0, 1, 5, 1000, -7, 2**62, 2**63 - 1, -(2**63)]
        words = (Ctrl.INSERTS, Ctrl.DELETES, Ctrl.SAMPLES)
        params = (Param.SAMPLES_PER_INSERT, Param.MIN_SIZE_TO_SAMPLE, Param.MIN_DIFF)
        with core.mutex:
            saved = [int(core.ctrl[w]) for w in words], [float(core.params[p]) for p in params]
            try:
                for _ in range(3000):
                    for w in words:
                        core.ctrl[w] = (
                            rng.choice(ints) if rng.random() < 0.5 else rng.integers(-50, 5000)
                        )
                    for p in params:
                        core.params[p] = (
                            rng.choice(floats) if rng.random() < 0.5 else (rng.random() * 20 - 5)
                        )
                    n = int(rng.integers(1, 600))
                    want = ref_limiter.sample_allowance(core.params, core.ctrl, n)
                    if want is None:
                        want = -2  # SHM_ECORRUPT
                    assert engine.allowance(n) == want, (
                        [int(core.ctrl[w]) for w in words],
                        [float(core.params[p]) for p in params],
                        n,
                    )
            finally:
                for w, v in zip(words, saved[0], strict=True):
                    core.ctrl[w] = v
                for p, v in zip(params, saved[1], strict=True):
                    core.params[p] = v
