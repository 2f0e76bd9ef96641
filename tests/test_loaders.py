"""Learner-side loaders: ``Table.as_iterator``, ``shmreplay.torch``, ``shmreplay.jax``, and
priority updates from tensors, against real daemons and real writer processes."""

from __future__ import annotations

import gc
import importlib.util
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import shmreplay
from shmreplay.testing import (
    STAMPED_SIGNATURE,
    lock_holder,
    stamped_actor,
    stamped_batch,
    table_toml,
)
from shmreplay.testing import verify_stamped as _verify

CTX = mp.get_context("spawn")
PRIORITIZED = '{ kind = "prioritized", priority_exponent = 1.0 }'


def verify_stamped(data) -> np.ndarray:
    """verify_stamped for numpy, torch or JAX arrays."""
    return _verify({k: np.asarray(v) for k, v in data.items()})


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("shmreplay-prefetch")]


@pytest.fixture(autouse=True)
def _no_thread_leaks():
    """Every test stops the prefetch threads it started (close, with, or dropping them)."""
    yield
    gc.collect()  # iterators dropped by a failing test
    assert wait_until(lambda: not prefetch_threads()), "a test left a prefetch thread running"


@pytest.fixture
def stamped(daemon_factory):
    """A daemon with a uniform stamped table of 1000 items and a client on it."""
    d = daemon_factory(table_toml(max_size=1000, signature=STAMPED_SIGNATURE))
    client = shmreplay.attach(d.name)
    t = client.table("replay")
    t.insert_batch(stamped_batch(np.arange(1000)))
    t.flush()
    yield d, client, t
    client.close()


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def our_clients(client: shmreplay.Client) -> int:
    return sum(c["pid"] == os.getpid() for c in client.server_info()["clients"])


# -- as_iterator ---------------------------------------------------------------------------------


def test_as_iterator_delivers_intact_rows_of_their_keys_while_a_writer_recycles_slots(
    daemon_factory,
):
    """A writer process keeps evicting and refilling a small table while the prefetch thread
    samples it three batches ahead: every row of every batch is intact, and is the row its key
    was written with."""
    d = daemon_factory(table_toml(max_size=300, signature=STAMPED_SIGNATURE))
    client = shmreplay.attach(d.name)
    t = client.table("replay")
    t.insert_batch(stamped_batch(np.arange(300)))
    results = CTX.Queue()
    writer = CTX.Process(target=stamped_actor, args=(d.name, "replay", 1, 10_000, results))
    seen: dict[int, int] = {}
    batches = 0
    try:
        writer.start()
        deadline = time.monotonic() + 120
        with t.as_iterator(64, prefetch=3, timeout=30) as it:
            for batch in it:  # until the writer is done (its results arrive)
                assert verify_stamped(batch.data).all()
                seen.update(zip(batch.info.key.tolist(), batch.data["uid"].tolist(), strict=True))
                batches += 1
                if not results.empty() or time.monotonic() > deadline:
                    break
        _, keys, uids = results.get(timeout=120)
        writer.join(60)
    finally:
        if writer.is_alive():
            writer.kill()
            writer.join()
        client.close()
    assert writer.exitcode == 0
    written = dict(zip(keys, uids, strict=True))
    from_writer = {k: u for k, u in seen.items() if u >= 1_000_000_000}
    assert len(from_writer) > 1000, "the iterator saw few rows of the concurrent writer"
    assert all(written[k] == u for k, u in from_writer.items())


def test_a_batch_stays_valid_until_keep_more_are_taken(stamped):
    """This test bites: with ``Prefetcher.__next__`` handing back one batch too early, the
    thread overwrites batches the caller still holds (seen once, in 2 of 36 checks)."""
    _, _, t = stamped
    with t.as_iterator(16, prefetch=2, keep=3, timeout=10) as it:
        held = []
        for _ in range(12):
            batch = next(it)
            held.append((batch, {k: v.copy() for k, v in batch.data.items()}))
            for b, copied in held[-3:]:  # the last `keep` batches: untouched
                assert all(np.array_equal(b.data[k], copied[k]) for k in copied)
        # 2 + 3 buffer sets in turn: a batch's arrays are those of the batch 5 before it
        assert held[-1][0].data["obs"] is not held[-2][0].data["obs"]
        assert held[-1][0].data["obs"] is held[-6][0].data["obs"]


