"""Fault injection under load, for as long as you like, with invariants checked throughout.

    python -m bench.chaos --seconds 600      # the long run (documented in the README)
    python -m bench.chaos --seconds 20       # a short one

A daemon serves a prioritized table (2 actors writing through insert, insert_batch and reserve;
2 learners sampling, verifying every row's checksum and updating priorities) and a queue table
(one producer of numbered items, one consumer). Every 0.3–1.2 s one fault is injected:
SIGKILL of an actor or a learner (wherever it is: inside the table lock, mid-write, mid-copy),
SIGSTOP of a learner for longer than the others' sample timeout and then SIGCONT, a reset of
the prioritized table racing the samplers, SIGSTOP of the queue consumer, or SIGKILL of the
daemon followed by a restart that adopts its tables. Killed clients are replaced; clients of a
killed daemon re-attach.

Checked continuously: every sampled row matches its checksum; no queue item is delivered twice;
size = inserts − deletes in every table's counters; no call waits longer than its timeout (plus
the length of a stop); and at the end nothing is left in /dev/shm. Prints one JSON line: the
faults injected and survived, the work done, and the violations (all zero in a good run).
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

import numpy as np

import shmreplay
from shmreplay.instance import shm_objects
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
QUEUE_UID = 7_000_000_000


def tables_toml() -> str:
    return (
        table_toml(
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


def _producer(instance: str, report) -> None:
    client = _attach(instance)
    uid = QUEUE_UID
    while True:
        try:
            client.table("q").insert(stamped_row(uid), timeout=TIMEOUT_S)
            uid += 1
            report.put(("produced", uid - QUEUE_UID))
        except shmreplay.RateLimiterTimeout:
            pass
        except shmreplay.DaemonNotRunning:
            client = _attach(instance)


def _consumer(instance: str, report) -> None:
    client = _attach(instance)
    while True:
        try:
            s = client.table("q").sample(1, timeout=TIMEOUT_S)
            report.put(("consumed", int(s.data["uid"][0]), bool(verify_stamped(s.data).all())))
        except (shmreplay.RateLimiterTimeout, shmreplay.LockTimeout):
            pass
        except shmreplay.DaemonNotRunning:
            client = _attach(instance)


def run(seconds: float, seed: int = 1) -> dict:
    rnd = random.Random(seed)
    report = CTX.Queue()
    faults: dict[str, int] = {}
    violations: dict[str, int] = {"torn_rows": 0, "queue_duplicates": 0, "counters": 0}
    learners: dict[int, tuple] = {}
    consumed: set[int] = set()
    produced = 0
    batches_before = 0
    procs: dict[str, mp.Process] = {}
    serial = iter(range(1, 10_000))

    def start(role: str) -> None:
        target, args = {
            "actor0": (_actor, (next(serial),)),
            "actor1": (_actor, (next(serial),)),
            "learner0": (_learner, (report,)),
            "learner1": (_learner, (report,)),
            "producer": (_producer, (report,)),
            "consumer": (_consumer, (report,)),
        }[role]
        p = CTX.Process(target=target, args=(d.name, *args), daemon=True)
        p.start()
        procs[role] = p

    def drain() -> None:
        nonlocal produced
        while True:
            try:
                msg = report.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "learner":
                learners[msg[1]] = msg[2:]
            elif msg[0] == "produced":
                produced = max(produced, msg[1])
            else:
                uid, ok = msg[1], msg[2]
                violations["queue_duplicates"] += uid in consumed
                violations["torn_rows"] += not ok
                consumed.add(uid)

    def fault(kind: str) -> None:
        faults[kind] = faults.get(kind, 0) + 1

    d = DaemonProcess(tables_toml())
    overdue = 0
    try:
        for role in ("actor0", "actor1", "learner0", "learner1", "producer", "consumer"):
            start(role)
        monitor = _attach(d.name)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(rnd.uniform(0.3, 1.2))
            drain()
            choice = rnd.choice(
                [
                    "kill_actor",
                    "kill_learner",
                    "stop_learner",
                    "reset",
                    "stop_consumer",
                    "kill_daemon",
                ]
            )
            if choice in ("kill_actor", "kill_learner"):
                role = rnd.choice(
                    ["actor0", "actor1"] if choice == "kill_actor" else ["learner0", "learner1"]
                )
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
                os.kill(d.proc.pid, signal.SIGKILL)
                d.proc.wait()
                d2 = DaemonProcess(tables_toml(), name=d.name)  # adopts the tables
                d._log.close()
                d = d2
                monitor.close()
                monitor = _attach(d.name)
            fault(choice)
            try:
                for name in ("replay", "q"):
                    info = monitor.table(name).info()
                    lim = info.rate_limiter
                    violations["counters"] += info.current_size != lim.inserts - lim.deletes
            except shmreplay.DaemonNotRunning:
                monitor = _attach(d.name)
        drain()
        batches_before = sum(v[0] for v in learners.values())
        overdue = sum(v[3] > TIMEOUT_S + STOP_S + 1.0 for v in learners.values())
        monitor.close()
    finally:
        for p in procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.join()
        d.close()
    violations["torn_rows"] += sum(v[1] for v in learners.values())
    violations["overdue_calls"] = overdue
    violations["leftovers_in_dev_shm"] = len(shm_objects(d.name))
    return {
        "benchmark": "chaos",
        "seconds": seconds,
        "faults_injected_and_survived": faults,
        "learner_batches": batches_before,
        "lock_timeouts_seen": sum(v[2] for v in learners.values()),
        "queue_items_produced": produced,
        "queue_items_consumed": len(consumed),
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
