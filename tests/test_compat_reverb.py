"""shmreplay.compat.reverb: Reverb programs run on shmreplay after one changed import.

Every test runs real daemons. Instance names carry this process's test prefix (through
$SHMREPLAY_REVERB_PREFIX), so the leak check of conftest sees anything left behind.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import pickle
import time

import numpy as np
import pytest

import shmreplay
from shmreplay.compat import reverb
from shmreplay.config import RateLimiterSpec, SelectorSpec
from shmreplay.testing import unique_name

CTX = mp.get_context("spawn")


@pytest.fixture(autouse=True)
def _instance_names(monkeypatch):
    monkeypatch.setenv("SHMREPLAY_REVERB_PREFIX", f"{unique_name()}-reverb-")


@pytest.fixture
def servers():
    """Start reverb.Servers; every one is stopped afterwards, also when the test fails."""
    started: list[reverb.Server] = []

    def start(*args, **kwargs) -> reverb.Server:
        s = reverb.Server(*args, **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# -- Reverb's README quick start ----------------------------------------------------------------


def test_readme_quick_start(servers):
    """Reverb's quick start, with ``signature=`` added to the table.

    The other change: the quick start inserts ``[0, 1]`` and a 3-step trajectory into the same
    table; a table with a signature holds one structure, so the ported insert writes that
    structure (and ``[0, 1]`` is refused with a SignatureError).
    """
    server = servers(
        tables=[
            reverb.Table(
                name="my_table",
                sampler=reverb.selectors.Uniform(),
                remover=reverb.selectors.Fifo(),
                max_size=100,
                rate_limiter=reverb.rate_limiters.MinSize(1),
                signature={
                    "a": reverb.TensorSpec([3], np.int64),
                    "b": reverb.TensorSpec([3], np.int64),
                },
            ),
        ],
    )
    client = reverb.Client(f"localhost:{server.port}")
    info = client.server_info()
    assert list(info) == ["my_table"] and info["my_table"].current_size == 0

    with pytest.raises(shmreplay.SignatureError, match="insert a dict with those keys"):
        client.insert([0, 1], priorities={"my_table": 1.0})
    client.insert({"a": np.array([0, 1, 2]), "b": np.array([10, 11, 12])}, {"my_table": 1.0})

    with client.trajectory_writer(num_keep_alive_refs=3) as writer:
        writer.append({"a": 2, "b": 12})
        writer.append({"a": 3, "b": 13})
        writer.append({"a": 4, "b": 14})
        writer.create_item(
            table="my_table",
            priority=1.0,
            trajectory={
                "a": writer.history["a"][:],
                "b": writer.history["b"][:],
            },
        )
        writer.flush()

    samples = list(client.sample("my_table", num_samples=2))
    assert len(samples) == 2
    for timesteps in samples:
        assert len(timesteps) == 3  # one ReplaySample per timestep
        for step in timesteps:
            assert isinstance(step, reverb.ReplaySample)
            assert step.info._fields == (
                "key",
                "probability",
                "table_size",
                "priority",
                "times_sampled",
            )
            assert step.info.probability == 0.5 and step.info.table_size == 2
            assert step.info.priority == 1.0
        a = [int(s.data[0]) for s in timesteps]
        b = [int(s.data[1]) for s in timesteps]
        assert (a, b) in (([0, 1, 2], [10, 11, 12]), ([2, 3, 4], [12, 13, 14]))
    assert client.server_info()["my_table"].current_size == 2

    (whole,) = client.sample(
        "my_table", num_samples=1, emit_timesteps=False, unpack_as_table_signature=True
    )
    assert set(whole.data) == {"a", "b"} and whole.data["a"].shape == (3,)
    assert whole.data["b"].tolist() == [x + 10 for x in whole.data["a"].tolist()]


# -- an Acme-style n-step actor and a prioritized learner ------------------------------------------

N = 3
GAMMA = 0.9
EPISODE = 12


def _reward(episode: int, t: int) -> float:
    return float(episode * 100 + t)


def _discount(t: int) -> float:
    return 0.0 if t == EPISODE - 1 else 1.0


def _nstep_table(name: str = "nstep") -> reverb.Table:
    return reverb.Table(
        name=name,
        sampler=reverb.selectors.Prioritized(priority_exponent=0.6),
        remover=reverb.selectors.Fifo(),
        max_size=1000,
        rate_limiter=reverb.rate_limiters.MinSize(1),
        signature={
            "observation": reverb.TensorSpec([4], np.float32),
            "action": reverb.TensorSpec([], np.int64),
            "reward": reverb.TensorSpec([N], np.float32),
            "discount": reverb.TensorSpec([N], np.float32),
            "next_observation": reverb.TensorSpec([4], np.float32),
        },
    )


def _actor(client: reverb.Client, episodes: int) -> int:
    """Acme's way with a trajectory writer: the observation opens a step (partial), the
    action, reward and discount that follow it close the step; an item per step once N steps
    follow it. Observations encode (episode, t) so the learner can check every value."""
    items = 0
    with client.trajectory_writer(num_keep_alive_refs=N + 1) as writer:
        for e in range(episodes):
            obs = np.array([e, 0, 0, 0], np.float32)
            writer.append({"observation": obs}, partial_step=True)
            for t in range(EPISODE):
                action = e * 1000 + t
                obs = np.array([e, t + 1, 0, 0], np.float32)
                writer.append(
                    {
                        "action": np.int64(action),
                        "reward": np.float32(_reward(e, t)),
                        "discount": np.float32(_discount(t)),
                    }
                )
                writer.append({"observation": obs}, partial_step=True)
                if writer.episode_steps >= N:
                    h = writer.history
                    writer.create_item(
                        table="nstep",
                        priority=1.0,
                        trajectory={
                            "observation": h["observation"][-N - 1],
                            "action": h["action"][-N - 1],
                            "reward": h["reward"][-N - 1 : -1],
                            "discount": h["discount"][-N - 1 : -1],
                            "next_observation": h["observation"][-1],
                        },
                    )
                    items += 1
            writer.end_episode()
    return items


def _check_transition(data: dict) -> tuple[int, int]:
    e, t = int(data["observation"][0]), int(data["observation"][1])
    assert data["action"] == e * 1000 + t
    assert data["reward"].tolist() == [_reward(e, t + k) for k in range(N)]
    assert data["discount"].tolist() == [_discount(t + k) for k in range(N)]
    assert data["next_observation"].tolist() == [e, t + N, 0, 0]
    # The learner's n-step return: sum_k γ^k r_{t+k}, cut by a zero discount.
    ret, scale = 0.0, 1.0
    for k in range(N):
        ret += scale * data["reward"][k]
        scale *= GAMMA * data["discount"][k]
    expected = sum(
        GAMMA**k * _reward(e, t + k) for k in range(N) if all(_discount(t + j) for j in range(k))
    )
    assert math.isclose(ret, expected, rel_tol=1e-5)
    return e, t


def test_acme_style_nstep_adder_and_learner(servers):
    server = servers(tables=[_nstep_table()])
    client = server.localhost_client()
    items = _actor(client, episodes=3)
    assert items == 3 * (EPISODE - N + 1)
    info = client.server_info()["nstep"]
    assert info.current_size == items and info.num_episodes == 3

    # Learner: sample, check every transition, update priorities; zero priority = never again.
    zeroed: set[int] = set()
    seen: set[tuple[int, int]] = set()
    for _ in range(10):
        updates = {}
        zeroed_before = set(zeroed)  # updates of this batch apply after it
        for s in client.sample(
            "nstep", num_samples=32, emit_timesteps=False, unpack_as_table_signature=True
        ):
            assert s.info.key not in zeroed_before
            seen.add(_check_transition(s.data))
            if s.data["observation"][1] % 2 == 0:  # even t: drop to priority 0
                updates[s.info.key] = 0.0
                zeroed.add(s.info.key)
            else:
                updates[s.info.key] = 2.0 + s.info.times_sampled
        client.mutate_priorities("nstep", updates=updates)
    assert len(seen) > 10
    (s,) = client.sample("nstep", 1, emit_timesteps=False, unpack_as_table_signature=True)
    assert s.info.key not in zeroed and s.data["observation"][1] % 2 == 1

    # Deleting every key seen leaves the rest.
    keys = {s.info.key for s in client.sample("nstep", 50, emit_timesteps=False)}
    client.mutate_priorities("nstep", deletes=list(keys))
    assert client.server_info()["nstep"].current_size == items - len(keys)
    client.reset("nstep")
    info = client.server_info()["nstep"]
    assert info.current_size == 0 and info.rate_limiter_info.insert_stats.completed == 0


# -- other processes -------------------------------------------------------------------------------


def _sample_all(address: str, n: int, results) -> None:
    from shmreplay.compat import reverb

    client = pickle.loads(pickle.dumps(reverb.Client(address)))  # pickles by address
    got = sorted(
        int(s[0].data[0]) for s in client.sample("queue", n)
    )  # each item: [one ReplaySample]
    results.put(got)
    client.insert(np.int64(-1), priorities={"queue": 1.0})


def test_a_client_in_another_process_sees_the_inserts(servers):
    server = servers(
        tables=[reverb.Table.queue("queue", 100, signature=reverb.TensorSpec([], np.int64))]
    )
    client = reverb.Client(f"127.0.0.1:{server.port}")
    for i in range(20):
        client.insert(i, priorities={"queue": 1.0})
    results = CTX.Queue()
    p = CTX.Process(target=_sample_all, args=(f"localhost:{server.port}", 20, results))
    p.start()
    try:
        assert results.get(timeout=60) == list(range(20))
        p.join(60)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join()
    ((step,),) = client.sample("queue", 1)  # what the other process inserted
    assert int(step.data[0]) == -1 and client.server_info()["queue"].current_size == 0


def _sequence_producer(address: str, items: int) -> None:
    """An IMPALA-style actor: 5-step sequences into a queue, never running far ahead."""
    from shmreplay.compat import reverb

    client = reverb.Client(address)
    with client.trajectory_writer(num_keep_alive_refs=5) as writer:
        for step in range(items + 4):
            writer.append({"obs": np.full(2, step, np.float32), "step": np.int64(step)})
            if writer.episode_steps >= 5:
                writer.create_item(
                    "sequences",
                    1.0,
                    {"obs": writer.history["obs"][-5:], "step": writer.history["step"][-5:]},
                )
                writer.flush(block_until_num_items=4)
        writer.end_episode()


def test_a_queue_between_processes_delivers_every_sequence_once_in_order(servers):
    table = reverb.Table.queue(
        "sequences",
        8,
        signature={
            "obs": reverb.TensorSpec([5, 2], np.float32),
            "step": reverb.TensorSpec([5], np.int64),
        },
    )
    server = servers(tables=[table])
    items = 60
    p = CTX.Process(target=_sequence_producer, args=(f"localhost:{server.port}", items))
    p.start()
    try:
        client = server.localhost_client()
        firsts = []
        for timesteps in client.sample("sequences", num_samples=items):
            assert len(timesteps) == 5
            steps = [int(t.data[1]) for t in timesteps]
            assert steps == list(range(steps[0], steps[0] + 5))
            assert [t.data[0].tolist() for t in timesteps] == [[s, s] for s in steps]
            assert timesteps[0].info.times_sampled == 1
            firsts.append(steps[0])
        assert firsts == list(range(items))  # each once, in insertion order
        p.join(60)
        assert p.exitcode == 0
        assert client.server_info()["sequences"].current_size == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join()


# -- mapping of selectors, limiters, tables ----------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "spec"),
    [
        (reverb.selectors.Uniform(), SelectorSpec.uniform()),
        (reverb.selectors.Prioritized(0.8), SelectorSpec.prioritized(0.8)),
        (reverb.selectors.Prioritized(priority_exponent=0), SelectorSpec.prioritized(0.0)),
        (reverb.selectors.Fifo(), SelectorSpec.fifo()),
        (reverb.selectors.Lifo(), SelectorSpec.lifo()),
        (reverb.selectors.MinHeap(), SelectorSpec.min_heap()),
        (reverb.selectors.MaxHeap(), SelectorSpec.max_heap()),
        (reverb.item_selectors.Fifo(), SelectorSpec.fifo()),
    ],
    ids=lambda x: type(x).__name__,
)
def test_selectors_map_to_specs(selector, spec):
    assert selector.spec == spec


@pytest.mark.parametrize(
    ("limiter", "spec"),
    [
        (reverb.rate_limiters.MinSize(100), RateLimiterSpec.min_size(100)),
        (
            reverb.rate_limiters.SampleToInsertRatio(8.0, 1000, 200.0),
            RateLimiterSpec.sample_to_insert_ratio(8.0, 1000, 200.0),
        ),
        (
            reverb.rate_limiters.SampleToInsertRatio(1.0, 10, (5.0, 15.0)),
            RateLimiterSpec("sample_to_insert_ratio", 1.0, 10, 5.0, 15.0),
        ),
        (reverb.rate_limiters.Queue(size=10), RateLimiterSpec("queue", 1.0, 1, 0.0, 10.0)),
        (reverb.rate_limiters.Stack(10), RateLimiterSpec("stack", 1.0, 1, 0.0, 10.0)),
        (
            reverb.rate_limiters.RateLimiter(2.0, 3, -4.0, 5.0),
            RateLimiterSpec("custom", 2.0, 3, -4.0, 5.0),
        ),
    ],
    ids=lambda x: type(x).__name__,
)
def test_rate_limiters_map_to_specs(limiter, spec):
    assert limiter.spec == spec
    assert limiter._min_diff == spec.min_diff and limiter._max_diff == spec.max_diff


def test_queue_and_stack_tables_are_reverbs():
    sig = reverb.TensorSpec([], np.int64)
    q = reverb.Table.queue("q", 10, signature=sig).spec
    assert (q.sampler, q.remover, q.max_times_sampled) == (
        SelectorSpec.fifo(),
        SelectorSpec.fifo(),
        1,
    )
    assert q.rate_limiter == RateLimiterSpec.queue(10)
    s = reverb.Table.stack("s", 10, signature=sig).spec
    assert (s.sampler, s.remover, s.max_times_sampled) == (
        SelectorSpec.lifo(),
        SelectorSpec.lifo(),
        1,
    )
    assert s.rate_limiter == RateLimiterSpec.stack(10)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: reverb.rate_limiters.MinSize(0), "min_size must be an integer ≥ 1"),
        (
            lambda: reverb.rate_limiters.SampleToInsertRatio(4.0, 10, 1.0),
            "error_buffer too small",
        ),
        (
            lambda: reverb.rate_limiters.SampleToInsertRatio(1.0, 10, (20.0, 30.0)),
            "sampling could never start",
        ),
        (lambda: reverb.rate_limiters.SampleToInsertRatio(-1.0, 10, 5.0), "samples_per_insert"),
        (lambda: reverb.selectors.Prioritized(-0.5), "priority_exponent"),
        (lambda: _table(max_size=0), "max_size"),
        (lambda: _table(name=""), "name must be nonempty"),
        (lambda: _table(name="a/b"), "letters, digits"),
        (lambda: _table(sampler="uniform"), "sampler must be one of reverb.selectors"),
        (lambda: reverb.Server(tables=[]), "At least one table"),
        (lambda: reverb.Server(tables=[_table(), _table()]), "same name: t"),
    ],
)
def test_reverbs_constructor_errors_are_value_errors(make, match):
    with pytest.raises(ValueError, match=match) as info:
        make()
    assert isinstance(info.value, shmreplay.ConfigError)


def _table(**kw) -> reverb.Table:
    args = {
        "name": "t",
        "sampler": reverb.selectors.Uniform(),
        "remover": reverb.selectors.Fifo(),
        "max_size": 10,
        "rate_limiter": reverb.rate_limiters.MinSize(1),
        "signature": {"x": reverb.TensorSpec([2], np.float32)},
    }
    return reverb.Table(**{**args, **kw})


class _TfLikeShape:
    """What tf.TensorShape offers: as_list(), which raises for an unknown rank."""

    def __init__(self, dims):
        self.dims = dims

    def as_list(self):
        if self.dims is None:
            raise ValueError("as_list() is not defined on an unknown TensorShape.")
        return list(self.dims)


class _TfLikeDType:
    def __init__(self, np_type):
        self.as_numpy_dtype = np_type


class _TfLikeSpec:
    def __init__(self, dims, np_type):
        self.shape = _TfLikeShape(dims)
        self.dtype = _TfLikeDType(np_type)


def test_tf_tensor_specs_work_by_duck_typing(servers):
    sig = {"obs": _TfLikeSpec([2, 3], np.uint8), "r": _TfLikeSpec([], np.float32)}
    table = _table(signature=sig)
    assert [(f.name, f.shape, f.dtype) for f in table.spec.signature] == [
        ("obs", (2, 3), "uint8"),
        ("r", (), "float32"),
    ]
    server = servers(tables=[table])
    client = server.localhost_client()
    assert client.server_info()["t"].signature is sig  # as given, in the server's process
    client.insert({"obs": np.ones((2, 3), np.uint8), "r": 0.5}, {"t": 1.0})
    ((s,),) = client.sample("t", emit_timesteps=True, unpack_as_table_signature=True)
    assert s.data["obs"].tolist() == [[1, 1, 1]] * 2 and s.data["r"] == 0.5


def test_signatures_of_one_spec_and_of_a_list(servers):
    """Reverb's client tests use a scalar signature and insert(i) or insert([i])."""
    server = servers(
        tables=[
            _table(name="scalar", signature=reverb.TensorSpec((), np.int64)),
            _table(
                name="pair",
                signature=[reverb.TensorSpec([2], np.float32), reverb.TensorSpec([], np.bool_)],
            ),
        ]
    )
    client = reverb.Client(f"localhost:{server.port}")
    client.insert(7, {"scalar": 1.0})
    client.insert([7], {"scalar": 1.0})
    with pytest.raises(shmreplay.SignatureError, match="flattens a list of 2"):
        client.insert([1, 2], {"scalar": 1.0})
    client.insert([np.array([1.0, 2.0], np.float32), True], {"pair": 1.0})
    ((s,),) = client.sample("scalar", 1)
    assert s.data == [7] and s.info.table_size == 2
    (s,) = client.sample("scalar", 1, emit_timesteps=False, unpack_as_table_signature=True)
    assert s.data == 7
    (s,) = client.sample("pair", 1, emit_timesteps=False, unpack_as_table_signature=True)
    assert s.data[0].tolist() == [1.0, 2.0] and s.data[1]
    info = client.server_info()
    assert info["scalar"].sampler_options.uniform and info["scalar"].remover_options.fifo
    assert info["pair"].max_size == 10 and info["pair"].rate_limiter_info.min_size_to_sample == 1


