"""The compiled batch gather of the trajectory writer and the n-step adder's window against their
reference models (tests/reference/trajectory.py), and the writer's batched items against a plain
numpy model of the history (what each item must hold, its priority and its episode steps)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shmreplay.engine import _native
from tests.reference import trajectory as ref

DTYPES = [np.float32, np.int64, np.uint8, np.bool_, np.complex128, np.float16]


@pytest.mark.parametrize("seed", range(40))
def test_gather_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, 70))  # mostly not powers of two; 1 row included
    shape = tuple(int(x) for x in rng.integers(1, 4, size=rng.integers(0, 3)))
    dtype = DTYPES[seed % len(DTYPES)]
    ring = (rng.random((rows, *shape)) * 100).astype(dtype)
    length = int(rng.integers(1, rows + 1))
    n = int(rng.choice([0, 1, 2, 127, 128, 300]))  # 300: more starts than the stack holds
    # duplicates and starts far beyond rows (a writer's life counts steps, not rows)
    starts = [int(s) for s in rng.integers(0, 5 * rows + 10**9 * (seed % 2), size=n)]
    squeezed = length == 1 and seed % 3 == 0  # history[f][-1]: no time axis
    out_shape = (n, *shape) if squeezed else (n, length, *shape)
    got = np.full(out_shape, 7, dtype)
    want = np.full(out_shape, 7, dtype)
    _native.traj_gather(ring, rows, starts, length, got)
    ref.gather(ring, rows, starts, length, want)
    assert np.array_equal(got, want)


def test_gather_large_batch_releases_gil_path() -> None:
    rng = np.random.default_rng(1)
    rows, length = 200, 80
    ring = rng.integers(0, 255, size=(rows, 84, 84), dtype=np.uint8)
    starts = [int(s) for s in rng.integers(0, 10**6, size=8)]
    got = np.empty((8, length, 84, 84), np.uint8)
    want = np.empty_like(got)
    _native.traj_gather(ring, rows, starts, length, got)
    ref.gather(ring, rows, starts, length, want)
    assert np.array_equal(got, want)


@pytest.mark.parametrize(
    ("rows", "starts", "length", "out_items"),
    [
        (10, [-1], 2, 1),  # a negative start
        (10, [0], 11, 1),  # longer than the ring
        (10, [0], 0, 1),  # no steps
        (0, [0], 1, 1),  # no rows
        (3, [0], 1, 1),  # a ring of 10 rows called 3 rows: sizes do not divide
        (10, [0, 1], 2, 1),  # out too small
        (10, [0], 2, 2),  # out too large
    ],
)
def test_gather_refuses_bad_arguments(rows, starts, length, out_items) -> None:
    ring = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    out = np.full((out_items, max(length, 1), 4), -1, np.float32)
    before = out.copy()
    with pytest.raises(ValueError):
        _native.traj_gather(ring, rows, starts, length, out)
    assert np.array_equal(out, before)  # a refused call writes nothing


def test_gather_refuses_bad_types() -> None:
    ring = np.zeros((4, 2), np.float32)
    out = np.zeros((1, 1, 2), np.float32)
    with pytest.raises(TypeError):
        _native.traj_gather(ring, 4, np.zeros(1, np.int64), 1, out)  # a list or a tuple
    with pytest.raises(TypeError):
        _native.traj_gather(ring, 4, ["0"], 1, out)
    with pytest.raises(TypeError):
        _native.traj_gather(ring, 4, [0], 1, np.zeros((1, 1, 4), np.float32)[:, :, ::2])  # strided
    ro = np.zeros((1, 1, 2), np.float32)
    ro.setflags(write=False)
    with pytest.raises(TypeError):
        _native.traj_gather(ring, 4, [0], 1, ro)  # read-only


def _fields(sel) -> tuple:
    ind = None if sel._indices is None else sel._indices.tolist()
    return (sel._col, sel._start, sel._length, ind, sel._kind, sel.squeezed, sel.shape)


@pytest.mark.parametrize("seed", range(10))
def test_history_indexing_in_c_matches_the_python_path(seed: int) -> None:
    """h[-T:] and h[i] are answered by the C base of ColumnHistory; every key gives the
    selection (or the error) that the Python path ``_select_slow`` gives."""
    import gc

    from shmreplay.client.trajectory import TrajectoryColumn, TrajectoryWriter

    rng = np.random.default_rng(seed)
    w = TrajectoryWriter(None, int(rng.integers(1, 40)))  # no client: nothing is sent
    for _ in range(int(rng.integers(0, 3))):
        for _ in range(int(rng.integers(1, 60))):
            w.append({"x": np.float32(rng.random()), "y": np.zeros(3, np.int64)})
        w.end_episode(clear_buffers=bool(rng.integers(2)))
    for _ in range(int(rng.integers(1, 60))):
        w.append({"x": np.float32(rng.random()), "y": np.zeros(3, np.int64)})
    n = len(w.history["x"])
    keys = [slice(-t, None) for t in range(1, n + 5)] + list(range(-n - 3, n + 3))
    keys += [slice(-(2**70), None), 2**70, -(2**70), True, np.int64(-1), slice(1, None)]
    keys += [slice(-3, None, 1), slice(-3, -1), [0, -1] if n else [], slice(0, None)]
    for key in keys:
        for field in ("x", "y"):
            h = w.history[field]
            try:
                want = _fields(h._select_slow(key))
            except Exception as exc:  # noqa: BLE001 - the same error type must come
                with pytest.raises(type(exc)):
                    h[key]
                continue
            got = h[key]
            assert type(got) is TrajectoryColumn
            assert _fields(got) == want, key
    gc.collect()  # the C types take part in garbage collection (cycles through the writer)
    del w
    gc.collect()


def test_selection_fields_are_read_only_and_construction_checks_types() -> None:
    from shmreplay.client.trajectory import TrajectoryColumn

    sel = TrajectoryColumn(object(), 5, 3)
    assert (sel._start, sel._length, sel._indices, sel._kind) == (5, 3, None, 0)
    assert TrajectoryColumn(object(), 5, 1, None, True)._kind == 1
    assert TrajectoryColumn(object(), 5, 2, np.array([5, 7]))._kind == 2
    with pytest.raises(AttributeError):
        sel._start = 4
    with pytest.raises(TypeError):
        TrajectoryColumn(object(), "5", 3)


# -- random append / create_item sequences: the items sent against a plain model -----------------

SEQ4 = """
[table.signature]
obs = { shape = [4, 3], dtype = "float32" }
action = { shape = [4], dtype = "int64" }
last = { dtype = "float32" }
"""


@pytest.mark.parametrize("seed", range(4))
def test_random_sequences_send_the_model_items(daemon_factory, seed: int) -> None:
    """Every item the writer sends (its rows, priority and episode steps) is the one a plain
    list-of-steps model makes from the same calls; refused items are refused by both."""
    import shmreplay
    from shmreplay.client.trajectory import TrajectoryWriter
    from shmreplay.testing import table_toml

    d = daemon_factory(table_toml(name="seq", max_size=20000, signature=SEQ4))
    rng = np.random.default_rng(seed)
    K = int(rng.integers(4, 12))
    with shmreplay.attach(d.name) as c:
        w = TrajectoryWriter(c, K, max_latency=1.0)
        sent: list[tuple] = []
        steps: list[dict] = []  # the model: every step over the writer's life
        hist_start = ep_start = 0
        want: list[tuple] = []
        table = c.table("seq")
        real = table.insert_batch

        def record(data, priorities, episodes=None, **kw):
            for i in range(len(priorities)):
                sent.append(
                    (
                        {k: np.array(v[i]) for k, v in data.items()},
                        float(priorities[i]),
                        tuple(int(x) for x in episodes[i]),
                    )
                )
            return real(data, priorities, episodes=episodes, **kw)

        table.insert_batch = record
        for _ in range(600):
            op = rng.random()
            if op < 0.55 or len(steps) - hist_start < 4:
                s = {
                    "obs": rng.standard_normal(3).astype(np.float32),
                    "action": np.int64(rng.integers(-(2**40), 2**40)),
                    "r": np.float32(rng.standard_normal()),
                }
                s["r2"] = -s["r"]
                w.append(s)
                steps.append(s)
                continue
            if op < 0.57:
                clear = bool(rng.integers(2))
                w.end_episode(clear_buffers=clear, flush=False)
                ep_start = len(steps)
                hist_start = len(steps) if clear else hist_start
                continue
            n = len(steps) - hist_start
            a = int(rng.integers(-2, n - 3)) if rng.random() < 0.3 else None
            last = int(rng.integers(-n, 0))
            prio = float(rng.choice([0.0, 1.0, rng.random() * 5]))
            h = w.history
            sl = slice(-4, None) if a is None else slice(a, a + 4)
            # "last" mostly from r, sometimes from r2: a new layout while items are pending
            lf = "r" if rng.random() < 0.8 else "r2"
            traj = {"obs": h["obs"][sl], "action": h["action"][sl], "last": h[lf][last]}
            first = len(steps) - 4 if a is None else hist_start + (a if a >= 0 else n + a)
            lstep = len(steps) + last
            oldest = max(hist_start, len(steps) - K)
            ok = first >= oldest and lstep >= oldest and len(traj["obs"]) == 4
            if not ok:
                with pytest.raises(Exception):  # noqa: B017 - whichever the writer gives
                    w.create_item("seq", prio, traj)
                continue
            w.create_item("seq", prio, traj)
            item = {
                "obs": np.stack([steps[t]["obs"] for t in range(first, first + 4)]),
                "action": np.array([steps[t]["action"] for t in range(first, first + 4)]),
                "last": np.array(steps[lstep][lf]),
            }
            lo, hi = min(first, lstep), max(first + 3, lstep)
            want.append((item, prio, (w.episode_id, lo - ep_start, hi - ep_start)))
        w.flush()
        assert len(sent) == len(want) > 50
        for (got_item, gp, ge), (want_item, wp, we) in zip(sent, want, strict=True):
            assert gp == wp and ge == we
            for k in want_item:
                assert np.array_equal(got_item[k], want_item[k]), k
        w.close()


def test_append_in_c_writes_all_or_nothing_and_defers_other_values() -> None:
    """traj_append copies a step only when every value is the field's own dtype and shape; any
    other value (Python numbers, casts, strided or byte-swapped arrays, a new field) goes
    through the Python path, with its checks and errors, and a refused step writes nothing."""
    from shmreplay.client.trajectory import TrajectoryWriter
    from shmreplay.errors import InvalidArgumentError

    w = TrajectoryWriter(None, 4)  # no client: nothing is sent
    w.append({"x": np.float32(1.5), "v": np.arange(3, dtype=np.int64), "b": np.bool_(True)})
    rings = w._rings
    x, v, b = (w._columns[k].ring for k in ("x", "v", "b"))
    assert _native.traj_append(
        {"x": np.float32(2.5), "v": np.array([4, 5, 6]), "b": np.bool_(False)}, rings, 1
    )
    assert x[1] == 2.5 and v[1].tolist() == [4, 5, 6] and not b[1]
    before = [r.copy() for r in (x, v, b)]
    for step in (
        {"x": 2**24 + 1},  # a Python int that float32 rounds: numpy does it
        {"x": 1e39},  # a Python float beyond float32's range: numpy warns
        {"v": 3},  # a Python int into an array field
        {"b": 1},  # a Python int into a bool field: checked in Python
        {"x": np.float64(2.5)},  # another dtype: cast by numpy
        {"v": np.arange(6, dtype=np.int64)[::2]},  # strided
        {"v": np.arange(3, dtype=">i8")},  # byte-swapped
        {"v": np.arange(4, dtype=np.int64)},  # another shape
        {"x": np.float32(1), "new": np.float32(1)},  # a new field
        {"x": np.float32(1), "v": np.arange(3, dtype=np.int32)},  # one value defers all
    ):
        assert not _native.traj_append(step, rings, 2), step
        assert all(r.tobytes() == q.tobytes() for r, q in zip((x, v, b), before, strict=True))
    # through the writer: the same values as numpy would store them
    w.append({"x": 3.5, "v": np.arange(6, dtype=np.int64)[::2], "b": True})
    w.append({"x": np.float32(4.5), "v": np.arange(3, dtype=">i8"), "b": np.bool_(True)})
    assert w.history["x"][-2:].numpy().tolist() == [3.5, 4.5]
    assert w.history["v"][-2:].numpy().tolist() == [[0, 2, 4], [0, 1, 2]]
    total = w._total
    with pytest.raises(InvalidArgumentError):
        w.append({"x": np.float32(9), "v": np.zeros(4, np.int64), "b": np.bool_(True)})
    assert w._total == total and w.history["x"][-1].numpy() == 4.5


PY_NUMBERS = [
    True, False, 0, 1, -5, 2**24, -(2**24), 2**24 + 1, 2**53, 2**53 + 1, 2**63 - 1, -(2**63),
    2**63, 1.5, -0.0, 0.1, 1e300, -1e-300, 1e-45, math.nan, math.inf, -math.inf, 3.4e38, 1e39,
]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.bool_, np.int32])
def test_append_in_c_stores_python_numbers_as_numpy_does(dtype) -> None:
    """A Python number goes into a 0-d ring in C only where the writer's Python path would
    store it as it is (its ``fast`` types: a bool anywhere, an int into int64 or a float field,
    a float into a float field) and numpy stores it exactly and silently; the bytes are then
    numpy's. Every other number is left to the Python path (nothing written)."""
    import warnings

    fast = {bool} | ({int, float} if dtype in (np.float32, np.float64) else set())
    fast |= {int} if dtype is np.int64 else set()
    for value in PY_NUMBERS:
        ring = np.full(3, 7, dtype)
        rings = {"f": _native.TrajRing(ring, np.dtype(dtype).type)}
        before = ring.tobytes()
        took = _native.traj_append({"f": value}, rings, 4)
        if not took:
            assert ring.tobytes() == before, value
            continue
        assert type(value) in fast, value
        want = np.full(3, 7, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            want[1] = value  # numpy would neither warn nor raise
        assert ring.tobytes() == want.tobytes(), value
    took = {
        type(v)
        for v in (True, 1, 1.5)
        if _native.traj_append({"f": v}, {"f": _native.TrajRing(np.zeros(2, dtype), None)}, 0)
    }
    assert took == (fast if dtype is not np.int32 else set())


@pytest.mark.parametrize("seed", range(20))
def test_nstep_window_matches_reference(seed: int) -> None:
    """NStepWindow keeps the newest n (reward, discount) pairs; its sum has the reference's
    bits (the forward order the adder always used), through pushes past n and clears."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    gamma = float(rng.choice([0.99, 0.9, 1.0, 0.0, rng.random()]))
    win = _native.NStepWindow(n, gamma)
    rs: list[float] = []
    ds: list[float] = []
    for _ in range(300):
        if rng.random() < 0.03:
            win.clear()
            rs, ds = [], []
        r = float(rng.standard_normal() * 10.0 ** rng.integers(-3, 4))
        d = float(rng.choice([0.0, 0.5, 1.0, rng.random()]))
        win.push(r, d)
        rs, ds = (rs + [r])[-n:], (ds + [d])[-n:]
        assert len(win) == len(rs)
        assert win.rewards() == rs and win.discounts() == ds
        assert win.full() == ref.nstep_window(rs, ds, gamma)
    with pytest.raises(ValueError):
        _native.NStepWindow(0, 0.9)
    with pytest.raises(TypeError):
        win.push("1", 1.0)


def test_gather_takes_the_selections_themselves() -> None:
    """A tuple of start steps and selections (one field's entries of the writer's pending
    items) gathers as the list of their first steps does; anything else in the tuple is refused
    before a byte is copied."""
    from shmreplay.client.trajectory import TrajectoryColumn

    rng = np.random.default_rng(3)
    rows, length = 13, 4
    ring = rng.standard_normal((rows, 2)).astype(np.float32)
    starts = [int(s) for s in rng.integers(0, 1000, size=50)]
    sels = tuple(TrajectoryColumn(None, s, length) if i % 3 else s for i, s in enumerate(starts))
    got = np.zeros((50, length, 2), np.float32)
    want = np.zeros_like(got)
    _native.traj_gather(ring, rows, sels, length, got)
    ref.gather(ring, rows, starts, length, want)
    assert np.array_equal(got, want)
    out = np.zeros((2, length, 2), np.float32)
    with pytest.raises(TypeError):
        _native.traj_gather(ring, rows, (sels[1], 5.0), length, out)
    assert not out.any()


def test_batch_meta_fills_priorities_and_episodes() -> None:
    prios = [1.0, 0.0, 2.5]
    eps = [(7 << 32 | 1, 0, 3), (7 << 32 | 1, 1, 4), (2**62, -1, 2**40)]
    p, e = np.full(3, -1.0), np.full((3, 3), -1, np.int64)
    _native.traj_batch_meta(prios, eps, p, e)
    assert p.tolist() == prios and e.tolist() == [list(t) for t in eps]
    with pytest.raises(ValueError):
        _native.traj_batch_meta(prios, eps, p[:2], e)  # outputs sized for another batch
    with pytest.raises(TypeError):
        _native.traj_batch_meta(prios, [(1, 2)] * 3, p, e)  # not (id, first, last)
    with pytest.raises(TypeError):
        _native.traj_batch_meta(prios, eps[:2], p, e)  # lists of different lengths