def test_copy_true_yields_fresh_arrays(stamped):
    _, _, t = stamped
    with t.as_iterator(16, copy=True, timeout=10) as it:
        batches = [next(it) for _ in range(8)]
    assert len({id(b.data["obs"]) for b in batches}) == 8
    for b in batches:  # still intact after the iterator went on and closed
        assert verify_stamped(b.data).all()


def test_the_prefetch_thread_has_its_own_client_and_closing_stops_it(stamped):
    _, client, t = stamped
    assert our_clients(client) == 1
    it = t.as_iterator(32, timeout=10)
    next(it)
    assert our_clients(client) == 2 and len(prefetch_threads()) == 1
    assert it.stats().batches == 1
    it.close()
    it.close()  # idempotent
    assert not prefetch_threads()
    assert our_clients(client) == 1
    with pytest.raises(shmreplay.ClientClosedError, match="closed"):
        next(it)
    assert t.sample(4).data["obs"].shape == (4, 16)  # the caller's handle is untouched


def test_dropping_an_iterator_stops_its_thread(stamped):
    _, client, t = stamped
    it = t.as_iterator(32, timeout=10)
    next(it)
    del it
    gc.collect()
    assert wait_until(lambda: not prefetch_threads() and our_clients(client) == 1)


def test_close_stops_a_thread_blocked_by_the_rate_limiter_promptly(daemon_factory):
    d = daemon_factory(table_toml(signature=STAMPED_SIGNATURE))
    with shmreplay.attach(d.name) as client:
        it = client.table("replay").as_iterator(8)  # empty table: the thread waits
        time.sleep(0.3)
        t0 = time.monotonic()
        it.close()
        assert time.monotonic() - t0 < 5.0  # one 0.1 s slice; generous for a loaded machine
        assert not prefetch_threads()


def test_a_timeout_raises_and_the_iterator_recovers(daemon_factory):
    d = daemon_factory(table_toml(signature=STAMPED_SIGNATURE))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        with t.as_iterator(8, timeout=0.3) as it:
            with pytest.raises(shmreplay.RateLimiterTimeout, match="rate limiter.*size 0"):
                next(it)
            t.insert_batch(stamped_batch(np.arange(5)))
            batch = next(it)
            assert verify_stamped(batch.data).all() and len(batch) == 8


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_daemon_gone_is_raised_in_the_consumer(daemon_factory, how):
    """A stopped daemon marks its tables shut down: the thread's next sample raises. A killed
    one cannot: sampling a table needs no daemon and goes on; a thread that waits for items
    finds the daemon dead when its wait ends."""
    d = daemon_factory(table_toml(signature=STAMPED_SIGNATURE))
    client = shmreplay.attach(d.name)
    t = client.table("replay")
    t.insert_batch(stamped_batch(np.arange(100)))
    it = t.as_iterator(8, timeout=30)
    try:
        next(it)
        if how == "stopped":
            d.stop()
        else:
            d.proc.kill()
            d.proc.wait()
            t.reset()  # no items: the thread waits
        with pytest.raises(shmreplay.DaemonNotRunning):
            for _ in range(10):  # batches sampled before, then the thread's error
                next(it)
        with pytest.raises(shmreplay.DaemonNotRunning):
            next(it)  # and again: the iterator is dead
        assert wait_until(lambda: not prefetch_threads())  # it ended as it reported the error
    finally:
        it.close()
        client.close()