def test_server_info_in_another_process_rebuilds_the_signature(servers):
    server = servers(tables=[_nstep_table()])
    results = CTX.Queue()
    p = CTX.Process(target=_server_info, args=(f"localhost:{server.port}", results))
    p.start()
    try:
        info = results.get(timeout=60)
        p.join(60)
    finally:
        if p.is_alive():
            p.kill()
            p.join()
    assert info["signature"]["reward"] == reverb.TensorSpec([N], np.float32, "reward")
    assert info["sampler_options"].prioritized.priority_exponent == 0.6
    assert info["sampler_options"].WhichOneof("distribution") == "prioritized"
    assert info["remover_options"].fifo and info["max_size"] == 1000


def _server_info(address: str, results) -> None:
    from shmreplay.compat import reverb

    info = reverb.Client(address).server_info()["nstep"]
    results.put(
        {
            "signature": info.signature,
            "sampler_options": info.sampler_options,
            "remover_options": info.remover_options,
            "max_size": info.max_size,
        }
    )


def test_trajectory_writer_timeout_is_deadline_exceeded(servers):
    server = servers(tables=[reverb.Table.queue("q", 2, signature=reverb.TensorSpec([], np.int64))])
    client = server.localhost_client()
    writer = client.trajectory_writer(num_keep_alive_refs=1)
    with pytest.raises(RuntimeError, match="before `append`"):
        writer.history  # noqa: B018
    try:
        for i in range(3):
            writer.append({"x": np.int64(i)})
            # As Reverb's, create_item does not wait for the limiter, also after a pause
            # (shmreplay's own writer sends at once after one, and would wait here forever).
            time.sleep(0.01)
            writer.create_item("q", 1.0, writer.history["x"][-1])
        with pytest.raises(reverb.DeadlineExceededError) as info:
            writer.flush(timeout_ms=300)  # the queue holds 2: the third waits
        assert isinstance(info.value, reverb.errors.DeadlineExceededError)
        assert isinstance(info.value, TimeoutError)
        ((s,),) = client.sample("q", 1)
        assert s.data == [0]
        writer.flush(timeout_ms=10_000)  # room again
    finally:
        writer.close()
    assert sorted(int(s[0].data[0]) for s in client.sample("q", 2)) == [1, 2]


