"""Trajectory benchmarks W5, W5b and R2D2-style sequences, each next to this machine's memcpy.

    python -m bench.trajectory              # every workload
    python -m bench.trajectory W5           # some of them
    python -m bench.trajectory --quick      # shorter runs and smaller tables (a smoke test)

W5: one process appends W1-sized steps (obs float32[8], action int64, reward float32, done
bool) with a TrajectoryWriter and creates one 32-step item at every step into a uniform table
(signature fields of shape [32, ...]); another process samples batches of 256 such items.
W5b: the same with Atari steps (obs uint8[84, 84, 4]) and batches of 32. R2D2: Atari steps,
80-step items every 40 steps (overlap 40). Each reports appended steps/s, sampled batches/s and
the shared memory per stored step: ``segment bytes / (max_size · T)`` (each item's own copy of
a step) and ``segment bytes / (max_size · stride)`` (per distinct environment step, stride being
the steps between items), against the raw step size; ``bytes_per_slot_step`` divides by every
slot (headroom included) instead of max_size.

``paths`` measures the ways a writer can put a 32-step item into a table (Table.insert, reserve()
with slice copies, batched insert_batch), which decided the writer's DIRECT_MIN_BYTES.

``adder``: one process, ``NStepTransitionAdder.add`` at full speed (n = 3, CartPole-sized steps:
obs float32[4], a Python int action and float reward, episodes of 100 steps) into a prioritized
table, no sampler: the adder's own cost per environment step, which bounds the example's
``--compare-queue`` adder figure (4 actors there share 2 cores with the learner and the daemon).

Prints one JSON line per figure. Rates are medians of windows (see bench.run.windowed_rate);
``alone`` is the appender with no sampler running, ``with_sampler`` both at once (on a 2-core
machine they share the cores with the daemon).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os

import numpy as np

import shmreplay
from bench.run import emit, emit_reference, spread, windowed_rate
from shmreplay import NStepTransitionAdder
from shmreplay.client.trajectory import TrajectoryWriter
from shmreplay.testing import DaemonProcess, table_toml

CTX = mp.get_context("spawn")

FIELDS = ("obs", "action", "reward", "done")


def signature(obs_shape: tuple[int, ...], obs_dtype: str, length: int) -> str:
    """W1 or Atari steps, ``length`` of them per item."""
    return (
        "[table.signature]\n"
        f'obs = {{ shape = {[length, *obs_shape]}, dtype = "{obs_dtype}" }}\n'
        f'action = {{ shape = [{length}], dtype = "int64" }}\n'
        f'reward = {{ shape = [{length}], dtype = "float32" }}\n'
        f'done = {{ shape = [{length}], dtype = "bool" }}\n'
    )


def raw_step_bytes(obs_shape: tuple[int, ...], obs_dtype: str) -> int:
    return int(np.prod(obs_shape, dtype=np.int64)) * np.dtype(obs_dtype).itemsize + 8 + 4 + 1


def make_steps(obs_shape, obs_dtype, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    if np.dtype(obs_dtype).kind == "u":
        frames = [rng.integers(0, 255, obs_shape, dtype=obs_dtype) for _ in range(n)]
    else:
        frames = [rng.standard_normal(obs_shape).astype(obs_dtype) for _ in range(n)]
    return [
        {
            "obs": f,
            "action": np.int64(rng.integers(4)),
            "reward": np.float32(rng.standard_normal()),
            "done": np.bool_(False),
        }
        for f in frames
    ]


def appender(instance, obs_shape, obs_dtype, length, stride, seconds, ready, go, results):
    """Append steps and make an item of the newest ``length`` steps every ``stride`` steps."""
    client = shmreplay.attach(instance, timeout=10)
    steps = make_steps(obs_shape, obs_dtype, 64, os.getpid())
    writer = TrajectoryWriter(client, length)
    h = writer.history
    for s in steps[:length]:
        writer.append(s)
    i = 0

    def step() -> int:
        nonlocal i
        for s in steps:
            writer.append(s)
            i += 1
            if i % stride == 0:
                writer.create_item(
                    "seq",
                    1.0,
                    {
                        "obs": h["obs"][-length:],
                        "action": h["action"][-length:],
                        "reward": h["reward"][-length:],
                        "done": h["done"][-length:],
                    },
                )
        return len(steps)

    # Warm up: every slot of the table written once (a first touch of a page costs a page
    # fault that a long run pays only once), the first leases, the rings.
    slots = client.table("seq").spec.num_slots
    while i < slots * stride:
        step()
    writer.flush()
    ready.set()
    go.wait()
    r = windowed_rate(step, seconds, writer.flush)
    writer.close()
    results.put(("append", r))
    client.close()


def sampler(instance, batch_size, seconds, ready, go, results):
    client = shmreplay.attach(instance, timeout=10)
    t = client.table("seq")
    out = {f.name: np.empty((batch_size, *f.shape), f.np_dtype) for f in t.spec.signature}
    t.sample(batch_size, out=out, timeout=60)  # waits for min_size items
    ready.set()
    go.wait()

    def step() -> int:
        t.sample(batch_size, out=out, timeout=30)
        return 1

    results.put(("sample", windowed_rate(step, seconds)))
    client.close()


def run(
    workload: str,
    obs_shape: tuple[int, ...],
    obs_dtype: str,
    length: int,
    stride: int,
    batch_size: int,
    max_size: int,
    seconds: float,
    memcpy: float,
    targets: dict,
) -> None:
    # The default headroom (max_size, up to 8192 slots) would double a large-item table; small
    # items keep it. It also sizes the writer's leases (half of it here): with 64 the W5b
    # appender was 15-20 % slower than with 256, waiting for slots more often.
    headroom = 256 if length * raw_step_bytes(obs_shape, obs_dtype) > 65536 else 0
    min_size = min(1000, max_size // 2)
    toml = "\n" + table_toml(
        name="seq",
        max_size=max_size,
        signature=signature(obs_shape, obs_dtype, length),
        rate_limiter=f'{{ kind = "min_size", min_size = {min_size} }}',
        extra=f"headroom = {headroom}" if headroom else "",
    )
    with DaemonProcess(toml) as d:
        with shmreplay.attach(d.name, prefault=False) as c:
            info = c.table("seq").info()
            num_slots = c.table("seq").spec.num_slots
        raw = raw_step_bytes(obs_shape, obs_dtype)
        record = {
            "workload": workload,
            "item_steps": length,
            "steps_between_items": stride,
            "batch_size": batch_size,
            "max_size": max_size,
            "headroom": num_slots - max_size,
            "raw_step_bytes": raw,
            "segment_bytes": info.segment_bytes,
            "bytes_per_item_step": round(info.segment_bytes / (max_size * length), 1),
            # the same over every slot, headroom included: what a step costs besides headroom
            "bytes_per_slot_step": round(info.segment_bytes / (num_slots * length), 1),
            "bytes_per_env_step": round(info.segment_bytes / (max_size * stride), 1),
            "memcpy_GB_per_s": round(memcpy, 2),
        }
        rates = {}
        for mode in ("alone", "with_sampler"):
            results = CTX.Queue()
            go = CTX.Event()
            readies = [CTX.Event()]
            procs = [
                CTX.Process(
                    target=appender,
                    args=(
                        d.name,
                        obs_shape,
                        obs_dtype,
                        length,
                        stride,
                        seconds,
                        readies[0],
                        go,
                        results,
                    ),
                )
            ]
            if mode == "with_sampler":
                readies.append(CTX.Event())
                procs.append(
                    CTX.Process(
                        target=sampler,
                        args=(d.name, batch_size, seconds, readies[1], go, results),
                    )
                )
            for p in procs:
                p.start()
            for ev in readies:
                if not ev.wait(120):
                    raise RuntimeError(f"{workload}: a process did not get ready")
            go.set()
            for _ in procs:
                kind, r = results.get(timeout=seconds + 120)
                rates[(mode, kind)] = r
            for p in procs:
                p.join(30)
        a, aw = rates[("alone", "append")], rates[("with_sampler", "append")]
        s = rates[("with_sampler", "sample")]
        record.update(
            {
                "steps_per_s_alone": round(a["median"]),
                "steps_per_s_with_sampler": round(aw["median"]),
                "batches_per_s_with_sampler": round(s["median"]),
                "low_high": {
                    "alone": spread(a),
                    "with_sampler": spread(aw),
                    "batches": spread(s),
                },
                "target": targets,
            }
        )
        emit(record)


def copy_paths(seconds: float, memcpy: float) -> None:
    """How a writer can put a 32-step item into a table: Table.insert, reserve() with slice
    copies from the ring, or batches of insert_batch gathered from the ring; µs per item.
    The writer batches items below trajectory.DIRECT_MIN_BYTES and reserves the others."""
    for name, obs_shape, obs_dtype, max_size in (
        ("W1 steps", (8,), "float32", 50_000),
        ("Atari steps", (84, 84, 4), "uint8", 1_000),
    ):
        _copy_paths(name, obs_shape, obs_dtype, max_size, seconds, memcpy)


def _copy_paths(name, obs_shape, obs_dtype, max_size, seconds, memcpy) -> None:
    """One line of copy_paths: a table of 32-step items of these steps."""
    length = 32
    toml = "\n" + table_toml(
        name="seq", max_size=max_size, signature=signature(obs_shape, obs_dtype, length)
    )
    with DaemonProcess(toml) as d, shmreplay.attach(d.name) as c:
        t = c.table("seq")
        rows = length + 32
        steps = make_steps(obs_shape, obs_dtype, rows, 0)
        ring = {f: np.stack([s[f] for s in steps]) for f in FIELDS}
        row_bytes = t.spec.row_bytes
        cap = max(1, min(128, (1 << 20) // row_bytes))
        stage = {f.name: np.empty((cap, *f.shape), f.np_dtype) for f in t.spec.signature}
        i = 0

        def insert() -> int:
            nonlocal i
            for _ in range(cap):
                a = i % (rows - length)
                t.insert({f: r[a : a + length] for f, r in ring.items()})
                i += 1
            return cap

        def reserve() -> int:
            nonlocal i
            for _ in range(cap):
                a = i % (rows - length)
                with t.reserve() as slot:
                    for f, r in ring.items():
                        slot[f][...] = r[a : a + length]
                i += 1
            return cap

        def batched() -> int:
            nonlocal i
            idx = (i + np.arange(cap))[:, None] % (rows - length) + np.arange(length)
            t.insert_batch({f: np.take(r, idx, axis=0, out=stage[f]) for f, r in ring.items()})
            i += cap
            return cap

        for _ in range(t.spec.num_slots // cap + 1):  # warm: every slot written once
            batched()
        t.flush()
        record = {"workload": "copy paths", "steps": name, "item_bytes": row_bytes}
        for mode, step in (("insert", insert), ("reserve", reserve), ("batched", batched)):
            r = windowed_rate(step, seconds, t.flush)
            record[f"{mode}_us_per_item"] = round(1e6 / r["median"], 2)
        record["batch_items"] = cap
        record["memcpy_GB_per_s"] = round(memcpy, 2)
        emit(record)


def adder_rate(seconds: float, memcpy: float) -> None:
    """adds/s of one NStepTransitionAdder (see the module docstring)."""
    episode = 100
    sig = NStepTransitionAdder.signature_toml((4,), "float32", (), "int64")
    toml = "\n" + table_toml(
        name="replay",
        max_size=100_000,
        signature=sig,
        sampler='{ kind = "prioritized", priority_exponent = 0.6 }',
    )
    rng = np.random.default_rng(0)
    obs = [rng.standard_normal(4).astype(np.float32) for _ in range(episode + 1)]
    with DaemonProcess(toml) as d, shmreplay.attach(d.name) as c:
        adder = NStepTransitionAdder(c, "replay", n=3, discount=0.99)

        def step() -> int:
            for t in range(episode):
                end = t == episode - 1
                adder.add(obs[t], t & 1, 1.0, done=end, discount=1.0, next_observation=obs[t + 1])
            return episode

        for _ in range(200):  # warm: the writer's rings, the table's first slots and leases
            step()
        adder.flush()
        r = windowed_rate(step, seconds, adder.flush)
        adder.close()
    emit(
        {
            "workload": "adder",
            "n": 3,
            "adds_per_s": round(r["median"]),
            "us_per_add": round(1e6 / r["median"], 2),
            "low_high": spread(r),
            "memcpy_GB_per_s": round(memcpy, 2),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.trajectory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workloads", nargs="*", default=["paths", "adder", "W5", "W5b", "R2D2"])
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 5.0
    memcpy = emit_reference()
    atari = ((84, 84, 4), "uint8")
    for w in args.workloads:
        if w == "paths":
            copy_paths(seconds / 2, memcpy)
        elif w == "adder":
            adder_rate(seconds, memcpy)
        elif w == "W5":
            run(
                "W5", (8,), "float32", 32, 1, 256, 100_000, seconds, memcpy,
                {"steps_per_s": 100_000, "batches_per_s": 1_000,
                 "peers": {"reverb": [15_000, 77], "torchrl": [9_000, 900]}},
            )  # fmt: skip
        elif w == "W5b":
            run(
                "W5b", *atari, 32, 1, 32, 500 if args.quick else 2_000, seconds, memcpy, {}
            )  # fmt: skip
        elif w == "R2D2":
            run(
                "R2D2", *atari, 80, 40, 32, 200 if args.quick else 600, seconds, memcpy, {}
            )  # fmt: skip
        else:
            parser.error(f"unknown workload {w!r}; choose among paths adder W5 W5b R2D2")


if __name__ == "__main__":
    main()
