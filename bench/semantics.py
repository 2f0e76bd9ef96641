"""Semantics benchmarks: selector cost by table size, wake-up latency, CPU of a blocked process.

    python -m bench.semantics            # full run
    python -m bench.semantics --quick    # shorter runs (a smoke test, figures are noisier)

Prints one JSON line per figure, after the ``memcpy`` reference line of :mod:`bench.run`.

1. ``selector``: each selector kind registered in ``shmreplay.engine.selectors`` (new kinds
   are picked up by themselves), driven directly over numpy arrays (no daemon, no mutex) at 1k,
   100k and 1M items: ``insert`` of 256, ``sample(256)``, ``update`` of 256 random present items and
   ``remove`` of 256 random present items followed by ``insert`` of 256 (steady-state churn: the
   size stays put; random removal is what ``delete()``, ``max_times_sampled`` and the other
   role's evictions do). A ``selector_growth`` line per kind compares the cost at 1M with that at 1k
   against the algorithm's growth (2× for trees and heaps, 1× otherwise) times the growth of
   plain random memory access, measured first (``random_access``).
2. ``wakeup``: a sampler process blocked in ``sample(1)`` on an empty table of a real daemon;
   the main process inserts one item, and the latency is from ``insert()`` returning (the item
   is published) to ``sample()`` returning in the sampler, on CLOCK_MONOTONIC (system-wide, so
   comparable across processes). ``max_times_sampled = 1`` consumes each item, so the next
   sample blocks again. Measured with ``flush()`` after the insert (it wakes the daemon at
   once) and without (the daemon commits at the end of its nap).
3. ``blocked_cpu``: CPU time of a process blocked in ``sample(1, timeout=...)`` on an empty table,
   and the daemon's over the same window, with no writer attached and with an idle one.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import time

import numpy as np
import psutil

import shmreplay
from shmreplay.config import SelectorSpec, TableSpec
from shmreplay.engine.layout import Chan
from shmreplay.engine.selectors import _SELECTORS
from shmreplay.engine.selectors.base import Selector
from shmreplay.testing import DaemonProcess, table_toml

from .run import WINDOWS, emit, emit_reference

CTX = mp.get_context("spawn")

# -- 1. selector cost by table size ----------------------------------------------------------

SIZES = {"1k": 1_000, "100k": 100_000, "1M": 1_000_000}
BATCH = 256
FILL_BATCH = 8192  # untimed fill: 1M items in ~120 calls
# Growth expected from 1k to 1M items: log2(1M)/log2(1k) = 2 for tree and heap selectors,
# none for the others. Kinds not listed here are measured without a stated expectation.
LOG_GROWTH = math.log2(1_000_000) / math.log2(1_000)
EXPECTED_GROWTH = {
    "uniform": 1.0,
    "fifo": 1.0,
    "lifo": 1.0,
    "prioritized": LOG_GROWTH,
    "min_heap": LOG_GROWTH,
    "max_heap": LOG_GROWTH,
}
# Memory alone grows too: 256 scattered reads and writes in arrays of 1M slots (8 MB each) miss
# the caches that hold 1k slots. The check allows the algorithmic growth times the growth of a
# bare numpy gather + scatter of 256 random slots, measured in the same run (``random_access``).
# That bare call is mostly fixed per-call cost at 1k, so its growth bounds what memory can add
# to any numpy call on scattered slots: the check is loose (it catches an O(n) step, e.g. a
# compaction every few calls, not an extra log factor), and it does not flicker with the drift.
OPS = ("insert", "sample", "update", "remove+insert")


def _selector(kind: str, num_slots: int) -> Selector:
    cls = _SELECTORS[kind]
    spec = SelectorSpec.prioritized(0.6) if kind == "prioritized" else SelectorSpec(kind)
    arrays = {name: np.zeros(shape, dtype) for name, dtype, shape in cls.array_specs(num_slots)}
    sel = cls(arrays, spec, num_slots)
    sel.clear()  # as a new table does on zeroed shared memory
    return sel


def _distinct(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``k`` distinct random indices below ``n``, without rng.choice's O(n) permutation."""
    while True:
        d = np.unique(rng.integers(0, n, 2 * k))
        if len(d) >= k:
            rng.shuffle(d)
            return d[:k]