def test_checkpoint_returns_its_path(servers, tmp_path):
    server = servers(
        tables=[_table()],
        checkpointer=reverb.checkpointers.DefaultCheckpointer(path=str(tmp_path)),
    )
    client = server.localhost_client()
    client.insert({"x": np.array([1.0, 2.0], np.float32)}, {"t": 1.0})
    path = client.checkpoint()
    assert isinstance(path, str) and path.startswith(str(tmp_path))
    server.stop()
    # A new server on the checkpoint's directory starts with the item.
    again = servers(
        tables=[_table()],
        checkpointer=reverb.checkpointers.DefaultCheckpointer(path=str(tmp_path)),
    )
    assert again.localhost_client().server_info()["t"].current_size == 1


def test_server_port_names_the_instance_and_stop_leaves_nothing(servers):
    from shmreplay.engine.instance import shm_objects

    server = servers(tables=[_table()], port=45678)
    assert server.port == 45678 and server.instance_name.endswith("-reverb-45678")
    with shmreplay.attach(server.instance_name) as c:  # plain shmreplay sees the same tables
        assert c.tables == ["t"]
    assert shm_objects(server.instance_name)
    server.stop()
    server.stop()
    assert shm_objects(server.instance_name) == []
    servers(tables=[_table()], port=45679)
    with pytest.raises(shmreplay.ServerStartError, match="already"):
        servers(tables=[_table()], port=45679)