def test_a_lock_held_by_a_stuck_process_is_named_and_the_thread_recovers(daemon_factory):
    """The thread's short sample calls time out on the lock (LockTimeout) without failing; the
    consumer's timeout names the holder; once the holder dies, sampling resumes."""
    d = daemon_factory(table_toml(signature=STAMPED_SIGNATURE))
    client = shmreplay.attach(d.name)
    t = client.table("replay")
    t.insert_batch(stamped_batch(np.arange(100)))
    t.flush()
    ready = CTX.Event()
    holder = CTX.Process(target=lock_holder, args=(d.name, "replay", ready))
    try:
        holder.start()
        assert ready.wait(60)
        with t.as_iterator(8, timeout=1.0) as it:
            with pytest.raises(shmreplay.RateLimiterTimeout, match=f"held by pid {holder.pid}"):
                next(it)
            holder.kill()
            holder.join()
            assert verify_stamped(it.take(timeout=60).sample.data).all()
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join()
        client.close()


@pytest.mark.parametrize(
    "kwargs", [{"batch_size": 0}, {"prefetch": 0}, {"keep": 0}, {"timeout": -1.0}]
)
def test_impossible_settings_are_refused_before_any_client_is_attached(stamped, kwargs):
    _, client, t = stamped
    args = {"batch_size": 8, **kwargs}
    with pytest.raises(shmreplay.InvalidArgumentError):
        t.as_iterator(args.pop("batch_size"), **args)
    assert our_clients(client) == 1


def test_main_thread_updates_priorities_while_the_thread_samples(daemon_factory):
    """The learner's thread updates, deletes and samples on its own handle while the prefetch
    thread samples through its client: the table stays consistent (no repair, the size adds
    up) and every update lands."""
    d = daemon_factory(table_toml(sampler=PRIORITIZED, signature=STAMPED_SIGNATURE))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        keys = t.insert_batch(stamped_batch(np.arange(1000)))
        t.flush()
        expected: dict[int, float] = {}
        with t.as_iterator(32, prefetch=2, timeout=10) as it:
            for i, batch in zip(range(300), it, strict=False):
                assert verify_stamped(batch.data).all()
                new = (batch.data["uid"] % 7 + 1).astype(np.float64)
                t.update_priorities(batch.info.key, new)
                expected.update(zip(batch.info.key.tolist(), new.tolist(), strict=True))
                if i % 50 == 0:
                    t.sample(16)  # the caller's handle samples too
        info = t.info()
        assert info.repairs == 0 and info.current_size == 1000
        assert t.update_priorities(keys, np.ones(1000)) == 0  # every key still present
        # uid-derived priorities were set; read them back from a sample of the updated keys
        t.update_priorities(list(expected), list(expected.values()))
        s = t.sample(500)
        for k, p in zip(s.info.key.tolist(), s.info.priority.tolist(), strict=True):
            if k in expected:
                assert p == expected[k]


# -- priorities from tensors ----------------------------------------------------------------------


def test_update_priorities_and_delete_take_torch_tensors(stamped):
    torch = pytest.importorskip("torch")
    _, _, t = stamped
    distinct = np.unique(t.sample(64).info.key)[:8]
    keys = torch.from_numpy(distinct.view(np.int64))  # int64, as shmreplay.torch yields
    prios = (torch.arange(8, dtype=torch.float32) + 1).requires_grad_()
    assert t.update_priorities(keys, prios * 2) == 0  # a tensor that requires grad
    assert t.update_priorities(keys[:1], torch.tensor([5.0], dtype=torch.bfloat16)) == 0
    assert t.update_priorities(keys[1:2], torch.tensor(6.0)) == 0  # 0-d
    assert t.delete(keys[2:4]) == 0
    assert t.update_priorities(keys[4:5], [1.0], deletes=keys[5:6]) == 0
    assert t.delete(keys[2:6]) == 3  # 2, 3 and 5 were deleted already; 4 is now
    with pytest.raises(shmreplay.InvalidArgumentError, match=">= 0"):
        t.update_priorities(torch.tensor([-1]), [1.0])
    with pytest.raises(shmreplay.InvalidArgumentError, match="integers"):
        t.delete(torch.tensor([1.5]))


# -- torch ---------------------------------------------------------------------------------------