def _window_means(ns: np.ndarray) -> dict:
    """Median, lowest and highest of WINDOWS window means, in µs per call (a mean, so that
    amortised work such as a ring compaction every so many inserts is counted)."""
    means = sorted(float(w.mean()) / 1e3 for w in np.array_split(ns, WINDOWS))
    return {"median": means[len(means) // 2], "low": means[0], "high": means[-1]}


def _random_access(reps: int, rng: np.random.Generator) -> dict[str, dict]:
    """The memory reference, per size: gather then scatter 256 random slots of two int64 arrays
    sized as a table of that many items is (what an O(1) selector does at least). The sizes
    take turns call by call, so that the machine's drift affects them alike."""
    arrays = {}
    for label, n in SIZES.items():
        num_slots = TableSpec("bench", n, ()).num_slots
        arrays[label] = (rng.permutation(num_slots), np.zeros(num_slots, np.int64))
    ns = {label: np.empty(reps, np.int64) for label in SIZES}
    clock = time.perf_counter_ns
    for r in range(-max(10, reps // 10), reps):
        for label, (src, dst) in arrays.items():
            idx = rng.integers(0, len(src), BATCH)
            t0 = clock()
            dst[idx] = src[idx]
            t1 = clock()
            if r >= 0:
                ns[label][r] = t1 - t0
    return {label: _window_means(v) for label, v in ns.items()}


def _measure_selector(kind: str, n: int, reps: int, rng: np.random.Generator) -> dict:
    """Per-call microseconds of each op at ``n`` items (see :func:`_window_means`)."""
    # As many slots as a table of max_size n has (its headroom computed where the table's is).
    num_slots = TableSpec("bench", n, ()).num_slots
    sel = _selector(kind, num_slots)
    # Slot numbers of a long-running table are scattered: its free list recycles them.
    perm = rng.permutation(num_slots)
    present, free = perm[:n].copy(), perm[n:].copy()
    for start in range(0, n, FILL_BATCH):
        part = present[start : start + FILL_BATCH]
        sel.insert(part, rng.random(len(part)) + 0.01)
    prios = rng.random(BATCH) + 0.01
    ns = {op: np.empty(reps, np.int64) for op in OPS}
    clock = time.perf_counter_ns
    warmup = max(10, reps // 10)
    for r in range(-warmup, reps):
        t0 = clock()
        sel.sample(BATCH, rng, None)
        t1 = clock()
        upd = present[_distinct(rng, n, BATCH)]
        new_prios = rng.random(BATCH) + 0.01
        t2 = clock()
        sel.update(upd, new_prios)
        t3 = clock()
        idx = _distinct(rng, n, BATCH)
        victims, new = present[idx], free[:BATCH]
        t4 = clock()
        sel.remove(victims)
        t5 = clock()
        sel.insert(new, prios)
        t6 = clock()
        present[idx] = new
        free = np.concatenate([free[BATCH:], victims])  # the free ring: FIFO of freed slots
        if r >= 0:
            ns["sample"][r] = t1 - t0
            ns["update"][r] = t3 - t2
            ns["remove+insert"][r] = t6 - t4
            ns["insert"][r] = t6 - t5
    out = {}
    for op in OPS:
        w = _window_means(ns[op])
        out[op] = {
            "us_per_call": round(w["median"], 2),
            "us_per_item": round(w["median"] / BATCH, 4),
            "low_high": [round(w["low"], 2), round(w["high"], 2)],
        }
    return {"num_slots": num_slots, "ops": out}


def bench_selectors(reps: int) -> None:
    rng = np.random.default_rng(0)
    memory = _random_access(10 * reps, rng)
    for label, n in SIZES.items():
        w = memory[label]
        emit(
            {
                "benchmark": "random_access",
                "what": f"numpy dst[idx] = src[idx], {BATCH} random slots (memory reference)",
                "items": n,
                "us_per_call": round(w["median"], 2),
                "low_high": [round(w["low"], 2), round(w["high"], 2)],
            }
        )
    memory_ratio = memory["1M"]["median"] / memory["1k"]["median"]
    for kind in _SELECTORS:
        per_size = {}
        for label, n in SIZES.items():
            t0 = time.perf_counter()
            r = _measure_selector(kind, n, reps, rng)
            per_size[label] = r["ops"]
            emit(
                {
                    "benchmark": "selector",
                    "kind": kind,
                    "items": n,
                    "num_slots": r["num_slots"],
                    "batch": BATCH,
                    **r["ops"],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
        ratios = {
            op: round(per_size["1M"][op]["us_per_call"] / per_size["1k"][op]["us_per_call"], 2)
            for op in OPS
        }
        expected = EXPECTED_GROWTH.get(kind)
        allowed = None if expected is None else expected * max(1.0, memory_ratio)
        emit(
            {
                "benchmark": "selector_growth",
                "kind": kind,
                "ratio_1M_vs_1k": ratios,
                "expected_ratio": None if expected is None else round(expected, 2),
                "memory_ratio": round(memory_ratio, 2),
                "allowed_ratio": None if allowed is None else round(allowed, 2),
                "holds": None
                if allowed is None
                else {op: ratio <= allowed for op, ratio in ratios.items()},
            }
        )


# -- 2. wake-up latency of a blocked sampler --------------------------------------------------

SETTLE_S = 0.005  # between rounds: the sampler is back asleep on its semaphore well before this
ROUND_TIMEOUT_S = 10.0
WARMUP_ROUNDS = 5
EMPTY_ROW = {"obs": np.zeros(8, np.float32), "action": 0, "reward": 0.0, "done": False}
WAKEUP_TOML = "\n" + table_toml(max_size=1000, extra="max_times_sampled = 1")


def _wakeup_sampler(instance: str, rounds: int, acks) -> None:
    """Sample one item ``rounds`` times; after each, put when it returned and what it got."""
    client = shmreplay.attach(instance, timeout=10)
    try:
        t = client.table("replay")
        for i in range(rounds):
            try:
                s = t.sample(1, timeout=ROUND_TIMEOUT_S)
            except shmreplay.ShmReplayError as exc:
                acks.put(("error", i, f"{type(exc).__name__}: {exc}"))
                return
            acks.put(("ok", time.monotonic_ns(), int(s.data["action"][0])))
    finally:
        client.close(timeout=1)


def _sampler_waiting(t) -> bool:
    """Whether a process sleeps on the table's sample event (its channel's WAIT_SAMPLE line)."""
    return bool(t.core.chan[:, Chan.WAIT_SAMPLE].any())


def bench_wakeup(rounds: int) -> None:
    modes = (("insert+flush", True), ("insert", False))
    with DaemonProcess(WAKEUP_TOML) as d, shmreplay.attach(d.name) as client:
        t = client.table("replay")
        acks = CTX.Queue()
        total = WARMUP_ROUNDS + rounds * len(modes)
        sampler = CTX.Process(target=_wakeup_sampler, args=(d.name, total, acks), daemon=True)
        sampler.start()
        row = dict(EMPTY_ROW)
        uid = 0

        def one_round(flush: bool) -> tuple[int, int, int, bool]:
            nonlocal uid
            time.sleep(SETTLE_S)
            deadline = time.monotonic() + ROUND_TIMEOUT_S
            while not _sampler_waiting(t):  # really blocked before we insert
                if time.monotonic() > deadline or not sampler.is_alive():
                    raise RuntimeError("the sampler process did not block in sample()")
                time.sleep(0.001)
            row["action"] = uid
            t0 = time.monotonic_ns()
            t.insert(row)
            t1 = time.monotonic_ns()
            if flush:
                t.flush()
            t2 = time.monotonic_ns()
            msg = acks.get(timeout=ROUND_TIMEOUT_S + 5)
            if msg[0] != "ok":
                raise RuntimeError(f"sampler failed in round {msg[1]}: {msg[2]}")
            right = msg[2] == uid
            uid += 1
            return t1 - t0, t2 - t1, msg[1] - t1, right

        finished = False
        try:
            for _ in range(WARMUP_ROUNDS):  # the first insert waits for a lease
                one_round(True)
            for mode, flush in modes:
                res = np.array([one_round(flush) for _ in range(rounds)], dtype=np.int64)
                lat = res[:, 2] / 1e3
                med, p99 = float(np.median(lat)), float(np.percentile(lat, 99))
                emit(
                    {
                        "benchmark": "wakeup",
                        "mode": mode,
                        "rounds": rounds,
                        "median_us": round(med, 1),
                        "p90_us": round(float(np.percentile(lat, 90)), 1),
                        "p99_us": round(p99, 1),
                        "max_us": round(float(lat.max()), 1),
                        "insert_call_us": round(float(np.median(res[:, 0])) / 1e3, 1),
                        "flush_call_us": round(float(np.median(res[:, 1])) / 1e3, 1),
                        "wrong_items": int(rounds - res[:, 3].sum()),
                        "goal": {"median_us": 100, "p99_us": 1000},
                        "meets_goal": {"median": med < 100, "p99": p99 < 1000},
                    }
                )
            finished = True
        finally:  # after an error the sampler still waits for items: do not wait for it
            sampler.join(timeout=ROUND_TIMEOUT_S if finished else 0.1)
            if sampler.is_alive():
                sampler.kill()
                sampler.join()
            acks.close()


# -- 3. CPU used by a blocked process ---------------------------------------------------------


def _blocked_cpu_sampler(instance: str, seconds: float, blocking, results) -> None:
    """Block in sample(1) on an empty table for ``seconds``; put (cpu s, wall s, outcome)."""
    client = shmreplay.attach(instance, timeout=10, prefault=False)
    try:
        t = client.table("replay")
        blocking.set()
        w0, c0 = time.monotonic(), time.process_time()
        try:
            t.sample(1, timeout=seconds)
            outcome = "sampled"
        except shmreplay.RateLimiterTimeout:
            outcome = "timed out"
        results.put((time.process_time() - c0, time.monotonic() - w0, outcome))
    finally:
        client.close(timeout=1)


def _cpu_s(p: psutil.Process) -> float:
    c = p.cpu_times()
    return c.user + c.system


def bench_blocked_cpu(seconds: float) -> None:
    toml = "\n" + table_toml(max_size=1000)
    with DaemonProcess(toml) as d, shmreplay.attach(d.name) as client:
        t = client.table("replay")
        daemon = psutil.Process(d.proc.pid)
        for writer in (False, True):
            if writer:  # an attached writer that inserted once keeps the daemon napping
                key = t.insert(EMPTY_ROW)
                t.flush()
                t.delete([key])
            if t.info().current_size != 0:
                raise RuntimeError("the table must be empty for the sampler to block")
            blocking, results = CTX.Event(), CTX.Queue()
            p = CTX.Process(target=_blocked_cpu_sampler, args=(d.name, seconds, blocking, results))
            p.start()
            try:
                if not blocking.wait(30):
                    raise RuntimeError("the blocked-sampler process did not start")
                w0, d0 = time.monotonic(), _cpu_s(daemon)
                cpu, wall, outcome = results.get(timeout=seconds + 30)
                daemon_pct = 100 * (_cpu_s(daemon) - d0) / (time.monotonic() - w0)
            finally:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
                results.close()
            pct = 100 * cpu / wall
            emit(
                {
                    "benchmark": "blocked_cpu",
                    "writer_attached": writer,
                    "seconds": round(wall, 2),
                    "outcome": outcome,
                    "sampler_cpu_pct": round(pct, 3),
                    "daemon_cpu_pct": round(daemon_pct, 2),
                    "goal_sampler_cpu_pct": 1.0,
                    "meets_goal": pct < 1.0,
                }
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.semantics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    args = parser.parse_args()
    emit_reference()
    bench_selectors(reps=200 if args.quick else 1000)
    bench_wakeup(rounds=50 if args.quick else 200)
    bench_blocked_cpu(2.0 if args.quick else 5.0)


if __name__ == "__main__":
    main()
