"""Fault injection under load, for as long as you like, with invariants checked throughout.

    python -m bench.chaos --seconds 600      # the long run (documented in the README)
    python -m bench.chaos --seconds 60 --seed 2

A daemon serves a prioritized table (2 actors writing through insert, insert_batch and reserve;
2 learners sampling, verifying every row's checksum and updating priorities) and a queue table
(one producer of numbered items, one consumer), and writes a checkpoint every second. Every
0.3–1.2 s one fault is injected: SIGKILL of an actor, a learner or the queue producer (wherever
it is: inside the table lock, mid-write, mid-copy), SIGSTOP of a learner for longer than the
others' sample timeout and then SIGCONT, a reset of the prioritized table racing the samplers,
SIGSTOP of the queue consumer, SIGKILL of the daemon followed by a restart that adopts its
tables from /dev/shm, or SIGKILL of the daemon with its segments removed, followed by a restart
that restores the latest checkpoint. Killed clients are replaced; clients of a killed daemon
re-attach.

Checked continuously: every sampled row matches its checksum; size = inserts − deletes in every
table's counters; no call waits longer than its timeout (plus the length of a stop). At every
restore from a checkpoint: every row of the checkpoint verifies, and the daemon restored exactly
the checkpoint's items. At the end: every queue item was delivered exactly once, with the
exceptions accounted for by :func:`account_queue`, and nothing is left in /dev/shm nor in the
runtime directory (socket, instance record). Prints one
JSON line: the faults injected and survived, the work done, the queue accounting and the
violations (all zero in a good run).

Queue accounting. The producer announces each range of uids, tagged with the pid of the daemon
its client is attached to, before inserting any of them, and reports a range as committed once
``flush()`` returned for it. The consumer tags every item it receives with its daemon's pid. A
daemon's life is an epoch; an epoch started by a restore has the set of uids the restored
checkpoint holds. Per uid:

- committed items must be delivered exactly once, except that
- a restore loses the items not in its checkpoint (``lost_to_restore``: committed after the
  checkpoint was taken, which the harness checks: their uids are above every uid in the
  checkpoint, as the queue is FIFO with one producer) and re-delivers the items in the
  checkpoint that were already consumed (``redelivered_after_restore``);
- items never confirmed committed (their producer or its daemon was killed between insert and
  flush) are delivered at most once per life, possibly never (``unconfirmed_lost``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import random
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

import shmreplay
from shmreplay.daemon.checkpoint import latest_checkpoint, read_checkpoint
from shmreplay.engine.instance import record_path, remove_shm_objects, shm_objects, socket_path
from shmreplay.testing import (
    STAMPED_SIGNATURE,
    DaemonProcess,
    stamped_batch,
    stamped_row,
    table_toml,
    verify_stamped,
)

CTX = mp.get_context("spawn")
TIMEOUT_S = 2.0  # every blocking call of the workers
STOP_S = 3.0  # a stopped process stays stopped this long (longer than TIMEOUT_S)
CHECKPOINT_INTERVAL_S = 1.0  # often enough that a restore loses about a second of the queue
QUEUE_UID = 7_000_000_000
PRODUCER_SPAN = 10_000_000  # uids per producer incarnation: later incarnations have higher uids
RANGE = 64  # uids a producer announces at a time, before inserting the first of them
FLUSH_EVERY = 8  # a producer confirms its inserts with flush() this often
# The consumer is slower than the producer, so the queue is mostly full: a checkpoint holds
# items, and a restore has items to lose and to deliver again.
CONSUMER_PAUSE_S = 0.02
DRAIN_S = 15.0  # at the end, the consumer gets this long to empty the queue
FAULTS = (
    "kill_actor",
    "kill_learner",
    "kill_producer",
    "stop_learner",
    "reset",
    "stop_consumer",
    "kill_daemon",
    "kill_daemon_restore",
)


def tables_toml(checkpoint_dir: str) -> str:
    return (
        f'[server]\ncheckpoint_dir = "{checkpoint_dir}"\n'
        f"checkpoint_interval_s = {CHECKPOINT_INTERVAL_S}\ncheckpoint_keep = 2\n"
        + table_toml(
            "replay",
            max_size=5000,
            sampler='{ kind = "prioritized", priority_exponent = 0.6 }',
            signature=STAMPED_SIGNATURE,
        )
        + f'[[table]]\nname = "q"\nkind = "queue"\nmax_size = 100\n{STAMPED_SIGNATURE}'
    )


def _attach(instance: str) -> shmreplay.Client:
    while True:
        try:
            return shmreplay.attach(instance, timeout=30)
        except shmreplay.DaemonNotRunning:
            time.sleep(0.1)


def _actor(instance: str, actor_id: int) -> None:
    uid = actor_id * 1_000_000_000
    client = _attach(instance)
    while True:
        try:
            t = client.table("replay")
            t.insert(stamped_row(uid), timeout=TIMEOUT_S)
            t.insert_batch(stamped_batch(np.arange(uid + 1, uid + 9)), timeout=TIMEOUT_S)
            with t.reserve(timeout=TIMEOUT_S) as slot:
                for name, value in stamped_row(uid + 9).items():
                    slot[name][...] = value
            uid += 10
        except shmreplay.RateLimiterTimeout:
            pass
        except shmreplay.DaemonNotRunning:  # killed and restarted: attach to the new one
            client = _attach(instance)


def _learner(instance: str, report) -> None:
    client = _attach(instance)
    rng = np.random.default_rng()
    batches = bad = lock_timeouts = 0
    slowest = 0.0
    while True:
        t0 = time.monotonic()
        try:
            t = client.table("replay")
            s = t.sample(64, timeout=TIMEOUT_S)
            bad += int((~verify_stamped(s.data)).sum())
            t.update_priorities(s.info.key, rng.random(len(s.info.key)) + 0.1)
            batches += 1
        except shmreplay.LockTimeout:
            lock_timeouts += 1  # another learner is stopped holding the lock: as documented
        except shmreplay.RateLimiterTimeout:
            pass
        except shmreplay.DaemonNotRunning:
            client = _attach(instance)
            continue
        slowest = max(slowest, time.monotonic() - t0)
        report.put(("learner", os.getpid(), batches, bad, lock_timeouts, slowest))


def _producer(instance: str, serial: int, out, stop) -> None:
    """Insert numbered items into the queue until ``stop`` (or SIGKILL). Reports on ``out``, a
    SimpleQueue of its own (a put is one atomic pipe write, so a kill loses no half message):
    ``("range", lo, hi, daemon_pid)`` before inserting any uid of [lo, hi), so every uid is
    inserted, if at all, during that daemon's life; ``("committed", lo, hi)`` once flush()
    returned for [lo, hi)."""
    client = _attach(instance)
    uid = hi = confirmed = QUEUE_UID + serial * PRODUCER_SPAN
    while not stop.is_set():
        try:
            t = client.table("q")
            if uid == hi:
                hi = uid + RANGE
                out.put(("range", uid, hi, client.daemon_pid))
            t.insert(stamped_row(uid), timeout=TIMEOUT_S)
            uid += 1
            if uid - confirmed >= FLUSH_EVERY or uid == hi:
                t.flush(timeout=TIMEOUT_S)
                out.put(("committed", confirmed, uid))
                confirmed = uid
        except shmreplay.RateLimiterTimeout:
            pass  # nothing was inserted (insert), or try the flush again
        except shmreplay.DaemonNotRunning:
            # The uid being inserted may or may not have been published; what was not flushed
            # stays unconfirmed. The rest of the range is dropped: the next uids belong to the
            # next daemon's life.
            uid = confirmed = hi
            client = _attach(instance)
    try:
        client.table("q").flush(timeout=TIMEOUT_S)
        out.put(("committed", confirmed, uid))
    except shmreplay.ShmReplayError:
        pass
    client.close(timeout=1)


def _consumer(instance: str, out, stop, hurry) -> None:
    """Take queue items one by one until ``stop`` (pausing after each until ``hurry``);
    reports ``("consumed", [(uid, row ok, daemon_pid), ...])`` on ``out`` (its own
    SimpleQueue) in the order received."""
    client = _attach(instance)
    got: list[tuple[int, bool, int]] = []
    last = time.monotonic()
    while not stop.is_set():
        try:
            s = client.table("q").sample(1, timeout=0.5)
            got.append(
                (int(s.data["uid"][0]), bool(verify_stamped(s.data).all()), client.daemon_pid)
            )
            if not hurry.is_set():
                time.sleep(CONSUMER_PAUSE_S)
        except (shmreplay.RateLimiterTimeout, shmreplay.LockTimeout):
            pass
        except shmreplay.DaemonNotRunning:
            client = _attach(instance)
        if got and (len(got) >= 64 or time.monotonic() - last > 0.05):
            out.put(("consumed", got))
            got, last = [], time.monotonic()
    if got:
        out.put(("consumed", got))
    client.close(timeout=1)


# -- queue accounting -------------------------------------------------------------------------


@dataclass
class Epoch:
    """One daemon's life: its pid, and the uids of the queue its restore brought back (None when
    it started empty or adopted its predecessor's tables)."""

    pid: int
    restored: frozenset[int] | None = None
    checkpoint: str | None = None