def test_torch_iterate_yields_the_preallocated_buffers_with_intact_rows(daemon_factory):
    torch = pytest.importorskip("torch")
    import shmreplay.torch as st

    d = daemon_factory(table_toml(max_size=300, signature=STAMPED_SIGNATURE))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert_batch(stamped_batch(np.arange(300)))
        results = CTX.Queue()
        writer = CTX.Process(target=stamped_actor, args=(d.name, "replay", 1, 5000, results))
        try:
            writer.start()
            with st.iterate(t, 64, prefetch=2, timeout=30) as it:
                assert not it.pin_memory  # CPU-only build: nothing to pin
                ptrs = {name: {b[name].data_ptr() for b in it.buffers} for name in ("uid", "obs")}
                assert len(ptrs["obs"]) == 2 + 1  # prefetch + keep buffer sets
                for _, batch in zip(range(200), it, strict=False):
                    for name in ("uid", "obs"):  # zero copies: the buffers themselves
                        assert batch.data[name].data_ptr() in ptrs[name]
                    assert verify_stamped(batch.data).all()
                    assert batch.info.key.dtype == torch.int64
            results.get(timeout=120)
            writer.join(60)
        finally:
            if writer.is_alive():
                writer.kill()
                writer.join()
    assert writer.exitcode == 0


DTYPES_SIGNATURE = """
[table.signature]
flag = { dtype = "bool" }
big = { dtype = "uint64" }
small = { shape = [2], dtype = "uint16" }
half = { dtype = "float16" }
"""


def test_torch_dtypes_follow_the_fields_and_keys_are_int64(daemon_factory):
    torch = pytest.importorskip("torch")
    import shmreplay.torch as st

    d = daemon_factory(table_toml(signature=DTYPES_SIGNATURE, sampler='{ kind = "fifo" }'))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        key = t.insert({"flag": True, "big": np.uint64(2**63 + 5), "small": [1, 2], "half": 0.5})
        with st.iterate(t, 1, timeout=10) as it:
            batch = next(it)
        assert batch.data["flag"].dtype == torch.bool and bool(batch.data["flag"][0])
        assert batch.data["big"].dtype == torch.uint64
        assert batch.data["big"].view(torch.int64).numpy().view(np.uint64)[0] == 2**63 + 5
        assert batch.data["small"].dtype == torch.uint16 and batch.data["small"].shape == (1, 2)
        assert batch.data["half"].dtype == torch.float16
        assert batch.info.key.dtype == torch.int64 and int(batch.info.key[0]) == key
        assert t.update_priorities(batch.info.key, torch.tensor([2.0])) == 0


def test_pin_memory_true_without_cuda_says_what_to_do(stamped):
    torch = pytest.importorskip("torch")
    import shmreplay.torch as st

    if torch.cuda.is_available():
        pytest.skip("this build can pin memory")
    _, client, t = stamped
    with pytest.raises(shmreplay.InvalidArgumentError, match="pin_memory=None"):
        st.iterate(t, 8, pin_memory=True)
    assert our_clients(client) == 1  # refused before the thread's client was attached


def test_a_torch_learner_loop_updates_priorities_from_tensors(daemon_factory):
    """A tiny model's per-item loss (a tensor that requires grad) becomes the priorities; the
    table's priorities are exactly those afterwards."""
    torch = pytest.importorskip("torch")
    import shmreplay.torch as st

    d = daemon_factory(table_toml(sampler=PRIORITIZED, signature=STAMPED_SIGNATURE))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert_batch(stamped_batch(np.arange(500)))
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 1)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        expected: dict[int, float] = {}
        with st.iterate(t, 32, prefetch=2, timeout=10) as batches:
            for _, batch in zip(range(100), batches, strict=False):
                target = batch.data["uid"].float().unsqueeze(1) / 500
                loss = (model(batch.data["obs"] / 100) - target).abs().squeeze(1)
                opt.zero_grad()
                loss.mean().backward()
                opt.step()
                t.update_priorities(batch.info.key, loss + 1e-3)  # requires grad: detached
                expected.update(zip(batch.info.key.tolist(), (loss + 1e-3).tolist(), strict=True))
        assert len(expected) > 100
        s = t.sample(2000)  # priority-weighted with replacement: most of the keys come back
        checked = 0
        for k, p in zip(s.info.key.tolist(), s.info.priority.tolist(), strict=True):
            if k in expected:
                assert p == pytest.approx(expected[k], rel=1e-6)  # float32 loss -> float64
                checked += 1
        assert checked > 100


