"""The trajectory writer and the n-step adder against real tables, as named cases.

Tables here are FIFO with max_times_sampled = 1, so ``sample(n)`` returns the items in the order
they were created, each once: results are deterministic.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
import pytest

import shmreplay
from shmreplay.client.adders import NStepTransitionAdder, nstep_returns
from shmreplay.client.trajectory import DIRECT_MIN_BYTES, TrajectoryWriter
from shmreplay.testing import table_toml
from shmreplay.testing.trajectory import (
    SEQ_LEN,
    sequence_learner,
    sequence_signature,
    sequence_writer,
)

CTX = mp.get_context("spawn")
FIFO = dict(sampler='{ kind = "fifo" }', remover='{ kind = "fifo" }', extra="max_times_sampled = 1")

# items of 4 steps of a 3-vector and an action, plus one single step (no time axis)
SEQ4 = """
[table.signature]
obs = { shape = [4, 3], dtype = "float32" }
action = { shape = [4], dtype = "int64" }
last = { dtype = "float32" }
"""
# items of any 3 chosen steps
PICK3 = """
[table.signature]
obs = { shape = [3, 3], dtype = "float32" }
"""
# large items, written straight into shared memory (>= DIRECT_MIN_BYTES)
BIG = """
[table.signature]
frames = { shape = [5, 64, 64, 4], dtype = "uint8" }
idx = { shape = [5], dtype = "int64" }
"""
# a queue that holds two items: inserts block when it is full
QUEUE2 = """
[table.signature]
obs = { shape = [2, 3], dtype = "float32" }
"""


def step(i: int) -> dict:
    return {"obs": np.full(3, i, np.float32), "action": np.int64(i), "r": np.float32(i) / 2}


def seq4(w: TrajectoryWriter, a: int | None = None) -> dict:
    h = w.history
    sl = slice(-4, None) if a is None else slice(a, a + 4)
    return {"obs": h["obs"][sl], "action": h["action"][sl], "last": h["r"][-1]}


@pytest.fixture
def client(daemon_factory):
    d = daemon_factory(
        table_toml(name="seq", max_size=1000, signature=SEQ4, **FIFO)
        + table_toml(name="pick", max_size=1000, signature=PICK3, **FIFO)
        + table_toml(name="big", max_size=200, signature=BIG, **FIFO)
        + table_toml(
            name="queue2",
            max_size=2,
            signature=QUEUE2,
            rate_limiter='{ kind = "queue", size = 2 }',
            **FIFO,
        )
    )
    c = shmreplay.attach(d.name)
    yield c
    c.close()


def take_all(client, table: str, n: int) -> dict[str, np.ndarray]:
    t = client.table(table)
    assert t.info().current_size == n
    return t.sample(n, timeout=5).data if n else {}


# -- history indexing ----------------------------------------------------------------------------


def test_a_slice_of_the_history_is_an_item_with_a_time_axis(client):
    w = TrajectoryWriter(client, 8)
    for i in range(10):
        w.append(step(i))
    assert len(w.history["obs"]) == 10 and w.episode_steps == 10
    sel = w.history["obs"][-4:]
    assert len(sel) == 4 and sel.shape == (4, 3) and sel.dtype == np.float32
    np.testing.assert_array_equal(sel.numpy()[:, 0], [6, 7, 8, 9])
    w.create_item("seq", 1.0, seq4(w))
    w.create_item("seq", 1.0, seq4(w, 3))  # positive: history steps 3..6
    w.flush()
    data = take_all(client, "seq", 2)
    np.testing.assert_array_equal(data["action"], [[6, 7, 8, 9], [3, 4, 5, 6]])
    np.testing.assert_array_equal(data["obs"][:, :, 1], [[6, 7, 8, 9], [3, 4, 5, 6]])
    assert data["obs"].shape == (2, 4, 3)


def test_an_integer_index_selects_one_step_without_time_axis(client):
    w = TrajectoryWriter(client, 8)
    for i in range(6):
        w.append(step(i))
    last = w.history["r"][-1]
    assert last.squeezed and last.shape == () and last.numpy() == np.float32(2.5)
    assert w.history["obs"][-2].shape == (3,)
    assert w.history["obs"][0].numpy()[0] == 0  # positive: from the first step
    w.create_item("seq", 1.0, seq4(w))
    w.flush()
    data = take_all(client, "seq", 1)
    assert data["last"].shape == (1,) and data["last"][0] == np.float32(2.5)


def test_index_lists_and_negative_indices_pick_steps_in_the_given_order(client):
    # items of different layouts in one pending batch: gathered item by item
    w = TrajectoryWriter(client, 10, max_latency=60.0)
    for i in range(8):
        w.append(step(i))
    h = w.history["obs"]
    picks = [[0, 2, 5], [-1, -3, -8], np.array([7, 6, 5]), [1, 2, 3]]
    for p in picks:
        w.create_item("pick", 1.0, {"obs": h[p]})
    w.create_item("pick", 1.0, {"obs": h[::3]})  # steps 0, 3, 6
    w.create_item("pick", 1.0, {"obs": h[-6:][[0, 2, 4]]})  # a selection indexed again: 2, 4, 6
    w.flush()
    data = take_all(client, "pick", 6)
    np.testing.assert_array_equal(
        data["obs"][:, :, 0],
        [[0, 2, 5], [7, 5, 0], [7, 6, 5], [1, 2, 3], [0, 3, 6], [2, 4, 6]],
    )


def test_indices_out_of_range_raise_index_error(client):
    w = TrajectoryWriter(client, 10)
    for i in range(3):
        w.append(step(i))
    with pytest.raises(IndexError, match="out of range for 3 steps"):
        w.history["obs"][3]
    with pytest.raises(IndexError):
        w.history["obs"][-4]
    with pytest.raises(IndexError):
        w.history["obs"][[0, 5]]
    with pytest.raises(shmreplay.InvalidArgumentError, match="no field 'nope'"):
        w.history["nope"]
    assert "obs" in w.history and "nope" not in w.history
    assert list(w.history) == ["obs", "action", "r"]


def test_selections_that_wrap_round_the_ring_are_copied_whole(client):
    """Many more steps than the ring holds: item data stays exact, batched and direct."""
    w = TrajectoryWriter(client, 4)
    expected = []
    for i in range(700):
        w.append(step(i))
        if i >= 3 and i % 3 == 0:
            w.create_item("seq", 1.0, seq4(w))
            expected.append(list(range(i - 3, i + 1)))
    w.flush()
    data = take_all(client, "seq", len(expected))
    np.testing.assert_array_equal(data["action"], expected)
    np.testing.assert_array_equal(data["obs"][:, :, 2], expected)
    np.testing.assert_array_equal(data["last"], np.array(expected)[:, -1] / 2)


def test_large_items_are_written_in_place_and_exact(client):
    frame = np.arange(64 * 64 * 4, dtype=np.uint32).astype(np.uint8).reshape(64, 64, 4)
    assert client.table("big").spec.row_bytes >= DIRECT_MIN_BYTES
    w = TrajectoryWriter(client, 5)
    n = 0
    for i in range(300):
        w.append({"frames": frame + np.uint8(i % 251), "idx": i})
        if w.episode_steps >= 5 and i % 2 == 0:
            w.create_item(
                "big", 1.0, {"frames": w.history["frames"][-5:], "idx": w.history["idx"][-5:]}
            )
            n += 1
            if n % 50 == 0:
                w.flush()
                data = take_all(client, "big", 50)
                first = data["idx"][:, 0]
                np.testing.assert_array_equal(data["idx"] - first[:, None], [range(5)] * 50)
                want = (
                    frame[None, None] + (data["idx"] % 251).astype(np.uint8)[:, :, None, None, None]
                )
                np.testing.assert_array_equal(data["frames"], want)
    w.flush()


# -- partial steps, missing fields ---------------------------------------------------------------


def test_partial_steps_fill_one_step_over_several_calls(client):
    w = TrajectoryWriter(client, 8)
    for i in range(5):
        s = step(i)
        w.append({"obs": s["obs"]}, partial_step=True)
        assert w.episode_steps == i + 1  # the open step counts
        w.append({"action": s["action"]}, partial_step=True)
        w.append({"r": s["r"]})
    assert len(w.history["obs"]) == 5
    w.create_item("seq", 1.0, seq4(w))
    w.flush()
    data = take_all(client, "seq", 1)
    np.testing.assert_array_equal(data["action"], [[1, 2, 3, 4]])
    assert data["last"][0] == 2.0


def test_a_field_may_not_be_given_twice_in_one_step(client):
    w = TrajectoryWriter(client, 8)
    w.append({"obs": np.zeros(3, np.float32)}, partial_step=True)
    with pytest.raises(shmreplay.InvalidArgumentError, match=r"\['obs'\] already set in step 0"):
        w.append({"obs": np.ones(3, np.float32), "action": 1})
    assert "action" not in w.history  # nothing of the refused call was recorded
    w.append({"action": 1, "r": np.float32(0)})
    w.append(step(1))
    assert len(w.history["obs"]) == 2


def test_an_open_step_can_be_referenced_only_for_the_fields_it_has(client):
    w = TrajectoryWriter(client, 8)
    for i in range(4):
        w.append(step(i))
    w.append({"obs": np.full(3, 4, np.float32), "r": np.float32(2)}, partial_step=True)
    with pytest.raises(
        shmreplay.InvalidArgumentError, match="'action' has no value at history step 4 .*still open"
    ):
        w.create_item("seq", 1.0, seq4(w))
    w.append({"action": 4})
    w.create_item("seq", 1.0, seq4(w))
    w.flush()
    np.testing.assert_array_equal(take_all(client, "seq", 1)["action"], [[1, 2, 3, 4]])


def test_a_step_without_a_field_cannot_be_used_for_that_field(client):
    w = TrajectoryWriter(client, 8)
    for i in range(8):
        s = step(i)
        if i == 2:
            del s["obs"]
        w.append(s)
    h = w.history["obs"]
    with pytest.raises(
        shmreplay.InvalidArgumentError, match="'obs' has no value at history step 2"
    ):
        w.create_item("seq", 1.0, seq4(w, 1))
    with pytest.raises(
        shmreplay.InvalidArgumentError, match="'obs' has no value at history step 2"
    ):
        w.create_item("pick", 1.0, {"obs": h[[1, 2, 3]]})
    w.create_item("pick", 1.0, {"obs": h[[1, 3, 4]]})  # steps around the gap are fine
    w.create_item("seq", 1.0, seq4(w))  # steps 4..7
    w.flush()
    np.testing.assert_array_equal(take_all(client, "pick", 1)["obs"][:, :, 0], [[1, 3, 4]])
    np.testing.assert_array_equal(take_all(client, "seq", 1)["action"], [[4, 5, 6, 7]])


def test_a_field_first_seen_later_has_no_value_before(client):
    w = TrajectoryWriter(client, 8)
    for i in range(3):
        w.append({"obs": np.full(3, i, np.float32), "action": i})
    for i in range(3, 7):
        w.append(step(i))
    with pytest.raises(shmreplay.InvalidArgumentError, match="'r' has no value at history step 2"):
        w.create_item("seq", 1.0, {**seq4(w, 2), "last": w.history["r"][2]})
    w.create_item("seq", 1.0, seq4(w, 2))  # last = r at the newest step, which has one
    w.flush()
    assert take_all(client, "seq", 1)["last"][0] == 3.0


# -- episodes ------------------------------------------------------------------------------------


def test_end_episode_clears_the_history_and_starts_a_new_episode(client):
    w = TrajectoryWriter(client, 8)
    first_id = w.episode_id
    assert first_id >> 32 == os.getpid()
    for i in range(5):
        w.append(step(i))
    old = w.history["obs"][-4:]
    w.create_item("seq", 1.0, seq4(w))
    w.end_episode()
    assert client.table("seq").info().current_size == 1  # end_episode flushes
    assert w.episode_id != first_id and w.episode_id >> 32 == os.getpid()
    assert w.episode_steps == 0 and len(w.history["obs"]) == 0
    w.append(step(100))
    assert w.history["obs"][0].numpy()[0] == 100
    with pytest.raises(shmreplay.InvalidArgumentError, match="earlier episode that end_episode"):
        w.create_item("seq", 1.0, {**seq4(w), "obs": old})


def test_end_episode_without_clearing_lets_items_span_episodes(client):
    w = TrajectoryWriter(client, 8)
    for i in range(3):
        w.append(step(i))
    w.end_episode(clear_buffers=False)
    assert w.episode_steps == 0
    for i in range(3, 5):
        w.append(step(i))
    assert len(w.history["obs"]) == 5 and w.episode_steps == 2
    w.create_item("seq", 1.0, seq4(w))
    w.flush()
    np.testing.assert_array_equal(take_all(client, "seq", 1)["action"], [[1, 2, 3, 4]])


def test_end_episode_closes_an_open_step(client):
    w = TrajectoryWriter(client, 8)
    w.append(step(0))
    w.append({"obs": np.zeros(3, np.float32)}, partial_step=True)
    w.end_episode(clear_buffers=False)
    w.append({"obs": np.ones(3, np.float32), "action": 5, "r": np.float32(1)})  # a new step
    assert len(w.history["obs"]) == 3
    with pytest.raises(
        shmreplay.InvalidArgumentError, match="'action' has no value at history step 1"
    ):
        w.history["action"][-2:].numpy()


# -- expired references --------------------------------------------------------------------------


def test_items_referencing_steps_older_than_the_kept_ones_are_refused(client):
    w = TrajectoryWriter(client, 4)
    for i in range(4):
        w.append(step(i))
    sel = seq4(w)
    w.create_item("seq", 1.0, sel)  # exactly the 4 kept steps
    w.append(step(4))
    with pytest.raises(
        shmreplay.InvalidArgumentError,
        match=r"history step 0, but the writer keeps only the newest num_keep_alive_refs=4 steps "
        r"\(steps 1..4 of 5\)",
    ):
        w.create_item("seq", 1.0, sel)
    with pytest.raises(shmreplay.InvalidArgumentError, match="num_keep_alive_refs"):
        w.history["obs"][0].numpy()
    with pytest.raises(shmreplay.InvalidArgumentError, match="selects no steps"):
        w.create_item("seq", 1.0, {**seq4(w), "obs": w.history["obs"][3:3]})
    w.flush()


def test_pending_items_keep_their_steps_while_the_ring_moves_on(client):
    """Small items wait to be sent in batches; appending many steps before they are sent must
    not overwrite the steps they refer to (the writer sends them first). This test bites:
    without the ``send_before`` check in ``append``, 36 of the 44 values come back wrong."""
    w = TrajectoryWriter(client, 4, max_latency=60.0)
    for i in range(4):
        w.append(step(i))
    w.create_item("seq", 1.0, seq4(w))  # the first item is sent at once (the writer was idle)
    w.create_item("seq", 1.0, seq4(w))
    for i in range(4, 1000):  # ~8 times the ring
        w.append(step(i))
        if i % 100 == 0:
            w.create_item("seq", 1.0, seq4(w))
    w.flush()
    data = take_all(client, "seq", 2 + 9)
    starts = [0, 0] + [i - 3 for i in range(100, 1000, 100)]
    np.testing.assert_array_equal(data["action"], [list(range(s, s + 4)) for s in starts])


# -- signature errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda w: {"obs": w.history["obs"][-3:]},
            r"table 'seq', field 'obs': expected shape \(4, 3\) dtype float32, got shape \(3, 3\)"
            r" dtype float32 \(3 step\(s\) of history\['obs'\]\)",
        ),
        (
            lambda w: {"last": w.history["r"][-1:]},
            r"field 'last': expected shape \(\) dtype float32, got shape \(1,\) dtype float32",
        ),
        (
            lambda w: {"action": w.history["f64"][-4:]},
            r"field 'action': expected shape \(4,\) dtype int64, got shape \(4,\) dtype float64 "
            r".*does not cast",
        ),
        (
            lambda w: {"last": w.history["f64"][-1]},
            r"field 'last': expected shape \(\) dtype float32, got shape \(\) dtype float64",
        ),
        (
            lambda w: {"obs": w.history["action"][-4:]},
            r"field 'obs': expected shape \(4, 3\) dtype float32, got shape \(4,\) dtype int64",
        ),
    ],
    ids=[
        "short-slice",
        "slice-for-a-scalar",
        "float-into-int",
        "float64-into-float32",
        "wrong-field",
    ],
)
def test_signature_errors_name_the_field_the_expected_and_the_got(client, change, message):
    w = TrajectoryWriter(client, 8)
    for i in range(5):
        w.append({**step(i), "f64": np.float64(i)})
    with pytest.raises(shmreplay.SignatureError, match=message):
        w.create_item("seq", 1.0, {**seq4(w), **change(w)})


def test_missing_and_unknown_item_fields_are_named(client):
    w = TrajectoryWriter(client, 8)
    for i in range(5):
        w.append(step(i))
    item = seq4(w)
    del item["last"]
    with pytest.raises(shmreplay.SignatureError, match=r"missing \['last'\], unknown \[\]"):
        w.create_item("seq", 1.0, item)
    with pytest.raises(shmreplay.SignatureError, match=r"missing \[\], unknown \['extra'\]"):
        w.create_item("seq", 1.0, {**seq4(w), "extra": w.history["r"][-1]})
    with pytest.raises(shmreplay.InvalidArgumentError, match="must be a selection"):
        w.create_item("seq", 1.0, {**seq4(w), "last": np.float32(1)})
    with pytest.raises(shmreplay.TableNotFoundError):
        w.create_item("nope", 1.0, seq4(w))
    with pytest.raises(shmreplay.InvalidArgumentError, match="priority"):
        w.create_item("seq", float("nan"), seq4(w))


def test_python_numbers_follow_the_clients_rules(daemon_factory):
    sig = (
        "[table.signature]\n"
        'x = { shape = [2], dtype = "int32" }\n'
        'y = { shape = [2], dtype = "float32" }\n'
    )
    d = daemon_factory(table_toml(name="t", signature=sig, **FIFO))
    with shmreplay.attach(d.name) as c:
        w = TrajectoryWriter(c, 4)
        w.append({"x": 1, "y": 0.5})
        w.append({"x": 2, "y": 1})  # an int into a float field: fine
        with pytest.raises(shmreplay.InvalidArgumentError, match="does not fit int64"):
            w.append({"x": 2.5, "y": 1.0})
        w.create_item("t", 1.0, {"x": w.history["x"][-2:], "y": w.history["y"][-2:]})
        w.append({"x": 2**40, "y": 1.0})
        with pytest.raises(shmreplay.SignatureError, match="expected int32 values"):
            w.create_item("t", 1.0, {"x": w.history["x"][-2:], "y": w.history["y"][-2:]})
        w.flush()
        data = c.table("t").sample(1, timeout=5).data
        np.testing.assert_array_equal(data["x"], [[1, 2]])
        np.testing.assert_array_equal(data["y"], [[0.5, 1.0]])


def test_a_fields_shape_and_dtype_are_fixed_by_its_first_value(client):
    w = TrajectoryWriter(client, 4)
    w.append(step(0))
    with pytest.raises(shmreplay.InvalidArgumentError, match=r"shape \(4,\) differs from \(3,\)"):
        w.append({**step(1), "obs": np.zeros(4, np.float32)})
    with pytest.raises(shmreplay.InvalidArgumentError, match="float64 does not cast"):
        w.append({**step(1), "obs": np.zeros(3, np.float64)})
    w.append({**step(1), "obs": np.zeros(3, np.float16)})  # casts without loss
    assert w.episode_steps == 2


def test_validate_false_skips_the_check_and_numpy_refuses_the_copy(client):
    w = TrajectoryWriter(client, 8, validate=False)
    for i in range(5):
        w.append(step(i))
    w.create_item("seq", 1.0, seq4(w))
    w.flush()
    np.testing.assert_array_equal(take_all(client, "seq", 1)["action"], [[1, 2, 3, 4]])
    time.sleep(0.01)  # an idle writer sends the next item at once
    with pytest.raises(ValueError):
        w.create_item("seq", 1.0, {**seq4(w), "obs": w.history["obs"][-3:]})


def test_one_writer_feeds_several_tables(client):
    w = TrajectoryWriter(client, 8, max_latency=60.0)
    for i in range(40):
        w.append(step(i))
        if i >= 3:
            w.create_item("seq", 1.0, seq4(w))
        if i >= 2 and i % 2 == 0:
            w.create_item("pick", 2.0, {"obs": w.history["obs"][-3:]})
    w.flush()
    np.testing.assert_array_equal(take_all(client, "seq", 37)["action"][:, 0], np.arange(0, 37))
    np.testing.assert_array_equal(take_all(client, "pick", 19)["obs"][:, 0, 0], np.arange(0, 37, 2))


# -- flush, visibility, lifecycle ----------------------------------------------------------------


def test_flush_makes_every_item_visible_and_block_until_num_items_allows_some(client):
    w = TrajectoryWriter(client, 8, max_latency=60.0)
    for i in range(4):
        w.append(step(i))
    for _ in range(5):
        w.create_item("seq", 1.0, seq4(w))
    w.flush(block_until_num_items=10)  # 5 pending or unconfirmed <= 10: returns at once
    # the first item was sent at once (the writer was idle before it), the others wait
    assert client.table("seq").info().current_size <= 1
    w.flush()
    assert client.table("seq").info().current_size == 5
    with pytest.raises(shmreplay.InvalidArgumentError):
        w.flush(block_until_num_items=-1)


def test_a_timed_flush_leaves_what_it_could_not_send_pending(client):
    """A queue of 2 holds inserts back: flush(timeout) sends what fits and keeps the rest."""
    w = TrajectoryWriter(client, 4, max_latency=60.0)
    q = client.table("queue2")
    for i in range(3):
        w.append(step(i))
    w.create_item("queue2", 1.0, {"obs": w.history["obs"][-2:]})  # sent at once
    for i in range(3, 8):
        w.append(step(i))
        w.create_item("queue2", 1.0, {"obs": w.history["obs"][-2:]})
    t0 = time.monotonic()
    with pytest.raises(shmreplay.RateLimiterTimeout, match="4 item.* still pending"):
        w.flush(timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 5
    got = [q.sample(2, timeout=5).data["obs"][:, 1, 0]]
    with pytest.raises(shmreplay.RateLimiterTimeout, match="2 item.* still pending"):
        w.flush(timeout=0.2)
    got.append(q.sample(2, timeout=5).data["obs"][:, 1, 0])
    w.flush(timeout=5)
    got.append(q.sample(2, timeout=5).data["obs"][:, 1, 0])
    np.testing.assert_array_equal(np.concatenate(got), [2, 3, 4, 5, 6, 7])


def test_the_context_manager_flushes_on_a_clean_exit_only(client):
    t = client.table("seq")
    with TrajectoryWriter(client, 8, max_latency=60.0) as w:
        for i in range(4):
            w.append(step(i))
        for _ in range(3):
            w.create_item("seq", 1.0, seq4(w))
    assert t.info().current_size == 3
    t.sample(3, timeout=5)
    with (
        pytest.raises(RuntimeError, match="boom"),
        TrajectoryWriter(client, 8, max_latency=60.0) as w,
    ):
        for i in range(4):
            w.append(step(i))
        for _ in range(3):
            w.create_item("seq", 1.0, seq4(w))
        raise RuntimeError("boom")
    client.table("seq").flush()
    assert t.info().current_size == 1  # the first, sent at once; the two pending were dropped
    w.close()
    with pytest.raises(shmreplay.ClientClosedError):
        w.append(step(0))
    w.close()  # idempotent


def test_writer_arguments_are_checked():
    with pytest.raises(shmreplay.InvalidArgumentError, match="num_keep_alive_refs"):
        TrajectoryWriter(None, 0)
    with pytest.raises(shmreplay.InvalidArgumentError, match="max_latency"):
        TrajectoryWriter(None, 3, max_latency=-1)


# -- n-step transitions --------------------------------------------------------------------------

G = 0.9


def nstep_client(daemon_factory, **kw):
    sig = NStepTransitionAdder.signature_toml((2,), "float32", (), "int64", **kw)
    d = daemon_factory(table_toml(name="nstep", signature=sig, **FIFO))
    return shmreplay.attach(d.name)


def obs(i: float) -> np.ndarray:
    return np.array([i, -i], np.float32)


@pytest.mark.parametrize(
    "rewards, discounts, done, expected",
    [
        # (reward R, discount D, first obs, arrival obs) per item, computed by hand, n = 3
        (
            [1, 2, 3, 4, 5],
            None,  # terminal at the end: d = 1, 1, 1, 1, 0
            True,
            [
                (1 + G * 2 + G * G * 3, G**3, 0, 3),
                (2 + G * 3 + G * G * 4, G**3, 1, 4),
                (3 + G * 4 + G * G * 5, 0.0, 2, 5),
                (4 + G * 5, 0.0, 3, 5),
                (5, 0.0, 4, 5),
            ],
        ),
        (
            [1, 2],
            [1.0, 1.0],  # truncated (time limit): the last items bootstrap
            True,
            [(1 + G * 2, G**2, 0, 2), (2, G, 1, 2)],
        ),
        (
            [1, 2, 3, 4],
            [1.0, 0.0, 1.0, 0.0],  # a life lost at step 1 cuts the returns that cross it
            True,
            [
                (1 + G * 2, 0.0, 0, 3),
                (2, 0.0, 1, 4),
                (3 + G * 4, 0.0, 2, 4),
                (4, 0.0, 3, 4),
            ],
        ),
        (
            [1, 1, 1, 1, 1, 1],
            [0.5] * 6,  # environment discounts multiply with gamma
            False,  # no end: only the items whose n steps are complete
            [
                (1 + G * 0.5 + (G * 0.5) ** 2, (G * 0.5) ** 3, 0, 3),
                (1 + G * 0.5 + (G * 0.5) ** 2, (G * 0.5) ** 3, 1, 4),
                (1 + G * 0.5 + (G * 0.5) ** 2, (G * 0.5) ** 3, 2, 5),
            ],
        ),
    ],
    ids=["terminal", "truncated", "life-lost", "env-discounts"],
)
def test_nstep_items_match_a_hand_computation(daemon_factory, rewards, discounts, done, expected):
    with nstep_client(daemon_factory) as c:
        adder = NStepTransitionAdder(c, "nstep", n=3, discount=G)
        steps = len(rewards)
        for t, r in enumerate(rewards):
            last = done and t == steps - 1
            d = None if discounts is None else discounts[t]
            adder.add(
                obs(t),
                10 + t,
                r,
                done=last,
                discount=d,
                next_observation=obs(steps) if last else None,
            )
        adder.flush()
        data = take_all(c, "nstep", len(expected))
        R, D, first, arrival = (np.array(x) for x in zip(*expected, strict=True))
        np.testing.assert_allclose(data["reward"], R, rtol=1e-6)
        np.testing.assert_allclose(data["discount"], D, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(data["observation"][:, 0], first)
        np.testing.assert_array_equal(data["action"], 10 + first)
        np.testing.assert_array_equal(data["next_observation"][:, 0], arrival)
        assert data["reward"].dtype == np.float32


def test_nstep_episodes_follow_each_other_and_short_episodes_give_only_tails(daemon_factory):
    with nstep_client(daemon_factory, float_dtype="float64") as c:
        with NStepTransitionAdder(c, "nstep", n=4, discount=G) as adder:
            ids = {adder.episode_id}
            for length in (2, 6, 1):
                for t in range(length):
                    end = t == length - 1
                    adder.add(
                        obs(t), t, 1.0, done=end, next_observation=obs(length) if end else None
                    )
                ids.add(adder.episode_id)
        assert len(ids) == 4
        data = take_all(c, "nstep", 2 + 6 + 1)
        # episode of 2: (0 -> 2) m = 2, (1 -> 2) m = 1; all terminal
        np.testing.assert_allclose(data["reward"][:2], [1 + G, 1])
        np.testing.assert_array_equal(data["next_observation"][:, 0], [2, 2, 4, 5, 6, 6, 6, 6, 1])
        np.testing.assert_array_equal(data["observation"][:, 0], [0, 1, 0, 1, 2, 3, 4, 5, 0])
        np.testing.assert_allclose(data["reward"][2:4], [1 + G + G**2 + G**3] * 2)
        np.testing.assert_allclose(data["discount"][2:4], [G**4] * 2)
        np.testing.assert_allclose(data["discount"][4:], 0)
        assert data["reward"].dtype == np.float64


def test_an_episode_end_waits_for_the_commit_only_when_asked(daemon_factory):
    """By default an episode's end leaves its items to the next batch (no commit round trip per
    episode); wait_at_episode_end=True has them in the table when add(done=True) returns."""
    with nstep_client(daemon_factory) as c:
        table = c.table("nstep")
        for wait in (False, True):
            table.reset()
            adder = NStepTransitionAdder(c, "nstep", n=2, discount=G, wait_at_episode_end=wait)
            adder._writer.max_latency = 60.0  # nothing leaves on a timer during the test
            for t in range(4):
                end = t == 3
                adder.add(obs(t), t, 1.0, done=end, next_observation=obs(4) if end else None)
            # The episode's last items are still pending without the wait (earlier ones may
            # have left to make room in the writer's history).
            assert (table.info().current_size == 4) == wait
            adder.flush()
            assert table.info().current_size == 4
            adder.close()


def test_nstep_priority_fn_sees_the_transition(daemon_factory):
    seen = []

    def priority(tr):
        seen.append({k: np.copy(v) for k, v in tr.items()})
        return float(tr["reward"])

    with nstep_client(daemon_factory) as c:
        adder = NStepTransitionAdder(c, "nstep", n=1, discount=G, priority_fn=priority)
        for t in range(3):
            adder.add(obs(t), t, t + 1.0, done=t == 2, next_observation=obs(3))
        adder.flush()
        s = c.table("nstep").sample(3, timeout=5)
        np.testing.assert_array_equal(s.info.priority, [1.0, 2.0, 3.0])
        assert [float(x["discount"]) for x in seen] == pytest.approx([G, G, 0.0])
        np.testing.assert_array_equal(seen[1]["next_observation"], obs(2))


def test_nstep_adder_refuses_a_table_it_cannot_fill(client):
    with pytest.raises(shmreplay.SignatureError, match="cannot hold n-step transitions"):
        NStepTransitionAdder(client, "seq", n=3, discount=0.99)
    with pytest.raises(shmreplay.InvalidArgumentError, match="n must be"):
        NStepTransitionAdder(client, "seq", n=0, discount=0.99)
    with pytest.raises(shmreplay.InvalidArgumentError, match="discount"):
        NStepTransitionAdder(client, "seq", n=1, discount=1.5)


def test_nstep_returns_agree_with_the_recursion():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 9):
        r = rng.standard_normal(n)
        d = rng.choice([0.0, 0.5, 1.0], n)
        ret, disc = nstep_returns(r, d, 0.97)
        want_r, want_d = np.zeros(n + 1), np.ones(n + 1)
        for i in range(n - 1, -1, -1):
            want_r[i] = r[i] + 0.97 * d[i] * want_r[i + 1]
            want_d[i] = 0.97 * d[i] * want_d[i + 1]
        np.testing.assert_allclose(ret, want_r[:n], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(disc, want_d[:n], rtol=1e-12, atol=1e-12)


# -- many writer processes -----------------------------------------------------------------------


def test_four_writer_processes_make_sequences_of_their_own_consecutive_steps(daemon_factory):
    """Four processes append stamped steps in episodes of random length (some steps in two
    partial calls) and make 16-step items; a learner samples meanwhile. Every sampled sequence
    must be intact consecutive steps of one writer, within one episode, except for writer 3,
    which keeps its history across episodes on purpose and must produce crossing items.

    This test bites: making items of ``history[f][-16:]`` for some fields and ``[-17:-1]`` for
    others, or clearing nothing at episode ends for every writer, fails it.
    """
    d = daemon_factory(table_toml(name="seq", max_size=3000, signature=sequence_signature(SEQ_LEN)))
    results, learned = CTX.Queue(), CTX.Queue()
    stop = CTX.Event()
    cross = (3,)
    writers = [
        CTX.Process(
            target=sequence_writer,
            args=(d.name, "seq", w, 4000, 100 + w, w in cross, results),
        )
        for w in range(4)
    ]
    learner = CTX.Process(target=sequence_learner, args=(d.name, "seq", 64, cross, stop, learned))
    procs = [*writers, learner]
    try:
        learner.start()
        for p in writers:
            p.start()
        made = dict(results.get(timeout=60) for _ in writers)
        stop.set()
        batches, totals, seen = learned.get(timeout=60)
        for p in procs:
            p.join(30)
            assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"
    finally:
        stop.set()
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert batches > 20, batches
    assert totals["bad"] == 0 and totals["mixed"] == 0, totals
    assert totals["crossing"] > 0, totals  # writer 3's items span episodes, as built
    assert seen == [0, 1, 2, 3]
    with shmreplay.attach(d.name) as c:
        assert c.table("seq").info().total_inserted == sum(made.values())


def test_client_trajectory_writer_is_the_entry_point_and_flushes_on_exit(client):
    """DESIGN.md §6: ``with client.trajectory_writer(num_keep_alive_refs=...) as w``."""
    with client.trajectory_writer(num_keep_alive_refs=6) as w:
        assert isinstance(w, shmreplay.TrajectoryWriter)
        for i in range(6):
            w.append(step(i))
        w.create_item("seq", 1.0, seq4(w))
    data = take_all(client, "seq", 1)  # committed: the clean exit flushed
    np.testing.assert_array_equal(data["action"], [[2, 3, 4, 5]])


def test_items_record_their_episode_and_info_counts_episodes(client):
    """Reverb's num_episodes / num_deleted_episodes: episodes with items in the table, and
    those whose items are all gone."""
    t = client.table("seq")
    with client.trajectory_writer(num_keep_alive_refs=8) as w:
        for _ in range(3):
            for i in range(6):
                w.append(step(i))
                if w.episode_steps >= 4:
                    w.create_item("seq", 1.0, seq4(w))
            w.end_episode()
    info = t.info()
    assert info.current_size == 9 and info.num_episodes == 3 and info.num_deleted_episodes == 0
    ep = t.core.episode[t.core.state == 2]  # READY: what the items recorded
    assert len(np.unique(ep)) == 3 and (ep != 0).all()
    first_episode = np.unique(ep)[0]
    firsts = t.core.episode_steps[(t.core.state == 2) & (t.core.episode == first_episode)]
    assert sorted(map(tuple, firsts.tolist())) == [(0, 3), (1, 4), (2, 5)]
    # (no sampling here: this table's max_times_sampled = 1 would delete what it samples)
    first_slots = np.flatnonzero((t.core.state == 2) & (t.core.episode == first_episode))
    assert t.delete(t.core.key[first_slots]) == 0
    info = t.info()
    assert info.num_episodes == 2 and info.num_deleted_episodes == 1


def test_insert_takes_an_episode_and_checks_it(client):
    t = client.table("pick")
    obs = np.zeros((1, 3, 3), np.float32)
    with pytest.raises(shmreplay.InvalidArgumentError, match="first step"):
        t.insert_batch({"obs": obs}, episodes=[[7, 5, 1]])
    with pytest.raises(shmreplay.InvalidArgumentError, match="episode"):
        t.reserve(episode=(1, 2))
    t.insert({"obs": obs[0]}, episode=(42, 0, 2))
    t.flush()
    info = t.info()
    assert (info.current_size, info.num_episodes) == (1, 1)