@dataclass
class QueueLog:
    """What the producers and the consumer reported."""

    ranges: list[tuple[int, int, int]] = field(default_factory=list)  # lo, hi, daemon pid
    committed: list[tuple[int, int]] = field(default_factory=list)  # lo, hi (flush returned)
    consumed: list[tuple[int, bool, int]] = field(default_factory=list)  # uid, ok, daemon pid

    def take(self, msg: tuple) -> None:
        if msg[0] == "range":
            self.ranges.append(msg[1:])
        elif msg[0] == "committed":
            self.committed.append(msg[1:])
        else:
            self.consumed.extend(msg[1])


IN, MAYBE, GONE = "in", "maybe", "gone"


def account_queue(log: QueueLog, epochs: list[Epoch]) -> dict[str, int]:
    """Check that every committed queue item was delivered exactly once, with the exceptions
    the module docstring lists; returns the counts. Violations: ``queue_duplicates`` (delivered
    more often than its lives allow), ``queue_lost`` (committed and never delivered, or lost
    to a restore although older than an item the checkpoint kept), ``queue_foreign`` (a uid no
    producer announced, or one announced during a daemon's life nobody knows)."""
    index = {e.pid: i for i, e in enumerate(epochs)}
    attempt: dict[int, int] = {}  # uid -> epoch of its range
    foreign = 0
    for lo, hi, pid in log.ranges:
        if pid not in index:
            foreign += hi - lo
            continue
        for u in range(lo, hi):
            attempt[u] = index[pid]
    committed_in: dict[int, int] = {}
    for lo, hi in log.committed:
        for u in range(lo, hi):
            if u in attempt:
                committed_in[u] = attempt[u]
    deliveries: dict[int, list[int]] = {}
    for uid, _ok, pid in log.consumed:
        if uid not in attempt or pid not in index:
            foreign += 1
            continue
        deliveries.setdefault(uid, []).append(index[pid])
    top = [max(e.restored) if e.restored else None for e in epochs]
    counts = dict.fromkeys(
        (
            "delivered",
            "redelivered_after_restore",
            "lost_to_restore",
            "unconfirmed_lost",
            "queue_duplicates",
            "queue_lost",
        ),
        0,
    )
    for u in sorted(set(attempt) & (set(committed_in) | set(deliveries))):
        state = MAYBE
        got = deliveries.get(u, [])
        k = 0
        for e in range(attempt[u], len(epochs)):
            restored = epochs[e].restored
            if e > attempt[u] and restored is not None:
                if u in restored:
                    counts["redelivered_after_restore"] += state == GONE
                    state = IN
                else:
                    if state == IN:
                        counts["lost_to_restore"] += 1
                        if top[e] is not None and u < top[e]:
                            counts["queue_lost"] += 1  # a hole in the checkpoint
                    state = GONE
            if committed_in.get(u) == e and state == MAYBE:
                state = IN
            while k < len(got) and got[k] == e:
                k += 1
                counts["delivered"] += 1
                if state == GONE:
                    counts["queue_duplicates"] += 1
                state = GONE
        foreign += len(got) - k  # delivered in a life before the one it was inserted in
        if state == IN:
            counts["queue_lost"] += 1
        elif state == MAYBE and not got:
            counts["unconfirmed_lost"] += 1
    counts["queue_foreign"] = foreign
    return counts