def test_torch_dataset_in_dataloader_workers_each_with_its_own_client(stamped):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    import shmreplay.torch as st

    d, client, _ = stamped
    for context in ("fork", "spawn"):
        ds = st.ReplayDataset(d.name, "replay", 32, timeout=30, num_batches=5, seed=1)
        loader = DataLoader(
            ds, batch_size=None, num_workers=2, multiprocessing_context=context, timeout=120
        )
        batches = list(loader)
        assert len(batches) == 10  # num_batches per worker
        for b in batches:
            assert isinstance(b, st.TensorSample) and b.data["obs"].shape == (32, 16)
            assert verify_stamped(b.data).all()
            assert b.info.key.dtype == torch.int64
        del loader
    assert wait_until(lambda: our_clients(client) == 1)  # the workers said bye


def test_torch_dataset_in_this_process_closes_its_client(stamped):
    pytest.importorskip("torch")
    import shmreplay.torch as st

    d, client, _ = stamped
    it = iter(st.ReplayDataset(d.name, "replay", 8, timeout=10))
    next(it)
    assert our_clients(client) == 2
    it.close()
    assert our_clients(client) == 1


# -- JAX: in a spawned process, so that pytest itself never imports JAX (its threads make every
# later fork of the test process, which several test files use, a deadlock risk) ---------------

needs_jax = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="pip install 'shmreplay[jax]'"
)


def _jax_iterate_keeps_batches_intact(name: str, out) -> None:
    """Every batch handed out stays intact after many more were sampled: no device array
    aliases a reused host buffer. This bites: without the CPU platform's fresh arrays
    (``_platform`` made to answer "gpu"), 16 of 40 kept batches were overwritten, as JAX's CPU
    backend aliases 64-byte-aligned numpy arrays."""
    import jax

    import shmreplay.jax as sj

    with shmreplay.attach(name) as client:
        t = client.table("replay")
        kept = []
        with sj.iterate(t, 32, prefetch=2, timeout=10) as it:
            for _, batch in zip(range(40), it, strict=False):
                assert isinstance(batch.data["obs"], jax.Array)
                assert batch.info.key.dtype == np.uint64  # on the host, never truncated
                kept.append(batch)
                t.update_priorities(batch.info.key, jax.numpy.full(32, 2.0))
        out.put([bool(verify_stamped(batch.data).all()) for batch in kept])


def _update_priorities_from_jax(name: str, out) -> None:
    import jax.numpy as jnp

    with shmreplay.attach(name) as client:
        t = client.table("replay")
        s = t.sample(4)
        out.put((t.update_priorities(s.info.key, jnp.full(4, 3.0)), t.info().max_priority))


def _in_a_spawned_process(target, name: str):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=target, args=(name, out))
    p.start()
    try:
        return out.get(timeout=120)
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()


@needs_jax
def test_jax_iterate_delivers_intact_batches_that_stay_intact(stamped):
    intact = _in_a_spawned_process(_jax_iterate_keeps_batches_intact, stamped[0].name)
    assert len(intact) == 40 and all(intact)


@needs_jax
def test_update_priorities_takes_jax_arrays(stamped):
    missing, max_priority = _in_a_spawned_process(_update_priorities_from_jax, stamped[0].name)
    assert missing == 0 and max_priority == 3.0


# -- missing frameworks ---------------------------------------------------------------------------


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_a_missing_framework_raises_with_the_install_command(framework):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules[{framework!r}] = None  # as if it were not installed
        import shmreplay
        assert {framework!r} not in [m for m in sys.modules if sys.modules[m] is not None]
        try:
            import shmreplay.{framework}
        except shmreplay.MissingDependencyError as exc:
            assert isinstance(exc, ImportError)
            print(exc)
        else:
            raise SystemExit("no error")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert f"pip install 'shmreplay[{framework}]'" in out.stdout


def test_importing_shmreplay_imports_no_framework():
    script = "import sys, shmreplay; print('torch' in sys.modules, 'jax' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split() == ["False", "False"], out.stderr
