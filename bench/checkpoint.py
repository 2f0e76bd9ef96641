"""Checkpoint benchmarks, each next to a plain file copy measured in the same run.

    python -m bench.checkpoint                # a ~2 GB W2 table (74k Atari rows)
    python -m bench.checkpoint --quick        # a ~200 MB one
    python -m bench.checkpoint --dir /data    # write there (default: $TMPDIR or /tmp)

Prints JSON lines:

- ``file_copy``: the reference, the same number of bytes of the table's data written to one file
  with ``os.write`` in 64 MiB chunks, then fsync; best of two runs;
- ``write``: ``write_checkpoint`` of the quiet table, best of two runs interleaved with the
  reference ones, and its ratio to the reference (goal ≥ 0.7);
- ``verify`` and ``restore``: ``latest_checkpoint`` (reads and checksums every file) and
  ``restore_table`` into a fresh table, from the page cache (the checkpoint was just written);
- ``write_under_writer``: a checkpoint while a writer process keeps inserting into the full
  table (every insert evicts), as fast as it can and paced at PACED_RATE items/s: the longest
  table-mutex hold (goal ≤ 5 ms), rows dropped because their slot was rewritten before they
  were copied, and the writer's insert rate before and during;
- ``metadata_lock_1M``: the mutex hold of a checkpoint of a 1M-item table of small rows, also
  from a thread while the calling thread runs Python (the GIL hand-offs a daemon thread pays).

Checkpoint files are removed afterwards; a run needs about 1.5 times the table's data free on
the disk and skips the table figures (saying so) when it is not there.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import shmreplay
from bench.run import W2_ROW_BYTES, W2_SIG, emit
from shmreplay.config import FieldSpec, SelectorSpec, TableSpec
from shmreplay.daemon.checkpoint import (
    latest_checkpoint,
    read_checkpoint,
    restore_table,
    write_checkpoint,
)
from shmreplay.engine.layout import Ctrl
from shmreplay.engine.table import TableCore
from shmreplay.testing import DaemonProcess, local_table, table_toml

CTX = mp.get_context("spawn")
FULL_ITEMS = 74_000  # x 28,237 bytes = 2.09 GB
QUICK_ITEMS = 7_400
# An Atari setup: a few hundred environment steps per second per actor, a few dozen actors.
PACED_RATE = 5_000
COPY_CHUNK = 64 << 20  # the reference's write size (DESIGN.md §7 measured 64 MiB writes)
W1_FIELDS = (
    FieldSpec("obs", (8,), "float32"),
    FieldSpec("action", (), "int64"),
    FieldSpec("reward", (), "float32"),
    FieldSpec("done", (), "bool"),
)


def file_copy(src: np.ndarray, nbytes: int, directory: Path) -> float:
    """Seconds to write ``nbytes`` of ``src`` to a new file in 64 MiB writes, then fsync."""
    view = memoryview(src.reshape(-1).view(np.uint8))[:nbytes]
    path = directory / "reference.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for off in range(0, nbytes, COPY_CHUNK):
            piece = view[off : off + COPY_CHUNK]
            while len(piece):
                piece = piece[os.write(fd, piece) :]
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink()


def _writer(instance: str, stop, rate: float | None) -> None:
    """Insert W2 rows in batches of 32 until ``stop`` is set, at ``rate`` items/s (None: as
    fast as it can)."""
    client = shmreplay.attach(instance, timeout=10)
    t = client.table("replay")
    rng = np.random.default_rng(5)
    batch = {
        "obs": rng.integers(0, 255, (32, 84, 84, 4), dtype=np.uint8),
        "action": np.arange(32),
        "reward": np.zeros(32, np.float32),
        "done": np.zeros(32, bool),
    }
    t0, n = time.perf_counter(), 0
    while not stop.is_set():
        t.insert_batch(batch)
        n += 32
        if rate is not None:
            time.sleep(max(0.0, t0 + n / rate - time.perf_counter()))
    client.close()


def _fill(table, n: int) -> None:
    rng = np.random.default_rng(0)
    batch = {
        "obs": rng.integers(0, 255, (256, 84, 84, 4), dtype=np.uint8),
        "action": np.arange(256),
        "reward": np.ones(256, np.float32),
        "done": np.zeros(256, bool),
    }
    for start in range(0, n, 256):
        k = min(256, n - start)
        table.insert_batch({f: v[:k] for f, v in batch.items()})
    table.flush()


def _inserted(core: TableCore) -> int:
    return int(core.ctrl[Ctrl.TOTAL_INSERTED])


def bench_table(items: int, directory: Path) -> None:
    need = int(items * W2_ROW_BYTES * 1.5)
    free = shutil.disk_usage(directory).free
    if free < need:
        emit(
            {
                "workload": "checkpoint",
                "skipped": f"{directory} has {free / 1e9:.1f} GB free, the run needs "
                f"{need / 1e9:.1f} GB; pass --dir or --quick",
            }
        )
        return
    with (
        DaemonProcess("\n" + table_toml(max_size=items, signature=W2_SIG)) as d,
        shmreplay.attach(d.name) as client,
    ):
        table = client.table("replay")
        core = table.core
        _fill(table, items)
        work = Path(tempfile.mkdtemp(prefix="shmreplay-bench-ckpt-", dir=directory))
        try:
            # The reference and the checkpoint, interleaved (the disk's speed drifts).
            copies, writes, report = [], [], None
            for _ in range(2):
                shutil.rmtree(work / "ckpt", ignore_errors=True)
                report = write_checkpoint({"replay": core}, work / "ckpt", keep=1)
                writes.append(report.bytes / report.seconds / 1e9)
                copies.append(report.bytes / file_copy(core.data["obs"], report.bytes, work) / 1e9)
            emit(
                {
                    "workload": "checkpoint",
                    "mode": "file_copy",
                    "GB": round(report.bytes / 1e9, 3),
                    "GB_per_s": round(max(copies), 3),
                    "runs": [round(x, 3) for x in copies],
                }
            )
            emit(
                {
                    "workload": "checkpoint",
                    "mode": "write",
                    "items": report.items["replay"],
                    "GB": round(report.bytes / 1e9, 3),
                    "GB_per_s": round(max(writes), 3),
                    "runs": [round(x, 3) for x in writes],
                    "ratio_to_file_copy": round(max(writes) / max(copies), 2),
                    "goal_ratio": 0.7,
                    "max_lock_ms": round(report.max_lock_s * 1e3, 3),
                }
            )

            t0 = time.perf_counter()
            path = latest_checkpoint(work / "ckpt")
            verify_s = time.perf_counter() - t0
            checkpoint = read_checkpoint(path)
            with local_table(core.spec, "bench") as target:
                restored = restore_table(target, checkpoint)
            emit(
                {
                    "workload": "checkpoint",
                    "mode": "verify",
                    "GB_per_s": round(report.bytes / verify_s / 1e9, 3),
                    "seconds": round(verify_s, 3),
                    "page_cache": "warm",
                }
            )
            emit(
                {
                    "workload": "checkpoint",
                    "mode": "restore",
                    "items": restored.items,
                    "GB_per_s": round(restored.bytes / restored.seconds / 1e9, 3),
                    "seconds": round(restored.seconds, 3),
                    "page_cache": "warm",
                }
            )

            for rate in (None, PACED_RATE):
                _under_writer(d.name, core, work, rate)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _under_writer(instance: str, core: TableCore, work: Path, rate: float | None) -> None:
    """A checkpoint while a writer process inserts into the full table (each insert evicts)."""
    stop = CTX.Event()
    writer = CTX.Process(target=_writer, args=(instance, stop, rate))
    writer.start()
    try:
        time.sleep(2.0)  # the writer attached and its pages are mapped
        n0, t0 = _inserted(core), time.perf_counter()
        time.sleep(1.0)
        before = (_inserted(core) - n0) / (time.perf_counter() - t0)
        shutil.rmtree(work / "ckpt", ignore_errors=True)
        n0 = _inserted(core)
        report = write_checkpoint({"replay": core}, work / "ckpt", keep=1)
        during = (_inserted(core) - n0) / report.seconds
    finally:
        stop.set()
        writer.join(30)
        if writer.is_alive():
            writer.kill()
    emit(
        {
            "workload": "checkpoint",
            "mode": "write_under_writer",
            "writer": "full speed" if rate is None else f"paced at {rate} items/s",
            "items": report.items["replay"],
            "dropped": report.dropped["replay"],
            "GB_per_s": round(report.bytes / report.seconds / 1e9, 3),
            "max_lock_ms": round(report.max_lock_s * 1e3, 3),
            "goal_max_lock_ms": 5,
            "writer_inserts_per_s_before": round(before),
            "writer_inserts_per_s_during": round(during),
        }
    )


def bench_metadata_lock(directory: Path, kind: str, repeats: int = 3) -> None:
    """The mutex hold of a checkpoint of 1M small items: the per-slot metadata copy."""
    n = 1_000_000
    spec = TableSpec("lock", n, W1_FIELDS, sampler=SelectorSpec(kind))
    with local_table(spec, "bench") as core:
        while int(core.ctrl[Ctrl.SIZE]) < n:  # commit as the daemon does, 8192 at a time
            with core.mutex:
                core.commit(core.lease(0, min(8192, n - int(core.ctrl[Ctrl.SIZE]))))
        work = Path(tempfile.mkdtemp(prefix="shmreplay-bench-ckpt-", dir=directory))
        try:
            holds, seconds = [], []
            for _ in range(repeats):
                report = write_checkpoint({"lock": core}, work, keep=1)
                holds.append(report.max_lock_s * 1e3)
                seconds.append(report.seconds)
            # The same from a thread while this one runs Python (a daemon's commit loop at its
            # busiest): inside the critical section every numpy call that released the GIL
            # waits to take it back, up to sys.getswitchinterval() each time.
            threaded = []
            for _ in range(repeats):
                result: list = []
                th = threading.Thread(
                    target=lambda out=result: out.append(
                        write_checkpoint({"lock": core}, work, keep=1)
                    )
                )
                th.start()
                spins = 0
                while th.is_alive():
                    spins += 1
                th.join()
                threaded.append(result[0].max_lock_s * 1e3)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    emit(
        {
            "workload": "checkpoint",
            "mode": "metadata_lock_1M",
            "sampler": kind,
            "slots": spec.num_slots,
            "lock_ms_median": round(statistics.median(holds), 3),
            "lock_ms_max": round(max(holds), 3),
            "checkpoint_s": round(statistics.median(seconds), 3),
            "in_thread_busy_main_lock_ms_max": round(max(threaded), 3),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a ~200 MB table instead of ~2 GB")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    emit({"reference": "disk", "dir": str(args.dir), "cpus": os.cpu_count()})
    bench_table(QUICK_ITEMS if args.quick else FULL_ITEMS, args.dir)
    for kind in ("uniform", "min_heap"):
        bench_metadata_lock(args.dir, kind)


if __name__ == "__main__":
    main()