def test_a_server_collected_while_a_client_attaches_does_not_deadlock(servers, monkeypatch):
    """The garbage collector may run Server.__del__ (which drops the server's attachment)
    inside another attach, on the same thread, under the attachments' lock."""
    collected = reverb.Server(tables=[_table()])
    collected.localhost_client().server_info()  # it has an attachment to drop
    server = servers(tables=[_table()])
    real_attach = reverb._attach

    def attach_while_collecting(*args, **kwargs):
        collected.__del__()
        return real_attach(*args, **kwargs)

    monkeypatch.setattr(reverb, "_attach", attach_while_collecting)
    assert server.localhost_client().server_info()["t"].current_size == 0
    collected.stop()  # idempotent after __del__


# -- what is not supported -------------------------------------------------------------------------

UNSUPPORTED = [
    (
        "gRPC across hosts",
        lambda c: reverb.Client("replay.example.com:8000"),
        "gRPC across hosts is not supported",
    ),
    ("signature-less table", lambda c: _table(signature=None), "a table without signature"),
    ("extensions", lambda c: _table(extensions=[object()]), "table extensions are not supported"),
    (
        "nested signature",
        lambda c: _table(signature={"obs": {"pixels": reverb.TensorSpec([2], np.uint8)}}),
        "nested signatures are not supported",
    ),
    (
        "unknown dimension",
        lambda c: _table(signature={"x": _TfLikeSpec([None, 3], np.float32)}),
        "is not fully defined",
    ),
    (
        "unknown rank",
        lambda c: _table(signature={"x": _TfLikeSpec(None, np.float32)}),
        "is not fully defined",
    ),
    (
        "string dtype",
        lambda c: _table(signature={"x": reverb.TensorSpec([], np.str_)}),
        "not a fixed-size numeric dtype",
    ),
    ("legacy writer", lambda c: c.writer(2), "legacy writer"),
    ("structured writer", lambda c: c.structured_writer([object()]), "structured_writer"),
    ("structured module", lambda c: reverb.structured.create_config, "reverb.structured"),
    ("Writer", lambda c: reverb.Writer(None), "reverb.Writer"),
    ("TFClient", lambda c: reverb.TFClient("localhost:1"), "no TensorFlow ops"),
    ("ReplayDataset", lambda c: reverb.ReplayDataset("localhost:1", "t"), "no TensorFlow ops"),
    (
        "TrajectoryDataset",
        lambda c: reverb.TrajectoryDataset.from_table_signature("localhost:1", "t", 1),
        "no TensorFlow ops",
    ),
    ("TimestepDataset", lambda c: reverb.TimestepDataset("localhost:1"), "no TensorFlow ops"),
    ("PatternDataset", lambda c: reverb.PatternDataset(), "no TensorFlow ops"),
    (
        "other checkpointers",
        lambda c: reverb.Server([_table()], checkpointer=object()),
        "DefaultCheckpointer",
    ),
    (
        "checkpoint without a checkpointer",
        lambda c: c.checkpoint(),
        "pass checkpointer=reverb.checkpointers.DefaultCheckpointer",
    ),
    (
        "appending a non-dict step",
        lambda c: c.trajectory_writer(2).append([1, 2]),
        "only a flat dict",
    ),
    (
        "nested insert data",
        lambda c: c.insert({"x": {"y": 1}}, {"t": 1.0}),
        "nested data under 'x' is not supported",
    ),
]


def test_every_unsupported_feature_raises_the_documented_error(servers):
    server = servers(tables=[_table()])
    client = server.localhost_client()
    assert issubclass(shmreplay.NotSupportedError, NotImplementedError)
    for what, call, match in UNSUPPORTED:
        with pytest.raises(shmreplay.NotSupportedError, match=match):
            call(client)
        print("raises as documented:", what)