# -- the run ------------------------------------------------------------------------------------


def run(seconds: float, seed: int = 1, schedule: Sequence[str] | None = None) -> dict:
    """Inject random faults for ``seconds`` (or exactly the faults of ``schedule``, in that
    order: a short run that must cover given faults), then check everything; returns the
    report (see the module docstring). Cleans up every process, segment and checkpoint."""
    if schedule is not None and not set(schedule) <= set(FAULTS):
        raise ValueError(f"unknown faults {set(schedule) - set(FAULTS)}; known: {FAULTS}")
    with tempfile.TemporaryDirectory(prefix="shmreplay-chaos-ckpt-") as ckpt:
        return _run(seconds, seed, schedule, ckpt)


def _run(seconds: float, seed: int, schedule: Sequence[str] | None, ckpt: str) -> dict:
    rnd = random.Random(seed)
    report = CTX.Queue()
    stop_producer, stop_consumer = CTX.Event(), CTX.Event()
    faults: dict[str, int] = {}
    violations: dict[str, int] = {"torn_rows": 0, "counters": 0, "restores": 0}
    learners: dict[int, tuple] = {}
    qlog = QueueLog()
    pipes: list = []  # the producers' and the consumer's SimpleQueues, read by drain()
    procs: dict[str, mp.Process] = {}
    serial = iter(range(1, 10_000))
    epochs: list[Epoch] = []
    restores: list[dict] = []  # what each restore from a checkpoint brought back
    toml = tables_toml(ckpt)

    def start(role: str) -> None:
        if role == "producer" or role == "consumer":
            pipes.append(CTX.SimpleQueue())
            target = _producer if role == "producer" else _consumer
            if role == "producer":
                args = (next(serial), pipes[-1], stop_producer)
            else:
                args = (pipes[-1], stop_consumer, stop_producer)
        elif role.startswith("actor"):
            target, args = _actor, (next(serial),)
        else:
            target, args = _learner, (report,)
        p = CTX.Process(target=target, args=(d.name, *args), daemon=True)
        p.start()
        procs[role] = p

    def drain() -> None:
        while True:
            try:
                msg = report.get_nowait()
            except queue.Empty:
                break
            learners[msg[1]] = msg[2:]
        for pipe in pipes:
            while not pipe.empty():
                qlog.take(pipe.get())

    def restart(restore: bool) -> None:
        """SIGKILL the daemon and start another: it adopts the tables, or (restore) finds
        none in /dev/shm and restores the latest checkpoint, which is checked here."""
        nonlocal d
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        path = rows = None
        if restore:
            remove_shm_objects(d.name)  # nothing to adopt: the checkpoint is all there is
            path = latest_checkpoint(ckpt)  # what the next daemon will restore
            if path is not None:
                ck = read_checkpoint(path)
                rows = {n: t.items for n, t in ck.tables.items()}
                for t in ck.tables.values():
                    data = {f.name: np.asarray(t.array(f"data.{f.name}")) for f in t.spec.signature}
                    violations["torn_rows"] += int((~verify_stamped(data)).sum())
                uids = np.asarray(ck.tables["q"].array("data.uid"))
                restored = frozenset(uids.tolist())
                # One producer, FIFO: the queue at an instant is a run of increasing uids.
                violations["restores"] += bool((np.diff(uids) <= 0).any())
            else:
                restored = frozenset()
        d2 = DaemonProcess(toml, name=d.name)
        d.close()  # the killed one: its log and files; the objects are the new one's now
        d = d2
        log = d.log()
        if restore:
            restores.append(
                {"checkpoint": None if path is None else path.name, "items": rows or {}}
            )
            for name, n in (rows or {}).items():
                if f"table {name!r}: restored {n} items from {path}" not in log:
                    violations["restores"] += 1
            epochs.append(Epoch(d.proc.pid, restored, None if path is None else str(path)))
        else:
            violations["restores"] += "adopted the segment" not in log
            epochs.append(Epoch(d.proc.pid))

    def check_counters() -> None:
        nonlocal monitor
        try:
            for name in ("replay", "q"):
                info = monitor.table(name).info()
                lim = info.rate_limiter
                violations["counters"] += info.current_size != lim.inserts - lim.deletes
        except shmreplay.DaemonNotRunning:
            monitor = _attach(d.name)

    t_start = time.monotonic()
    d = DaemonProcess(toml)
    warmup = 0.0
    t_faults = 0.0
    epochs.append(Epoch(d.proc.pid))
    overdue = 0
    batches_before = 0
    monitor = None
    try:
        for role in ("actor0", "actor1", "learner0", "learner1", "producer", "consumer"):
            start(role)
        monitor = _attach(d.name)
        # Faults start once every worker is at work (spawning them takes seconds on a busy
        # machine): both tables hold items and both learners have sampled.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            drain()
            sizes = [monitor.table(n).info().current_size for n in ("replay", "q")]
            if min(sizes) > 0 and len(learners) >= 2 and qlog.consumed:
                break
            time.sleep(0.1)
        warmup = time.monotonic() - t_start
        t_faults = time.monotonic()
        end = t_faults + seconds
        todo = None if schedule is None else list(schedule)
        while todo if todo is not None else time.monotonic() < end:
            time.sleep(rnd.uniform(0.3, 1.2))
            drain()
            choice = rnd.choice(FAULTS) if todo is None else todo.pop(0)
            if choice in ("kill_actor", "kill_learner", "kill_producer"):
                role = {
                    "kill_actor": rnd.choice(["actor0", "actor1"]),
                    "kill_learner": rnd.choice(["learner0", "learner1"]),
                    "kill_producer": "producer",
                }[choice]
                os.kill(procs[role].pid, signal.SIGKILL)
                procs[role].join()
                start(role)
            elif choice in ("stop_learner", "stop_consumer"):
                role = (
                    "consumer"
                    if choice == "stop_consumer"
                    else rnd.choice(["learner0", "learner1"])
                )
                os.kill(procs[role].pid, signal.SIGSTOP)
                time.sleep(STOP_S)
                os.kill(procs[role].pid, signal.SIGCONT)
            elif choice == "reset":
                try:
                    monitor.table("replay").reset()
                except shmreplay.DaemonNotRunning:
                    monitor = _attach(d.name)
                    continue
            else:
                restart(restore=choice == "kill_daemon_restore")
                monitor.close()
                monitor = _attach(d.name)
                try:  # the restored (or adopted) rows, as any sampler sees them
                    s = monitor.table("replay").sample(256, timeout=10)
                    violations["torn_rows"] += int((~verify_stamped(s.data)).sum())
                except shmreplay.RateLimiterTimeout:
                    pass  # restored empty and the actors are still attaching
            faults[choice] = faults.get(choice, 0) + 1
            check_counters()
        drain()
        batches_before = sum(v[0] for v in learners.values())
        overdue = sum(v[3] > TIMEOUT_S + STOP_S + 1.0 for v in learners.values())
        t_faults = time.monotonic() - t_faults
        # The end: the producer stops after a last flush, the consumer empties the queue.
        stop_producer.set()
        procs["producer"].join(TIMEOUT_S * 3)
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            time.sleep(0.2)
            drain()
            if monitor.table("q").info().current_size == 0:
                break
        else:
            print("queue not drained:", monitor.table("q").info(), flush=True)
        check_counters()
        stop_consumer.set()
        procs["consumer"].join(5)
        drain()
        monitor.close()
    finally:
        stop_producer.set()
        stop_consumer.set()
        for p in procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.join()
        d.close()
    violations["torn_rows"] += sum(v[1] for v in learners.values())
    violations["torn_rows"] += sum(not ok for _, ok, _ in qlog.consumed)
    violations["overdue_calls"] = overdue
    counts = account_queue(qlog, epochs)
    for k in ("queue_duplicates", "queue_lost", "queue_foreign"):
        violations[k] = counts.pop(k)
    violations["leftovers_in_dev_shm"] = len(shm_objects(d.name))
    violations["leftover_socket_or_record"] = sum(
        p.exists() for p in (socket_path(d.name), record_path(d.name))
    )
    return {
        "benchmark": "chaos",
        "seconds": round(t_faults, 1),
        "seed": seed,
        "warmup_s": round(warmup, 1),
        "total_s": round(time.monotonic() - t_start, 1),
        "faults_injected_and_survived": faults,
        "learner_batches": batches_before,
        "lock_timeouts_seen": sum(v[2] for v in learners.values()),
        "restores": restores,
        "queue": {
            "announced": sum(hi - lo for lo, hi, _ in qlog.ranges),
            "committed": sum(hi - lo for lo, hi in qlog.committed),
            **counts,
        },
        "violations": violations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shmreplay-chaos-") as rt:
        os.environ.setdefault("SHMREPLAY_RUNTIME_DIR", rt)
        print(json.dumps(run(args.seconds, args.seed)), flush=True)


if __name__ == "__main__":
    main()
