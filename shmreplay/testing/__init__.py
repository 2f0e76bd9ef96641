"""Helpers for tests and benchmarks: start a daemon in a subprocess, stamp and verify rows.

:class:`DaemonProcess` runs ``python -m shmreplay serve`` on a tables.toml text and stops it
with SIGTERM (then SIGKILL), removing whatever the instance left in /dev/shm, so a failing test
still leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import pwd
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..daemon.server import Server, ServerStartError
from ..engine.instance import shm_objects

if TYPE_CHECKING:
    from ..config import TableSpec
    from ..engine.table import TableCore

_counter = itertools.count()

W1_SIGNATURE = """
[table.signature]
obs = { shape = [8], dtype = "float32" }
action = { dtype = "int64" }
reward = { dtype = "float32" }
done = { dtype = "bool" }
"""


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}{os.getpid()}-{next(_counter)}"


class DaemonProcess(Server):
    """A :class:`~shmreplay.Server` for tests and benchmarks, on a tables.toml text, under a
    name the tests' leak check recognises, with a log that outlives the daemon.

    ``stop()`` only ends the daemon (:meth:`Server.terminate`), so that a test sees what a
    shutdown left behind; ``close()`` removes that too. A daemon that fails to start raises
    RuntimeError with its log's end.
    """

    def __init__(
        self,
        tables_toml: str,
        name: str | None = None,
        wait: bool = True,
        args: tuple[str, ...] = (),
    ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="shmreplay-test-")
        self.path = os.path.join(self._dir.name, "tables.toml")
        with open(self.path, "w") as f:
            f.write(tables_toml)
        self.log_path = os.path.join(self._dir.name, "daemon.log")
        try:
            super().__init__(
                self.path,
                name or unique_name(),
                log=self.log_path,
                extra_args=args,
                ready_timeout=30.0 if wait else None,
            )
        except ServerStartError as exc:
            self._dir.cleanup()
            raise RuntimeError(str(exc)) from exc

    stop = Server.terminate

    def close(self, timeout: float = 15.0) -> int | None:
        code = super().close(timeout)
        with contextlib.suppress(OSError):
            self._dir.cleanup()
        return code

    def leftovers(self) -> list[str]:
        return shm_objects(self.name)


def table_toml(
    name: str = "replay",
    max_size: int = 1000,
    sampler: str = '{ kind = "uniform" }',
    remover: str = '{ kind = "fifo" }',
    rate_limiter: str = '{ kind = "min_size", min_size = 1 }',
    signature: str = W1_SIGNATURE,
    extra: str = "",
) -> str:
    """One ``[[table]]`` block of a tables.toml (W1's signature by default)."""
    return (
        f'[[table]]\nname = "{name}"\nmax_size = {max_size}\nsampler = {sampler}\n'
        f"remover = {remover}\nrate_limiter = {rate_limiter}\n{extra}\n{signature}\n"
    )


# -- stamped rows: data derived from a uid, with a checksum, so a reader can verify a row ------

STAMPED_SIGNATURE = """
[table.signature]
uid = { dtype = "int64" }
obs = { shape = [16], dtype = "float32" }
check = { dtype = "uint32" }
"""


def stamped_row(uid: int) -> dict[str, np.ndarray]:
    obs = (np.arange(16, dtype=np.float32) + np.float32(uid % 100_003)) * np.float32(0.5)
    check = np.uint32((zlib.crc32(obs.tobytes()) ^ uid) & 0xFFFFFFFF)  # as astype(uint32) wraps
    return {"uid": np.int64(uid), "obs": obs, "check": check}


def stamped_batch(uids: np.ndarray) -> dict[str, np.ndarray]:
    uids = np.asarray(uids, dtype=np.int64)
    obs = np.arange(16, dtype=np.float32)[None, :] + (uids % 100_003).astype(np.float32)[:, None]
    obs = obs * np.float32(0.5)
    check = np.array(
        [zlib.crc32(row.tobytes()) ^ int(u) for row, u in zip(obs, uids, strict=True)],
        dtype=np.uint64,
    ).astype(np.uint32)
    return {"uid": uids, "obs": obs, "check": check}


def verify_stamped(data: dict[str, np.ndarray]) -> np.ndarray:
    """Mask of rows whose fields agree with their uid (a torn or foreign row fails)."""
    expected = stamped_batch(data["uid"])
    return (data["obs"] == expected["obs"]).all(axis=1) & (data["check"] == expected["check"])


# -- worker processes for multi-process tests (module level, so ``spawn`` can import them) ------


def stamped_actor(instance: str, table: str, actor_id: int, count: int, results) -> None:
    """Insert ``count`` stamped rows, cycling through insert, insert_batch and reserve.

    Puts ``(actor_id, keys, uids)`` on ``results`` when done.
    """
    import shmreplay

    client = shmreplay.attach(instance, timeout=10)
    t = client.table(table)
    base = actor_id * 1_000_000_000
    keys, uids = [], []
    i = 0
    while i < count:
        mode = (i // 32) % 3
        if mode == 0:
            uid = base + i
            keys.append(t.insert(stamped_row(uid), priority=1.0, timeout=30))
            uids.append(uid)
            i += 1
        elif mode == 1:
            n = min(32, count - i)
            batch_uids = np.arange(base + i, base + i + n)
            keys.extend(t.insert_batch(stamped_batch(batch_uids), timeout=30).tolist())
            uids.extend(batch_uids.tolist())
            i += n
        else:
            uid = base + i
            row = stamped_row(uid)
            with t.reserve(priority=1.0, timeout=30) as slot:
                for name, value in row.items():
                    slot[name][...] = value
            keys.append(slot.key)
            uids.append(uid)
            i += 1
    client.close()
    results.put((actor_id, keys, uids))


def stamped_learner(instance: str, table: str, batch_size: int, stop, results) -> None:
    """Sample until ``stop`` is set, verifying every row; puts (batches, bad rows, key→uid)."""
    import shmreplay

    client = shmreplay.attach(instance, timeout=10)
    t = client.table(table)
    seen: dict[int, int] = {}
    batches = bad = 0
    while not stop.is_set():
        try:
            s = t.sample(batch_size, timeout=0.5)
        except shmreplay.RateLimiterTimeout:
            continue
        ok = verify_stamped(s.data)
        bad += int((~ok).sum())
        seen.update(zip(s.info.key.tolist(), s.data["uid"].tolist(), strict=True))
        batches += 1
    client.close()
    results.put((batches, bad, seen))


def blocked_sampler(instance: str, table: str, batch_size: int, timeout, started, results) -> None:
    """Sample once (expected to block); put ('ok', uids, seconds) or ('error', class, message)."""

    import shmreplay

    client = shmreplay.attach(instance, timeout=10)
    t = client.table(table)
    started.set()
    t0 = time.monotonic()
    try:
        s = t.sample(batch_size, timeout=timeout)
        results.put(("ok", s.data["uid"].tolist(), time.monotonic()))
    except shmreplay.ShmReplayError as exc:
        results.put(("error", type(exc).__name__, str(exc), time.monotonic() - t0))
    finally:
        client.close(timeout=1)


def lock_holder(instance: str, table: str, ready) -> None:
    """Take the table mutex and sleep holding it (to be killed with SIGKILL)."""

    import shmreplay

    client = shmreplay.attach(instance, timeout=10)
    client.table(table).core.mutex.acquire()
    ready.set()
    time.sleep(600)


def half_writer(instance: str, table: str, uid: int, ready) -> None:
    """Reserve a slot, write half of a stamped row into it and sleep (to be killed)."""

    import shmreplay

    client = shmreplay.attach(instance, timeout=10)
    t = client.table(table)
    row = stamped_row(uid)
    with t.reserve() as slot:
        slot["uid"][...] = row["uid"]
        slot["obs"][:8] = row["obs"][:8]
        ready.set()
        time.sleep(600)


# -- rate-limited tables: free-running producers and consumers ---------------------------------


def limited_producer(instance: str, table: str, producer: int, count: int, stop, results) -> None:
    """Insert stamped rows uid = producer·10⁹ + i one at a time (blocking as the limiter says),
    until ``count`` are in or ``stop`` is set; puts (producer, inserted)."""
    import shmreplay

    client = shmreplay.attach(instance, timeout=10)
    t = client.table(table)
    base = producer * 1_000_000_000
    i = 0
    while i < count and not stop.is_set():
        try:
            t.insert(stamped_row(base + i), timeout=0.2)
        except shmreplay.RateLimiterTimeout:
            continue
        i += 1
    client.close()
    results.put((producer, i))


def limited_consumer(instance: str, table: str, batch_size: int, stop, results) -> None:
    """Sample until ``stop`` is set, verifying rows; puts (uids in the order received, bad)."""
    import shmreplay

    client = shmreplay.attach(instance, timeout=10)
    t = client.table(table)
    uids: list[int] = []
    bad = 0
    while not stop.is_set():
        try:
            s = t.sample(batch_size, timeout=0.1)
        except shmreplay.RateLimiterTimeout:
            continue
        bad += int((~verify_stamped(s.data)).sum())
        uids.extend(s.data["uid"].tolist())
    client.close()
    results.put((uids, bad))


# -- chaos: processes that run until killed -------------------------------------------------------


def endless_actor(instance: str, table: str, actor_id: int, started) -> None:
    """Insert stamped rows (all three write paths) until killed."""
    import shmreplay

    client = shmreplay.attach(instance, timeout=10)
    t = client.table(table)
    started.set()
    uid = actor_id * 1_000_000_000
    while True:
        t.insert(stamped_row(uid), timeout=30)
        t.insert_batch(stamped_batch(np.arange(uid + 1, uid + 9)), timeout=30)
        with t.reserve(timeout=30) as slot:
            for name, value in stamped_row(uid + 9).items():
                slot[name][...] = value
        uid += 10


def endless_learner(instance: str, table: str, results) -> None:
    """Sample, verify and update priorities until killed; puts (batches, bad rows) every batch."""
    import shmreplay

    client = shmreplay.attach(instance, timeout=10)
    t = client.table(table)
    batches = bad = 0
    rng = np.random.default_rng()
    while True:
        try:
            s = t.sample(64, timeout=5)
        except shmreplay.RateLimiterTimeout:
            continue
        bad += int((~verify_stamped(s.data)).sum())
        t.update_priorities(s.info.key, rng.random(len(s.info.key)) + 0.1)
        batches += 1
        results.put((batches, bad))


@contextlib.contextmanager
def local_table(spec: TableSpec, prefix: str = "t") -> Iterator[TableCore]:
    """A freshly initialized table in shared memory without a daemon (a restore target, a
    selector's playground); unlinked afterwards. Its name carries ``unique_name(prefix)``, so
    the tests' leak check sees it if it is left behind."""
    from ..engine.instance import segment_name
    from ..engine.layout import compute_layout
    from ..engine.shm import Segment
    from ..engine.table import TableCore

    name = segment_name(unique_name(prefix), spec.name)
    seg = Segment.create(name, compute_layout(spec, max_clients=2))
    try:
        core = TableCore(seg)
        core.initialize(os.getpid())
        yield core
    finally:
        Segment.unlink(name)
        seg.close()


def _as_user_child(fn: Callable[[], object], user: str | int, out) -> None:
    """In a forked child: become ``user`` (its uid, primary group and supplementary groups),
    run ``fn`` and send back ("ok", value) or ("error", class names, message).

    The child cannot import what the parent has not: the interpreter's files may be closed to
    other users (a Python under /root), so the parent has run the same code paths first."""
    try:
        pw = pwd.getpwnam(user) if isinstance(user, str) else pwd.getpwuid(user)
        os.setgroups([])
        os.initgroups(pw.pw_name, pw.pw_gid)
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        out.put(("ok", fn()))
    except BaseException as exc:  # noqa: BLE001 (reported to the parent, which asserts)
        out.put(("error", [c.__name__ for c in type(exc).__mro__], str(exc)))


def as_user(user: str | int, fn: Callable[[], object]) -> tuple:
    """Run ``fn`` in a forked child as ``user`` (name or uid; root only): ("ok", value) or
    ("error", the exception's class names (its MRO), message). Waits at most 30 s."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_as_user_child, args=(fn, user, out))
    p.start()
    try:
        return out.get(timeout=30)
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()


def chi_square(observed: np.ndarray, expected_p: np.ndarray) -> float:
    """Pearson's statistic of ``observed`` counts against probabilities ``expected_p``."""
    expected = expected_p * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())
