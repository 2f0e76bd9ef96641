"""Learner loaders: a plain ``sample`` loop against ``Table.as_iterator`` and
``shmreplay.torch.iterate``, with and without a simulated training step, next to this machine's
memcpy.

    python -m bench.loader            # both workloads
    python -m bench.loader W2         # one of them
    python -m bench.loader --quick    # shorter runs (a smoke test)

Workloads: W1 rows (obs float32[8], action, reward, done: 45 bytes a row) in batches of 256,
and W2 Atari rows (obs uint8[84, 84, 4]: 28 KB a row) in batches of 32 (0.9 MB a batch).
The table holds 10 000 (W1) or 5 000 (W2) items, uniform, no writer: the figure is the learner's
loop alone.

Training steps: ``none`` (the loader's own rate), ``sleep`` (``time.sleep(0.001)``: a GPU step,
the Python thread waits with the GIL released) and ``torch`` (a CPU matrix product of ~1 ms, one
torch thread: it competes with the prefetch thread for this machine's cores). Each line gives
batches/s (median of windows, with the lowest and highest); with a step, the step's own time
(``step_alone_ms``) and the ``overlap``: the share of the plain loop's sampling time (its time
per batch minus the step's) that prefetching hides, 1.0 meaning all of it.

The loops' windows are taken in turn (see ``interleaved_rates``), so that the figures of one
line are comparable even while other processes load the machine. Prints one JSON line per
figure; the reference line ``memcpy`` comes first.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np

import shmreplay
from bench.run import W1_SIG, W2_SIG, WINDOWS, emit, emit_reference, spread
from shmreplay.testing import DaemonProcess, table_toml

STEP_S = 0.001  # the simulated training step: ~1 ms, a small network's update
WORKLOADS = {  # name: (signature, items in the table, batch size)
    "W1": (W1_SIG, 10_000, 256),
    "W2": (W2_SIG, 5_000, 32),
}


def fill(t: shmreplay.Table, n: int) -> None:
    rng = np.random.default_rng(0)
    obs = next(f for f in t.spec.signature if f.name == "obs")
    for start in range(0, n, 500):
        k = min(500, n - start)
        t.insert_batch(
            {
                "obs": rng.integers(0, 255, (k, *obs.shape)).astype(obs.np_dtype),
                "action": rng.integers(0, 4, k),
                "reward": rng.standard_normal(k).astype(np.float32),
                "done": np.zeros(k, bool),
            }
        )
    t.flush()


def make_steps():
    """The simulated training steps, by name: each takes a batch's obs and does ~STEP_S."""
    steps = {"none": None, "sleep": lambda obs: time.sleep(STEP_S)}
    try:
        import torch
    except ImportError:
        return steps
    torch.set_num_threads(1)
    a = torch.randn(256, 256)

    def product_s() -> float:  # the fastest of several: the machine's load only slows it down
        best = float("inf")
        for _ in range(50):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        return best

    reps = max(1, round(STEP_S / product_s()))  # products that make ~1 ms on this machine

    def torch_step(obs) -> None:
        for _ in range(reps):
            a @ a

    steps["torch"] = torch_step
    return steps


def bench(name: str, seconds: float, steps: dict) -> None:
    signature, size, batch = WORKLOADS[name]
    with (
        DaemonProcess("\n" + table_toml(max_size=size, signature=signature)) as d,
        shmreplay.attach(d.name) as client,
    ):
        t = client.table("replay")
        fill(t, size)
        out = {f.name: np.empty((batch, *f.shape), f.np_dtype) for f in t.spec.signature}
        try:
            import shmreplay.torch as st
        except shmreplay.MissingDependencyError:
            st = None
        with contextlib.ExitStack() as open_iterators:
            nexts = {
                "sample": lambda: t.sample(batch, out=out),
                "as_iterator": open_iterators.enter_context(t.as_iterator(batch)).__next__,
            }
            if st is not None:
                nexts["torch.iterate"] = open_iterators.enter_context(st.iterate(t, batch)).__next__
            for step_name, step in steps.items():
                loops = {loop: learner_loop(nb, step) for loop, nb in nexts.items()}
                if step is not None:
                    loops["step alone"] = lambda step=step: step(None) or 1
                rates = interleaved_rates(loops, seconds)
                report(name, batch, step_name, rates)


def learner_loop(next_batch, step):
    """One iteration of a learner: take a batch, then train on it (``step``); returns 1."""

    def one() -> int:
        s = next_batch()
        if step is not None:
            step(s.data["obs"])
        return 1

    return one


def interleaved_rates(loops: dict, seconds: float) -> dict[str, dict]:
    """Like bench.run.windowed_rate for several loops, their windows taken in turn (A B C A B C
    ...): a burst of load from other processes on this shared machine hits all of them alike.
    An iterator idle while the others run has only its ``prefetch`` batches ready: nothing
    that shows in a window of hundreds of batches."""
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(WINDOWS):
        for name, one in loops.items():
            n = 0
            t0 = time.perf_counter()
            end = t0 + seconds / WINDOWS  # each loop runs `seconds` in all
            while time.perf_counter() < end:
                n += one()
            rates[name].append(n / (time.perf_counter() - t0))
    return {
        name: {"median": sorted(r)[len(r) // 2], "low": min(r), "high": max(r)}
        for name, r in rates.items()
    }


def report(workload: str, batch: int, step_name: str, rates: dict[str, dict]) -> None:
    step = rates.pop("step alone", None)
    step_ms = None if step is None else 1e3 / step["median"]
    plain_ms = 1e3 / rates["sample"]["median"]
    for loop, r in rates.items():
        record = {
            "workload": workload,
            "batch": batch,
            "step": step_name,
            "loop": loop,
            "batches_per_s": round(r["median"]),
            "low_high": spread(r),
            "ms_per_batch": round(1e3 / r["median"], 3),
        }
        if step_ms is not None:
            record["step_alone_ms"] = round(step_ms, 3)
            # The share of the plain loop's sampling time that prefetching hides; only when
            # that time is large enough to be told from the step's own noise.
            if loop != "sample" and plain_ms - step_ms > 0.05:
                saved = plain_ms - 1e3 / r["median"]
                record["overlap"] = round(saved / (plain_ms - step_ms), 2)
        emit(record)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loader",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("workloads", nargs="*", default=list(WORKLOADS))
    parser.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else 3.0
    emit_reference()
    steps = make_steps()
    for w in args.workloads:
        if w not in WORKLOADS:
            parser.error(f"unknown workload {w!r}; choose among {' '.join(WORKLOADS)}")
        bench(w, seconds, steps)


if __name__ == "__main__":
    main()
