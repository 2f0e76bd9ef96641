"""The daemon's CPU per committed item, next to this machine's memcpy bandwidth.

    python -m bench.daemon_cpu            # the three workloads of issue 12
    python -m bench.daemon_cpu --quick    # shorter runs (a smoke test, figures are noisier)

Workloads (W1 rows, one table, uniform sampler, FIFO remover):

- ``paced``: 4 environment-bound actors, each calling insert() at 2,500 steps/s on a
  sleep-until schedule (10k items/s in all). Also the commit latency: every 50th insert the
  actor times how long until the daemon's PUB_HEAD passes it (insert returned -> committed,
  i.e. sampleable), so the trade-off between the daemon's CPU and its latency is in one line.
- ``insert``: 2 writers calling insert() flat out.
- ``insert_batch(64)``: 2 writers calling insert_batch(64) flat out.

The daemon's CPU is the on-CPU time the scheduler accounts to every thread of the daemon process
over the window (/proc/PID/task/*/schedstat, nanoseconds; psutil's cpu_times, in 10 ms clock
ticks, where the paced workload's 60-80 ms per window is not resolved: 0.25 µs per item steps),
divided by the items committed in the window (TOTAL_INSERTED read from the segment).
One JSON line per workload, after the reference lines: numpy's memcpy bandwidth, and ``nap``,
the CPU one timed wait on a POSIX semaphore costs this machine (what the daemon does between
rounds while writers are active: ACTIVE_SLEEP_S). With items trickling in, the daemon runs one
round per nap, so ``nap.us_cpu × naps per second / items per second`` is the floor of the paced
workload's figure that no commit code can go under (``paced_floor_us_per_item``).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import time

import numpy as np
import posix_ipc

import shmreplay
from shmreplay.daemon.commit_loop import ACTIVE_SLEEP_S
from shmreplay.engine.layout import Chan, Ctrl
from shmreplay.testing import DaemonProcess, table_toml

from .run import emit, emit_reference, w1_batch, w1_row

CTX = mp.get_context("spawn")
PACED_RATE = 2_500.0  # steps/s per paced actor
LATENCY_EVERY = 50


def _actor(instance: str, seconds: float, mode: str, go, results) -> None:
    client = shmreplay.attach(instance, timeout=10)
    t = client.table("replay")
    rng = np.random.default_rng()
    rows = [w1_row(rng) for _ in range(256)]
    batch = w1_batch(64, rng)
    for r in rows:  # warm up: first lease
        t.insert(r)
    t.flush()
    go.wait()
    latencies = []
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    if mode == "paced":
        period = 1.0 / PACED_RATE
        next_at = t0
        while True:
            next_at += period
            now = time.perf_counter()
            if now >= end:
                break
            if next_at > now:
                time.sleep(next_at - now)
            t.insert(rows[n % len(rows)])
            n += 1
            if n % LATENCY_EVERY == 0:
                # insert() returned: how long until the daemon has committed it.
                start = time.perf_counter()
                upto = t._w.pub_tail
                while int(t._chan[Chan.PUB_HEAD]) < upto:
                    time.sleep(50e-6)
                latencies.append(time.perf_counter() - start)
    elif mode == "insert":
        while time.perf_counter() < end:
            for r in rows:
                t.insert(r)
            n += len(rows)
    else:
        while time.perf_counter() < end:
            for _ in range(16):
                t.insert_batch(batch)
            n += 16 * 64
    t.flush()
    results.put((n, latencies))
    client.close()


def cpu_s(pid: int) -> float:
    """On-CPU seconds of every thread of ``pid`` (the scheduler's nanosecond accounting, for
    every thread alive now: the daemon's threads live as long as it does)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with (
            contextlib.suppress(FileNotFoundError, ProcessLookupError),
            open(f"/proc/{pid}/task/{task}/schedstat") as f,
        ):
            total += int(f.read().split()[0])
    return total * 1e-9


def run(mode: str, actors: int, seconds: float) -> dict:
    toml = "\n" + table_toml(max_size=1_000_000)
    with DaemonProcess(toml) as d:
        daemon = d.pid
        go, results = CTX.Event(), CTX.Queue()
        procs = [
            CTX.Process(target=_actor, args=(d.name, seconds, mode, go, results))
            for _ in range(actors)
        ]
        for p in procs:
            p.start()
        with shmreplay.attach(d.name) as client:
            ctrl = client.table("replay").core.ctrl
            # every actor attached and warmed up: its 256 rows committed
            deadline = time.monotonic() + 60
            while int(ctrl[Ctrl.TOTAL_INSERTED]) < 256 * actors:
                if time.monotonic() > deadline:
                    raise RuntimeError("actors did not start")
                time.sleep(0.01)
            time.sleep(0.2)
            c0, n0, w0 = cpu_s(daemon), int(ctrl[Ctrl.TOTAL_INSERTED]), time.perf_counter()
            go.set()
            time.sleep(seconds)
            c1, n1, w1 = cpu_s(daemon), int(ctrl[Ctrl.TOTAL_INSERTED]), time.perf_counter()
            got = [results.get(timeout=seconds + 60) for _ in procs]
        for p in procs:
            p.join(30)
    cpu = c1 - c0
    items = max(n1 - n0, 1)
    record = {
        "workload": "daemon_cpu",
        "mode": mode if mode != "paced" else f"{actors} actors insert() at {PACED_RATE:.0f}/s",
        "writers": actors,
        "items_per_s": round(items / (w1 - w0)),
        "daemon_cpu_share": round(cpu / (w1 - w0), 3),
        "daemon_us_per_item": round(1e6 * cpu / items, 3),
    }
    lat = np.concatenate([np.asarray(g[1], float) for g in got])
    if len(lat):
        record["commit_latency_ms"] = {
            "median": round(1e3 * float(np.median(lat)), 3),
            "p99": round(1e3 * float(np.percentile(lat, 99)), 3),
            "max": round(1e3 * float(lat.max()), 3),
        }
    return record


def nap_cpu_us(nap_s: float, seconds: float) -> float:
    """CPU (µs) of one timed semaphore wait of ``nap_s`` that times out: the daemon's nap."""
    sem = posix_ipc.Semaphore(f"/shmreplay-bench-nap-{os.getpid()}", posix_ipc.O_CREX)
    try:
        n = max(1, int(seconds / nap_s))
        c0 = time.process_time()
        for _ in range(n):
            try:
                sem.acquire(nap_s)
            except posix_ipc.BusyError:
                pass
        return 1e6 * (time.process_time() - c0) / n
    finally:
        sem.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.daemon_cpu", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    parser.add_argument(
        "--only", choices=("paced", "insert", "insert_batch"), help="run one workload only"
    )
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 4.0
    emit_reference()
    nap = nap_cpu_us(ACTIVE_SLEEP_S, seconds)
    paced_items_per_s = 4 * PACED_RATE
    emit(
        {
            "reference": "nap",
            "nap_ms": ACTIVE_SLEEP_S * 1e3,
            "us_cpu": round(nap, 1),
            "paced_floor_us_per_item": round(nap / ACTIVE_SLEEP_S / paced_items_per_s, 2),
        }
    )
    targets = {"paced": 2.0, "insert": 0.4, "insert_batch": 0.03}
    for mode, actors in (("paced", 4), ("insert", 2), ("insert_batch", 2)):
        if args.only not in (None, mode):
            continue
        record = run(mode, actors, seconds)
        if mode == "insert_batch":
            record["mode"] = "insert_batch(64)"
        record["target_us_per_item"] = targets[mode]
        emit(record)


if __name__ == "__main__":
    main()
