"""Benchmarks W1–W4 of the foundation issue, each next to this machine's memcpy bandwidth.

    python -m bench                 # every workload
    python -m bench W1 W3           # some of them
    python -m bench --quick         # shorter runs (a smoke test, figures are noisier)

Prints one JSON line per workload. The reference line ``memcpy`` is numpy's copy bandwidth
measured in the same run, so figures from a noisy machine can be read as ratios. Workload
definitions are those of the issue (and of the peer figures quoted there); keep them identical.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

import numpy as np

import shmreplay
from shmreplay.testing import W1_SIGNATURE, DaemonProcess, table_toml

CTX = mp.get_context("spawn")

W1_SIG = W1_SIGNATURE  # the W1 transition: obs float32[8], action, reward, done
W2_SIG = """
[table.signature]
obs = { shape = [84, 84, 4], dtype = "uint8" }
action = { dtype = "int64" }
reward = { dtype = "float32" }
done = { dtype = "bool" }
"""
W2_ROW_BYTES = 84 * 84 * 4 + 8 + 4 + 1


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def emit_reference() -> float:
    """Measure and print this machine's reference line (numpy memcpy GB/s); return it."""
    memcpy = memcpy_gbps()
    emit(
        {
            "reference": "memcpy",
            "GB_per_s": round(memcpy, 2),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
        }
    )
    return memcpy


WINDOWS = 5  # a figure is the median of this many windows: this machine is noisy


def windowed_rate(step, seconds: float, settle=None) -> dict:
    """Run ``step()`` (returns how many units it did) for ``seconds``; the median rate over
    WINDOWS equal windows, with the lowest and highest. ``settle()`` ends each window (e.g. a
    flush, so that what is counted was committed)."""
    rates = []
    for _ in range(WINDOWS):
        n = 0
        t0 = time.perf_counter()
        end = t0 + seconds / WINDOWS
        while time.perf_counter() < end:
            n += step()
        if settle is not None:
            settle()
        rates.append(n / (time.perf_counter() - t0))
    rates.sort()
    return {"median": rates[len(rates) // 2], "low": rates[0], "high": rates[-1]}


def spread(r: dict) -> list[int]:
    return [round(r["low"]), round(r["high"])]


def memcpy_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def w1_row(rng) -> dict:
    return {
        "obs": rng.standard_normal(8).astype(np.float32),
        "action": np.int64(rng.integers(4)),
        "reward": np.float32(rng.standard_normal()),
        "done": np.bool_(False),
    }


def w1_batch(n: int, rng) -> dict:
    return {
        "obs": rng.standard_normal((n, 8)).astype(np.float32),
        "action": rng.integers(0, 4, n),
        "reward": rng.standard_normal(n).astype(np.float32),
        "done": np.zeros(n, bool),
    }


def bench_w1(seconds: float) -> None:
    with (
        DaemonProcess("\n" + table_toml(max_size=1_000_000, signature=W1_SIG)) as d,
        shmreplay.attach(d.name) as client,
    ):
        t = client.table("replay")
        rng = np.random.default_rng(0)
        rows = [w1_row(rng) for _ in range(1024)]
        for r in rows[:1000]:  # warm up: first lease, caches
            t.insert(r)
        t.flush()

        def single() -> int:
            for r in rows:
                t.insert(r)
            return len(rows)

        r = windowed_rate(single, seconds, t.flush)
        emit(
            {
                "workload": "W1",
                "mode": "insert",
                "items_per_s": round(r["median"]),
                "us_per_item": round(1e6 / r["median"], 2),
                "low_high": spread(r),
                "target_items_per_s": 100_000,
            }
        )
        batch = w1_batch(256, rng)

        def batched() -> int:
            for _ in range(64):
                t.insert_batch(batch)
            return 64 * 256

        r = windowed_rate(batched, seconds, t.flush)
        emit(
            {
                "workload": "W1",
                "mode": "insert_batch(256)",
                "items_per_s": round(r["median"]),
                "low_high": spread(r),
                "target_items_per_s": 5_000_000,
            }
        )


def bench_w2(seconds: float, memcpy: float) -> None:
    with (
        DaemonProcess("\n" + table_toml(max_size=50_000, signature=W2_SIG)) as d,
        shmreplay.attach(d.name) as client,
    ):
        t = client.table("replay")
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 255, (84, 84, 4), dtype=np.uint8) for _ in range(16)]
        row = {
            "obs": frames[0],
            "action": np.int64(1),
            "reward": np.float32(0.5),
            "done": np.bool_(False),
        }
        # A warm table: every slot written once (first touches of a page cost page faults
        # that a long run pays only once), then the figures.
        for _ in range(t.spec.num_slots):
            t.insert(row)
        t.flush()

        def inserts() -> int:
            for f in frames:
                row["obs"] = f
                t.insert(row)
            return len(frames)

        def reserves() -> int:
            for f in frames:
                with t.reserve() as slot:
                    slot["obs"][...] = f
                    slot["action"][...] = 1
                    slot["reward"][...] = 0.5
                    slot["done"][...] = False
            return len(frames)

        for mode, step in (("insert", inserts), ("reserve", reserves)):
            r = windowed_rate(step, seconds, t.flush)
            emit(
                {
                    "workload": "W2",
                    "mode": mode,
                    "items_per_s": round(r["median"]),
                    "GB_per_s": round(r["median"] * W2_ROW_BYTES / 1e9, 2),
                    "memcpy_GB_per_s": round(memcpy, 2),
                    "low_high": spread(r),
                    "target_items_per_s": 80_000,
                }
            )


def _fill(instance: str, n: int, done) -> None:
    client = shmreplay.attach(instance, timeout=10)
    t = client.table("replay")
    rng = np.random.default_rng(1)
    for start in range(0, n, 1000):
        k = min(1000, n - start)
        t.insert_batch(w1_batch(k, rng), priorities=rng.random(k) + 0.01)
    t.flush()
    client.close()
    done.set()


def bench_w3(seconds: float) -> None:
    toml = "\n" + table_toml(
        max_size=100_000,
        signature=W1_SIG,
        sampler='{ kind = "prioritized", priority_exponent = 0.6 }',
    )
    with DaemonProcess(toml) as d:
        done = CTX.Event()
        writer = CTX.Process(target=_fill, args=(d.name, 100_000, done))
        writer.start()
        writer.join()
        with shmreplay.attach(d.name) as client:
            t = client.table("replay")
            assert t.info().current_size == 100_000
            rng = np.random.default_rng(2)
            out = {f.name: np.empty((256, *f.shape), f.np_dtype) for f in t.spec.signature}

            def sample_only() -> int:
                t.sample(256, out=out)
                return 1

            def sample_and_update() -> int:
                s = t.sample(256, out=out)
                t.update_priorities(s.info.key, rng.random(256) + 0.01)
                return 1

            for mode, step in (
                ("sample(256)", sample_only),
                ("sample(256)+update", sample_and_update),
            ):
                r = windowed_rate(step, seconds)
                emit(
                    {
                        "workload": "W3",
                        "mode": mode,
                        "batches_per_s": round(r["median"]),
                        "us_per_batch": round(1e6 / r["median"], 1),
                        "low_high": spread(r),
                        "target_batches_per_s": 5_000 if "update" in mode else None,
                    }
                )


def _w4_actor(instance: str, seconds: float, batch: int, results) -> None:
    client = shmreplay.attach(instance, timeout=10)
    t = client.table("replay")
    rng = np.random.default_rng(os.getpid())
    rows = [w1_row(rng) for _ in range(256)]
    data = w1_batch(batch, rng)
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        if batch == 1:
            for r in rows:
                t.insert(r)
            n += len(rows)
        else:
            for _ in range(16):
                t.insert_batch(data)
            n += 16 * batch
    t.flush()
    results.put(n / (time.perf_counter() - t0))
    client.close()


def _w4_learner(instance: str, seconds: float, results) -> None:
    client = shmreplay.attach(instance, timeout=10)
    t = client.table("replay")
    rng = np.random.default_rng(3)
    out = {f.name: np.empty((256, *f.shape), f.np_dtype) for f in t.spec.signature}
    t.sample(256, out=out, timeout=30)
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        s = t.sample(256, out=out)
        t.update_priorities(s.info.key, rng.random(256) + 0.01)
        n += 1
    results.put(n / (time.perf_counter() - t0))
    client.close()


def bench_w4(seconds: float, batch: int = 1) -> None:
    toml = "\n" + table_toml(
        max_size=1_000_000,
        signature=W1_SIG,
        sampler='{ kind = "prioritized", priority_exponent = 0.6 }',
        rate_limiter='{ kind = "min_size", min_size = 1000 }',
    )
    with DaemonProcess(toml) as d:
        ins, smp = CTX.Queue(), CTX.Queue()
        procs = [
            CTX.Process(target=_w4_actor, args=(d.name, seconds, batch, ins)) for _ in range(2)
        ]
        procs.append(CTX.Process(target=_w4_learner, args=(d.name, seconds, smp)))
        for p in procs:
            p.start()
        rates = [ins.get(timeout=seconds + 60) for _ in range(2)]
        batches = smp.get(timeout=seconds + 60)
        for p in procs:
            p.join(30)
        emit(
            {
                "workload": "W4",
                "mode": "2 actors insert()" if batch == 1 else f"2 actors insert_batch({batch})",
                "inserts_per_s": round(sum(rates)),
                "learner_batches_per_s": round(batches),
                "seconds": seconds,
                "target": {"inserts_per_s": 100_000, "batches_per_s": 1_000},
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workloads", nargs="*", default=["W1", "W2", "W3", "W4"])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else 3.0
    memcpy = emit_reference()
    for w in args.workloads:
        if w == "W1":
            bench_w1(seconds)
        elif w == "W2":
            bench_w2(seconds, memcpy)
        elif w == "W3":
            bench_w3(seconds)
        elif w == "W4":
            bench_w4(2.0 if args.quick else 10.0)
            bench_w4(2.0 if args.quick else 10.0, batch=64)
        else:
            parser.error(f"unknown workload {w!r}; choose among W1 W2 W3 W4")


if __name__ == "__main__":
    main()
