"""Checkpoints: save every table's items to a directory, restore them into fresh tables.

A checkpoint is a directory ``<dir>/checkpoint-<UTC yyyymmddThhmmssZ>-<counter>/`` holding::

    manifest.json                  format version, time, and per table: its spec, counters,
                                   item count and, for every file, name, dtype, shape, crc32
    <table>.meta.key.npy           uint64  the items' keys            (one entry per item,
    <table>.meta.priority.npy      float64 their priorities            sorted by insertion
    <table>.meta.times_sampled.npy int32                               order)
    <table>.meta.seq.npy           int64   insertion sequence numbers
    <table>.meta.touch.npy         int64   heap tie-break order (only from a heap selector)
    <table>.data.<field>.npy       one row per item, per signature field

The arrays are plain ``.npy`` files (``np.load(f, allow_pickle=False)`` reads them; nothing is
pickled). A file's crc32 is that of its array's bytes, ``zlib.crc32(np.load(f))``; the ``.npy``
header is checked by parsing it against the manifest's dtype and shape. The manifest carries a
crc32 of its own canonical JSON (``checksum``). Rate-limiter bounds may be infinite: the manifest
spells them ``Infinity`` as Python's json module does.

Writing (:func:`write_checkpoint`) goes to ``<dir>/.tmp-checkpoint-...`` first; every file is
fsynced, the directory is renamed into place and its parent fsynced, so a checkpoint directory
is complete or absent. Then all but the newest ``keep`` are deleted. A temp directory left by a
crash is never read and is removed by the next write. Writers of one directory take turns
(``<dir>/.lock``).

Consistency without stalling. Per table::

    mutex held (~4 ms per million slots): copy the per-slot key, priority, times_sampled and
        generation arrays (and heap touches), the READY mask and the control counters
    mutex free: read the READY slots' seq and sort them by it (insertion order); copy their
        data rows in chunks of CHUNK_BYTES with the sampler's seqlock read (TableCore._engine
        .gather, csrc/sample.c: the rows, an acquire fence, each chunk's generations re-read):
        a changed one means the slot was rewritten during the copy (its item was evicted or
        deleted after the snapshot and a writer started on the slot), so the row is dropped
        from the checkpoint and counted (CheckpointReport.dropped).

The snapshot is an instant of the table's life (counters and items agree); a dropped row cannot
be copied again because its item no longer exists. Items are copied oldest first, so under a
Fifo remover the copy runs ahead of the evictions as long as it is faster than the writers. A
writer makes a slot's generation odd and then issues a release fence before it writes the slot's
data (and before the slot can be committed again, which is when its seq changes); the copy
issues an acquire fence between the rows and the generations it re-reads, which pairs with the
writer's fence, so on any architecture a copy that saw any byte of new data also sees the
generation moved (the sampler's seqlock, docs/memory-ordering.md). The seq and episode words,
read after the unlock, are loads before that fence too.

Called from a thread of a process whose other threads run Python, every numpy call inside the
critical section that released the GIL may wait up to ``sys.getswitchinterval()`` (5 ms) to
take it back while the mutex is held; a thread that blocks on the table mutex meanwhile releases
the GIL, so the hold stays short when the other threads are the table's users.

Restoring (:func:`restore_table`) writes the rows into the slots they came from (keys encode
their slot, so keys stay valid), then under the mutex sets the per-slot metadata and the
counters and rebuilds every derived structure with ``TableCore.repair()``. Tables are restored
into the *current* configuration: a different signature is refused, a smaller ``max_size`` is
refused unless ``truncate`` (keep the newest items), other spec changes are applied and listed
in the report.

Reading trusts nothing a checksum alone vouches for (whoever can write the directory can
recompute one): files are opened by plain name relative to the checkpoint directory, without
following symbolic links and without blocking, and must be regular files; every file's dtype
and shape must be those of the format and of the table's signature (never an object array);
the per-item metadata must hold values a table can have (priorities finite and >= 0,
times_sampled >= 0, distinct keys naming distinct slots, increasing sequence numbers, episodes
whose first step is not after their last). A checkpoint that fails is skipped by
:func:`latest_checkpoint` with a warning, as a damaged one is. Priorities above the restored
table's ``max_priority`` are lowered to it, and the restore report says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import queue
import re
import shutil
import stat
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..config import TableSpec
from ..engine.layout import Ctrl, SlotState
from ..engine.selectors.heap import Heap
from ..engine.shm import format_bytes
from ..engine.table import SLOT_MASK, TAG_SHIFT, TableCore
from ..errors import CheckpointError, InvalidArgumentError, LockTimeout

logger = logging.getLogger("shmreplay")

FORMAT = "shmreplay-checkpoint"
FORMAT_VERSION = 2  # 2: episode metadata and counter
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
# A checkpoint waits this long at most for each table's lock: a process stopped while holding
# it (SIGSTOP, a debugger) fails the checkpoint, naming its pid, instead of holding up a stop.
LOCK_TIMEOUT_S = 10.0
TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(r"^checkpoint-(\d{8}T\d{6}Z)-(\d{6,})$")
# Rows are copied in chunks of about this many bytes: a recycled slot costs only its own row,
# and each chunk is one large write. 8 MiB is ~300 Atari rows; writes of a few MiB already run
# at the disk's speed.
CHUNK_BYTES = 8 << 20
# Chunks copied ahead of the background writer: the copy of one overlaps the write of another.
PIPELINE_DEPTH = 3
READ_BYTES = 16 << 20  # restore and verify read files in pieces of this size
PROGRESS_INTERVAL_S = 5.0  # a long checkpoint or restore reports a line this often
# Counters saved and restored (SIZE, UNIQUE_SAMPLED and the free ring are derived by repair()).
_COUNTERS = {
    "inserts": Ctrl.INSERTS,
    "samples": Ctrl.SAMPLES,
    "deletes": Ctrl.DELETES,
    "size": Ctrl.SIZE,
    "seq": Ctrl.SEQ,
    "episodes": Ctrl.EPISODES,
    "unique_sampled": Ctrl.UNIQUE_SAMPLED,
    "total_inserted": Ctrl.TOTAL_INSERTED,
    "total_sampled": Ctrl.TOTAL_SAMPLED,
    "total_evicted": Ctrl.TOTAL_EVICTED,
    "resets": Ctrl.RESETS,
}
_META = {  # per-item metadata files: name → dtype
    "key": np.uint64,
    "priority": np.float64,
    "times_sampled": np.int32,
    "seq": np.int64,
    "episode": np.int64,
    "episode_first": np.int32,
    "episode_last": np.int32,
}


@contextlib.contextmanager
def _short_gil_slices() -> Iterator[None]:
    """While a table lock is held: each numpy copy releases the GIL, and another thread of the
    process (the daemon's commit loop) then keeps it for up to sys.getswitchinterval() (5 ms)
    before we get it back. Shorter slices keep the lock hold near the copy time."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointReport:
    """What :func:`write_checkpoint` did."""

    path: Path
    bytes: int  # total size of the files written
    seconds: float
    items: dict[str, int]  # per table: items saved
    dropped: dict[str, int]  # per table: rows dropped because their slot was recycled meanwhile
    max_lock_s: float  # the longest time any table mutex was held
    removed: tuple[Path, ...] = ()  # older checkpoints deleted (keep)

    def summary(self) -> str:
        """One line for the log."""
        tables = ", ".join(
            f"{n} {k} items" + (f" ({self.dropped[n]} dropped)" if self.dropped[n] else "")
            for n, k in self.items.items()
        )
        rate = self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        return (
            f"checkpoint {self.path} written: {format_bytes(self.bytes)} in {self.seconds:.2f} s "
            f"({rate:.2f} GB/s), longest lock hold {self.max_lock_s * 1e3:.1f} ms; {tables}"
        )


@dataclass(frozen=True)
class RestoreReport:
    """What :func:`restore_table` did."""

    table: str
    checkpoint: Path
    items: int  # items restored
    truncated: int  # oldest items left out to fit max_size
    rekeyed: int  # items moved to another slot (their keys changed): the table has fewer slots
    restored: tuple[str, ...]  # what was restored
    notes: tuple[str, ...]  # how the table's spec differs from the checkpoint's
    seconds: float
    bytes: int

    def summary(self) -> str:
        """One line for the log."""
        extra = []
        if self.truncated:
            extra.append(f"{self.truncated} oldest left out (truncate)")
        if self.rekeyed:
            extra.append(f"{self.rekeyed} moved to new slots with new keys")
        extra.extend(self.notes)
        tail = f" ({'; '.join(extra)})" if extra else ""
        return (
            f"table {self.table!r}: restored {self.items} items from {self.checkpoint} "
            f"[{', '.join(self.restored)}] in {self.seconds:.2f} s{tail}"
        )


@dataclass(frozen=True)
class FileEntry:
    """One array file of a checkpoint, as the manifest describes it."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    crc32: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class TableCheckpoint:
    """One table in a checkpoint. Arrays are read lazily (memory-mapped, read-only)."""

    name: str
    spec: TableSpec
    items: int
    dropped: int
    counters: dict[str, int]
    max_tag: int  # the highest key tag the table had handed out at the snapshot
    files: dict[str, FileEntry]  # "meta.key", ..., "data.<field>"
    directory: Path

    def array(self, what: str) -> np.ndarray:
        """The array ``what`` ("meta.key", "data.obs", ...), memory-mapped read-only. Its
        header is checked against the manifest as it is opened (a regular file inside the
        checkpoint directory only: see :func:`_open_member`); its crc32 by verify() or a
        restore. Raises CheckpointError."""
        entry = self.files[what]
        with _open_array(self.directory, entry) as (fh, offset):
            if entry.nbytes == 0:  # mmap refuses an empty mapping
                return np.empty(entry.shape, np.dtype(entry.dtype))
            return np.memmap(fh, np.dtype(entry.dtype), "r", offset, entry.shape)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read by :func:`read_checkpoint`: its manifest and lazy access to arrays."""

    path: Path
    created: str
    tables: dict[str, TableCheckpoint]

    def table(self, name: str) -> TableCheckpoint:
        try:
            return self.tables[name]
        except KeyError:
            raise CheckpointError(
                f"checkpoint {self.path} has no table {name!r} (it has: "
                f"{', '.join(self.tables) or 'none'})"
            ) from None

    def verify(self, progress: Callable[[str], None] | None = None) -> None:
        """Check the crc32 of every array file (reads all of them). Raises CheckpointError."""
        ticker = _Ticker(progress)
        for t in self.tables.values():
            for entry in t.files.values():
                crc = 0
                for piece in _read_payload(t.directory / entry.file, entry):
                    crc = zlib.crc32(piece, crc)
                    ticker.tick(lambda e=entry: f"verifying {self.path.name}: {e.file}")
                _check_crc(self.path, entry, crc)


# -- writing -----------------------------------------------------------------------------------


def write_checkpoint(
    cores: Mapping[str, TableCore],
    directory: str | Path,
    keep: int = 3,
    *,
    progress: Callable[[str], None] | None = None,
    gid: int | None = None,
) -> CheckpointReport:
    """Save every table of ``cores`` into a new checkpoint under ``directory``; keep the newest
    ``keep`` checkpoints there and delete older ones.

    Checkpoints hold every item, so they are as private as the tables: directories 0700 and
    files 0600, or with ``gid`` (the daemon's ``[server] group``) 0750 and 0640 owned by that
    group. ``directory`` gets the same mode when this call creates it; an existing one keeps
    its own (the operator's choice).

    Blocks until the checkpoint is complete on disk (fsynced). Each table's mutex is held only to
    copy its per-slot metadata (about 4 ms per million slots); data rows are copied without it, so
    inserts and samples go on meanwhile. Rows recycled during their copy are dropped and counted.
    Waits for another writer of the same directory to finish first. Raises CheckpointError
    (nothing is left behind) when the disk is full or the directory is not writable.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InvalidArgumentError(f"keep must be an integer ≥ 1, got {keep!r}")
    directory = Path(directory)
    perms = _Perms(gid)
    t0 = time.perf_counter()
    try:
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            perms.directory(directory)
        with _directory_lock(directory):
            _remove_temp_dirs(directory)
            _check_space(cores.values(), directory, keep)
            final, tables, max_lock = _write_new(cores, directory, progress, perms)
            removed = _prune(directory, keep)
    except OSError as exc:
        hint = (
            f"free space in {directory}, lower checkpoint_keep (now {keep}) or choose another "
            "checkpoint_dir"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check that the checkpoint_dir exists and is writable by the daemon's user"
        )
        raise CheckpointError(f"cannot write a checkpoint in {directory}: {exc}; {hint}") from exc
    return CheckpointReport(
        path=final,
        bytes=sum(p.stat().st_size for p in final.iterdir()),
        seconds=time.perf_counter() - t0,
        items={n: t["items"] for n, t in tables.items()},
        dropped={n: t["dropped"] for n, t in tables.items()},
        max_lock_s=max_lock,
        removed=removed,
    )


@dataclass(frozen=True)
class _Perms:
    """Modes and group of what a checkpoint write creates (see write_checkpoint)."""

    gid: int | None

    @property
    def file_mode(self) -> int:
        return 0o600 if self.gid is None else 0o640

    def directory(self, path: Path) -> None:
        os.chmod(path, 0o700 if self.gid is None else 0o750)  # mkdir's mode= meets the umask
        if self.gid is not None:
            os.chown(path, -1, self.gid)

    def create(self, path: Path) -> int:
        """A new file (it must not exist), with its mode and group; returns its descriptor."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.file_mode)
        try:
            os.fchmod(fd, self.file_mode)
            if self.gid is not None:
                os.fchown(fd, -1, self.gid)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _write_new(
    cores: Mapping[str, TableCore],
    directory: Path,
    progress: Callable[[str], None] | None,
    perms: _Perms,
) -> tuple[Path, dict[str, dict], float]:
    """Write a checkpoint under a temp name, then rename it into place (lock held). Returns its
    path, the manifest's tables and the longest mutex hold. Removes the temp dir on failure."""
    name = _new_name(directory)
    tmp = directory / (TMP_PREFIX + name)
    final = directory / name
    tmp.mkdir(mode=0o700)
    try:
        perms.directory(tmp)
        tables, max_lock = {}, 0.0
        for core in cores.values():
            tables[core.name], lock_s = _write_table(core, tmp, progress, perms)
            max_lock = max(max_lock, lock_s)
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        _write_manifest(tmp, created, tables, perms)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, tables, max_lock


@dataclass
class _Snapshot:
    """A table's items at one instant: slots sorted by insertion order and their metadata."""

    slots: np.ndarray
    meta: dict[str, np.ndarray]  # "key", "priority", "times_sampled", "seq", maybe "touch"
    gen: np.ndarray
    counters: dict[str, int]
    max_tag: int
    lock_s: float


def _heap_of(core: TableCore) -> Heap | None:
    """A heap selector of the table (sampler first): its touches order ties."""
    for sel in (core.sampler, core.remover):
        if isinstance(sel, Heap):
            return sel
    return None


def _snapshot(core: TableCore) -> _Snapshot:
    """Copy the per-slot metadata under the mutex: whole arrays into buffers faulted in before
    the lock is taken (a page fault costs µs on a VM; the copies run at memcpy speed).

    Sequence numbers are read after the unlock: a READY slot's seq changes only when the slot is
    committed again, after a writer changed its generation, so a seq read late belongs to the
    snapshot's item whenever the generation re-read after the row copy is unchanged. That keeps
    8 bytes per slot (~1 ms per million slots) out of the critical section.
    """
    n = core.num_slots
    heap = _heap_of(core)
    sources = {
        "key": core.key,
        "priority": core.priority,
        "times_sampled": core.times_sampled,
        "gen": core.gen,
    }
    if heap is not None:
        sources["touch"] = heap.touch[:n]  # the leaves: slot s's touch
    copies = {k: np.ones(n, v.dtype) for k, v in sources.items()}  # ones: faults the pages in
    ready = np.ones(n, bool)
    try:
        core.mutex.acquire(LOCK_TIMEOUT_S)
    except LockTimeout:
        raise LockTimeout(
            f"checkpoint of table {core.name!r}: its lock has been held by pid "
            f"{core.mutex.owner_pid} for more than {LOCK_TIMEOUT_S:.0f} s (a stopped process, "
            "a debugger?); resume or end that process; the previous checkpoint is intact"
        ) from None
    with contextlib.ExitStack() as held:
        held.callback(core.mutex.release)
        held.enter_context(_short_gil_slices())
        t0 = time.perf_counter()
        for k, src in sources.items():
            np.copyto(copies[k], src)
        np.equal(core.state, SlotState.READY, out=ready)
        ctrl = core.ctrl.copy()
        lock_s = time.perf_counter() - t0
    slots = np.flatnonzero(ready)
    seq = core.seq[slots]
    order = np.argsort(seq, kind="stable")
    slots = slots[order]
    meta = {k: copies[k][slots] for k in copies if k != "gen"}
    meta["seq"] = seq[order]
    # Like seq, written before the item was published and stable until its slot is recycled,
    # which the generation check after the row copy catches.
    meta["episode"] = core.episode[slots]
    meta["episode_first"] = core.episode_steps[slots, 0]
    meta["episode_last"] = core.episode_steps[slots, 1]
    return _Snapshot(
        slots=slots,
        meta=meta,
        gen=copies["gen"][slots],
        counters={k: int(ctrl[i]) for k, i in _COUNTERS.items()},
        max_tag=int(copies["key"].max() >> TAG_SHIFT) if n else 0,
        lock_s=lock_s,
    )


def _write_table(
    core: TableCore, tmp: Path, progress: Callable[[str], None] | None, perms: _Perms
) -> tuple[dict, float]:
    """Write one table's files into ``tmp``; returns (manifest entry, mutex hold seconds)."""
    snap = _snapshot(core)
    n = len(snap.slots)
    fields = core.spec.signature
    row_bytes = max(1, core.spec.row_bytes)
    rows_per_chunk = max(1, CHUNK_BYTES // row_bytes)
    intact = np.ones(n, bool)
    crcs = {f.name: 0 for f in fields}
    files = {f.name: f"{core.name}.data.{f.name}.npy" for f in fields}
    headers = {f.name: _npy_header(f.np_dtype, (n, *f.shape)) for f in fields}
    fds: dict[str, int] = {}
    pool: queue.Queue = queue.Queue()
    for _ in range(PIPELINE_DEPTH + 1):
        pool.put({f.name: np.empty((rows_per_chunk, *f.shape), f.np_dtype) for f in fields})
    ok_buf = np.empty(min(n, rows_per_chunk), np.bool_)
    writer = _BackgroundWriter(PIPELINE_DEPTH * len(fields))
    ticker = _Ticker(progress)
    kept = 0
    try:
        for f in fields:
            fds[f.name] = perms.create(tmp / files[f.name])
            _write_all(fds[f.name], headers[f.name])
        for start in range(0, n, rows_per_chunk):
            slots = snap.slots[start : start + rows_per_chunk]
            k = len(slots)
            bufs = pool.get()  # blocks while the writer is PIPELINE_DEPTH chunks behind
            # The sampler's seqlock read (csrc/sample.c, GIL released): the rows, an acquire
            # fence, the generations re-read; a slot whose generation moved was rewritten
            # meanwhile and its row is not intact.
            ok = ok_buf[:k]
            outs = tuple([bufs[name][:k] for name in core.data])
            m = core._engine.gather(slots, snap.gen[start : start + k], outs, None, ok)
            if m != k:
                intact[start : start + k] = ok
                for f in fields:
                    bufs[f.name][:m] = bufs[f.name][:k][ok]
            for i, f in enumerate(fields):
                rows = bufs[f.name][:m]
                crcs[f.name] = zlib.crc32(rows, crcs[f.name])
                last = i == len(fields) - 1
                writer.submit(fds[f.name], rows, (lambda b=bufs: pool.put(b)) if last else None)
            kept += m
            ticker.tick(
                lambda s=start + k: f"checkpoint: table {core.name!r}: {s}/{n} items copied"
            )
        writer.close()
        for f in fields:  # the real row count, now that the dropped rows are known
            header = _npy_header(f.np_dtype, (kept, *f.shape), len(headers[f.name]))
            os.pwrite(fds[f.name], header, 0)
            os.fsync(fds[f.name])
    finally:
        writer.close(raise_error=False)
        for fd in fds.values():
            os.close(fd)

    entries: dict[str, dict] = {}
    for f in fields:
        entries[f"data.{f.name}"] = {
            "file": files[f.name],
            "dtype": f.np_dtype.name,
            "shape": [kept, *f.shape],
            "crc32": crcs[f.name],
        }
    for what, values in snap.meta.items():
        arr = np.ascontiguousarray(values[intact])
        entries[f"meta.{what}"] = _save_array(tmp, f"{core.name}.meta.{what}.npy", arr, perms)
    entry = {
        "spec": core.spec.to_dict(),
        "items": kept,
        "dropped": n - kept,
        "counters": snap.counters,
        "max_tag": snap.max_tag,
        "files": entries,
    }
    return entry, snap.lock_s


def _save_array(directory: Path, name: str, arr: np.ndarray, perms: _Perms) -> dict:
    with os.fdopen(perms.create(directory / name), "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    return {"file": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "crc32": _crc(arr)}


def _crc(arr: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))


def _write_manifest(tmp: Path, created: str, tables: dict, perms: _Perms) -> None:
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": created,
        "tables": tables,
    }
    body["checksum"] = zlib.crc32(_canonical(body))
    text = json.dumps(body, indent=1).encode()
    with os.fdopen(perms.create(tmp / MANIFEST), "wb") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _npy_header(dtype: np.dtype, shape: tuple[int, ...], size: int | None = None) -> bytes:
    """A version 1.0 ``.npy`` header, padded to ``size`` bytes if given.

    Data files are written before the number of rows is final (dropped rows), then the header
    is rewritten in place: its padding absorbs a shorter shape."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf,
        {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape},
    )
    head = buf.getvalue()
    if size is None or len(head) == size:
        return head
    if len(head) > size:
        raise CheckpointError(f"npy header for shape {shape} does not fit in {size} bytes")
    head = head[:-1] + b" " * (size - len(head)) + b"\n"
    return head[:8] + struct.pack("<H", size - 10) + head[10:]


class _BackgroundWriter:
    """Writes buffers to files in a thread of its own, in the order submitted, so that copying
    the next chunk (numpy, GIL released) overlaps writing this one (os.write, GIL released).

    ``done`` callbacks run after their write (or after a failed one: the producer must not wait
    for buffers forever); the first error is raised by the next submit() or by close().
    """

    def __init__(self, depth: int) -> None:
        self._todo: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="shmreplay-checkpoint-writer", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            fd, data, done = item
            if self.error is None:
                try:
                    _write_all(fd, data)
                except BaseException as exc:  # reported to the producer
                    self.error = exc
            if done is not None:
                done()

    def submit(self, fd: int, data: np.ndarray, done: Callable[[], None] | None) -> None:
        if self.error is not None:
            raise self.error
        self._todo.put((fd, data, done))

    def close(self, raise_error: bool = True) -> None:
        """Wait until everything submitted is written. Idempotent."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None
        if raise_error and self.error is not None:
            raise self.error


def _write_all(fd: int, data: bytes | np.ndarray) -> None:
    if isinstance(data, np.ndarray):
        data = data.reshape(-1).view(np.uint8)  # a byte view (a 0-row chunk has a 0 in its shape)
    view = memoryview(data)
    while len(view):
        written = os.write(fd, view)  # Linux writes at most ~2 GiB per call
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """Writers of one checkpoint directory take turns (flock on ``<dir>/.lock``)."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_temp_dirs(directory: Path) -> None:
    """Remove partial checkpoints left by a crash (we hold the lock: no write is in progress)."""
    for p in directory.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.is_dir():
            logger.warning("removing partial checkpoint %s (a checkpoint write was interrupted)", p)
            shutil.rmtree(p, ignore_errors=True)


def _check_space(cores: Iterable[TableCore], directory: Path, keep: int) -> None:
    need = 0
    for core in cores:
        per_item = core.spec.row_bytes + sum(np.dtype(t).itemsize for t in _META.values()) + 8
        need += int(core.ctrl[Ctrl.SIZE]) * per_item + 4096
    free = shutil.disk_usage(directory).free
    if need > free:
        raise CheckpointError(
            f"a checkpoint needs about {format_bytes(need)} but {directory} has "
            f"{format_bytes(free)} free (the newest {keep} checkpoint(s) plus the one being "
            "written must fit); free space, lower checkpoint_keep or choose another "
            "checkpoint_dir"
        )


def _checkpoints(directory: Path, links: bool = False) -> list[Path]:
    """Complete checkpoints (final names: a rename made them), oldest first, by counter.
    Symbolic links are none (they would be read from outside ``directory``) unless ``links``
    (to number a new checkpoint above them)."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for p in directory.iterdir():
            m = _NAME_RE.match(p.name)
            if m and p.is_dir() and (links or not p.is_symlink()):
                found.append((int(m.group(2)), p.name, p))
    return [p for _, _, p in sorted(found)]


def _new_name(directory: Path) -> str:
    """checkpoint-<UTC time>-<counter>; the counter orders checkpoints even if the clock jumps
    back, and tells apart two taken in the same second."""
    existing = _checkpoints(directory, links=True)
    counter = int(_NAME_RE.match(existing[-1].name).group(2)) + 1 if existing else 1
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"checkpoint-{stamp}-{counter:06d}"


def _prune(directory: Path, keep: int) -> tuple[Path, ...]:
    old = _checkpoints(directory)[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return tuple(old)


class _Ticker:
    """Calls ``progress`` with a line at most every PROGRESS_INTERVAL_S."""

    def __init__(self, progress: Callable[[str], None] | None) -> None:
        self.progress = progress
        self.next = time.monotonic() + PROGRESS_INTERVAL_S

    def tick(self, line: Callable[[], str]) -> None:
        if self.progress is not None and time.monotonic() >= self.next:
            self.progress(line())
            self.next = time.monotonic() + PROGRESS_INTERVAL_S


# -- reading -----------------------------------------------------------------------------------


def latest_checkpoint(directory: str | Path, *, log: logging.Logger | None = None) -> Path | None:
    """The newest complete, intact and valid checkpoint in ``directory`` (None if there is
    none).

    Reads every file of the candidates it checks (crc32, and the values of the per-item
    metadata: see :func:`read_checkpoint`): a damaged, partial or invalid checkpoint is skipped
    with a warning on ``log`` saying why, and the next older one tried. Blocks only on reading
    regular files (never on a FIFO or a device planted in a checkpoint).
    """
    log = log if log is not None else logger
    directory = Path(directory)
    with contextlib.suppress(FileNotFoundError):
        for p in directory.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_dir():
                log.warning(
                    "ignoring partial checkpoint %s (its write was interrupted or is still "
                    "running; the next checkpoint write removes it)",
                    p,
                )
            elif _NAME_RE.match(p.name) and p.is_symlink():
                log.warning(
                    "ignoring %s: a symbolic link, not a checkpoint directory (checkpoints are "
                    "read only from directories inside %s)",
                    p,
                    directory,
                )
    for path in reversed(_checkpoints(directory)):
        try:
            checkpoint = read_checkpoint(path)
            checkpoint.verify()
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint %s: %s", path, exc)
            continue
        except Exception as exc:  # an unforeseen defect must not stop the start: try older
            log.warning("skipping unreadable checkpoint %s (%s: %s)", path, type(exc).__name__, exc)
            continue
        return path
    return None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check a checkpoint's manifest, array headers and per-item metadata.

    Checks the manifest's own checksum and format version; that every file the manifest names
    is a regular file inside the checkpoint directory (a plain name: no ``/``, no ``..``; not a
    symbolic link, FIFO or device), with the dtype and shape the table's signature and the
    metadata format require and the size they imply; the crc32 of the (small) metadata files;
    and their values: priorities finite and ≥ 0, times_sampled ≥ 0 (and below
    max_times_sampled), keys distinct and naming distinct slots of the table, sequence numbers
    increasing, each episode's first step ≤ its last, counters ≥ 0. Data files are checksummed
    by :meth:`Checkpoint.verify` and, as they are copied, by :func:`restore_table`. Raises
    CheckpointError saying what is wrong.
    """
    path = Path(path)
    try:
        with _open_member(path, MANIFEST) as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read {MANIFEST}: {exc.strerror}") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is larger than any we write")
    try:
        body = json.loads(raw)
        checksum = body.pop("checksum")
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is damaged ({exc})") from exc
    if zlib.crc32(_canonical(body)) != checksum:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} checksum mismatch (damaged file)")
    if body.get("format") != FORMAT or body.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {body.get('format')!r} version "
            f"{body.get('format_version')!r}; this shmreplay reads {FORMAT!r} version "
            f"{FORMAT_VERSION}: restore it with the shmreplay version that wrote it"
        )
    tables = {}
    try:
        for name, t in body["tables"].items():
            files = {what: _file_entry(path, e) for what, e in t["files"].items()}
            tables[name] = TableCheckpoint(
                name=name,
                spec=TableSpec.from_dict(t["spec"]),
                items=int(t["items"]),
                dropped=int(t["dropped"]),
                counters={k: int(v) for k, v in t["counters"].items()},
                max_tag=int(t["max_tag"]),
                files=files,
                directory=path,
            )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is incomplete ({exc!r})") from exc
    for t in tables.values():
        _check_table_entry(path, t)
        for entry in t.files.values():
            with _open_array(path, entry):
                pass
        _load_meta(t)  # crc32 and values
    return Checkpoint(path=path, created=str(body.get("created")), tables=tables)


# The manifest of a checkpoint of a few tables is a few kB; a bound keeps a planted huge file
# from being read whole.
MAX_MANIFEST_BYTES = 64 << 20
# A key is (tag << 32) | slot; restore hands out max_tag + 1 to moved items.
_MAX_TAG = (1 << 32) - 2


def _file_entry(path: Path, e: dict) -> FileEntry:
    """A manifest's file entry, checked for what can be checked alone: a plain file name (no
    directory part: files are read from the checkpoint directory only), a numpy dtype that
    is not an object dtype, a shape of non-negative ints."""
    name = e["file"]
    if (
        not isinstance(name, str)
        or name in ("", ".", "..", MANIFEST, LOCK_FILE)
        or "/" in name
        or "\0" in name
    ):
        raise CheckpointError(
            f"checkpoint {path}: {MANIFEST} names the file {name!r}; a checkpoint's files are "
            "plain names inside its directory (no '/' or '..')"
        )
    try:
        dtype = np.dtype(e["dtype"])
    except TypeError as exc:
        raise CheckpointError(
            f"checkpoint {path}: {name}: {e['dtype']!r} is not a numpy dtype"
        ) from exc
    if dtype.hasobject:
        raise CheckpointError(f"checkpoint {path}: {name}: object arrays are never restored")
    shape = tuple(int(x) for x in e["shape"])
    if any(x < 0 for x in shape):
        raise CheckpointError(f"checkpoint {path}: {name}: shape {list(shape)} is negative")
    return FileEntry(name, dtype.name, shape, int(e["crc32"]))


def _check_table_entry(path: Path, t: TableCheckpoint) -> None:
    """A table's manifest entry against its own spec: its files are exactly those of the
    format, with the dtypes and shapes the metadata format and the signature give."""
    where = f"checkpoint {path}: table {t.name!r}"
    if t.spec.name != t.name:
        raise CheckpointError(f"{where}: its spec names table {t.spec.name!r}")
    if not 0 <= t.items <= t.spec.max_size or t.dropped < 0:
        raise CheckpointError(
            f"{where}: {t.items} items ({t.dropped} dropped), the table holds at most "
            f"{t.spec.max_size}"
        )
    if not 0 <= t.max_tag <= _MAX_TAG:
        raise CheckpointError(f"{where}: max_tag {t.max_tag} is out of range")
    missing = _COUNTERS.keys() - t.counters.keys()
    if missing:
        raise CheckpointError(f"{where}: counters lack {sorted(missing)}")
    bad = {k: v for k, v in t.counters.items() if not 0 <= v < 2**63}
    if bad:
        raise CheckpointError(f"{where}: counters out of range: {bad}")
    if t.counters["size"] < t.items:
        raise CheckpointError(
            f"{where}: counter size {t.counters['size']} is below its {t.items} items"
        )
    expected = {f"meta.{m}": (np.dtype(d), (t.items,)) for m, d in _META.items()}
    expected |= {f"data.{f.name}": (f.np_dtype, (t.items, *f.shape)) for f in t.spec.signature}
    optional = {"meta.touch": (np.dtype(np.int64), (t.items,))}
    missing = expected.keys() - t.files.keys()
    if missing:
        raise CheckpointError(f"{where} lacks {sorted(missing)}")
    for what, entry in t.files.items():
        want = expected.get(what) or optional.get(what)
        if want is None:
            raise CheckpointError(f"{where}: unknown file entry {what!r} ({entry.file})")
        dtype, shape = want
        if np.dtype(entry.dtype) != dtype or entry.shape != shape:
            if entry.shape[:1] != (t.items,):
                raise CheckpointError(
                    f"checkpoint {path}: {entry.file} holds {entry.shape[:1]} rows, the "
                    f"manifest says {t.items} items"
                )
            raise CheckpointError(
                f"checkpoint {path}: {entry.file} is {entry.dtype}{list(entry.shape)}; "
                f"{what} of table {t.name!r} must be {dtype.name}{list(shape)}"
                + (" (the table's signature)" if what.startswith("data.") else "")
            )


def _load_meta(t: TableCheckpoint) -> dict[str, np.ndarray]:
    """The per-item metadata of ``t``, copied into memory, after checking each file's crc32
    and the values (see :func:`read_checkpoint`) against the checkpoint's own spec."""
    meta = {}
    for what in t.files:
        if what.startswith("meta."):
            # read(), not a memory map: a file truncated under a mapping raises SIGBUS, which
            # no except clause catches (whoever owns a planted file can truncate it)
            entry = t.files[what]
            buf = bytearray()
            for piece in _read_payload(t.directory / entry.file, entry):
                buf += piece
            if len(buf) != entry.nbytes:
                raise CheckpointError(
                    f"checkpoint {t.directory}: {entry.file} changed while it was read"
                )
            _check_crc(t.directory, entry, zlib.crc32(buf))
            meta[what[len("meta.") :]] = np.frombuffer(buf, np.dtype(entry.dtype)).reshape(
                entry.shape
            )
    where = f"checkpoint {t.directory}: table {t.name!r}"

    def refuse(what: str, bad: np.ndarray, values: np.ndarray) -> None:
        i = int(np.flatnonzero(bad)[0])
        raise CheckpointError(
            f"{where}: {what} (item {i} of {t.items}: {values[i].item()!r}); the checkpoint was "
            "edited or written by a faulty process, and is not restored"
        )

    prio = meta["priority"]
    # Finite and >= 0 here; above the limit of the table restored into, restore_table lowers
    # them to it (checkpoints written before the limit existed may hold such priorities).
    bad = ~((prio >= 0.0) & (prio < np.inf))  # NaN fails both
    if bad.any():
        refuse("a priority is not a finite number >= 0", bad, prio)
    times = meta["times_sampled"]
    mts = t.spec.max_times_sampled
    bad = (times < 0) | ((times >= mts) if mts > 0 else False)
    if bad.any():
        top = f" and below max_times_sampled {mts}" if mts > 0 else ""
        refuse(f"times_sampled must be >= 0{top}", bad, times)
    keys = meta["key"]
    slots = keys & SLOT_MASK
    bad = (slots >= t.spec.num_slots) | ((keys >> TAG_SHIFT) > t.max_tag)
    if bad.any():
        refuse(f"a key names no slot of its {t.spec.num_slots} or a tag above max_tag", bad, keys)
    order = np.argsort(slots, kind="stable")
    dup = np.zeros(len(slots), bool)
    dup[order[1:]] = slots[order[1:]] == slots[order[:-1]]
    if dup.any():
        refuse("two items have the same slot (keys must be distinct)", dup, keys)
    seq = meta["seq"]
    bad = seq < 0
    bad[1:] |= seq[1:] <= seq[:-1]
    if bad.any():
        refuse("sequence numbers must be >= 0 and increasing (insertion order)", bad, seq)
    bad = meta["episode_first"] > meta["episode_last"]
    if bad.any():
        refuse("an episode's first step is after its last", bad, meta["episode_first"])
    return meta


@contextlib.contextmanager
def _open_member(directory: Path, name: str) -> Iterator[io.FileIO]:
    """Open the regular file ``name`` inside ``directory`` for reading, never anything else.

    ``name`` must be a plain name (no ``/``); it is opened relative to the directory's
    descriptor, without following a symbolic link (O_NOFOLLOW) and without blocking
    (O_NONBLOCK: opening a FIFO would wait for a writer), then must be a regular file (fstat).
    Raises CheckpointError otherwise, OSError when it cannot be opened.
    """
    if not name or "/" in name or name in (".", ".."):
        raise CheckpointError(f"checkpoint {directory}: {name!r} is not a plain file name")
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CheckpointError(
                    f"checkpoint {directory}: {name} is a symbolic link; a checkpoint's files "
                    "are read only as regular files inside its directory"
                ) from None
            raise
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(
                f"checkpoint {directory}: {name} is not a regular file (mode "
                f"{stat.filemode(st.st_mode)}); a checkpoint holds only regular files"
            )
        os.set_blocking(fd, True)
        fh = io.FileIO(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


@contextlib.contextmanager
def _open_array(path: Path, entry: FileEntry) -> Iterator[tuple[io.FileIO, int]]:
    """Open a checkpoint's array file (:func:`_open_member`), parse its .npy header against
    the manifest; yields the file and the payload's offset. Raises CheckpointError."""
    where = f"checkpoint {path}: {entry.file}"
    try:
        with _open_member(path, entry.file) as fh:
            try:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            except ValueError as exc:
                raise CheckpointError(f"{where}: not a valid .npy file ({exc})") from exc
            offset = fh.tell()
            size = os.fstat(fh.fileno()).st_size
            if fortran or tuple(shape) != entry.shape or dtype != np.dtype(entry.dtype):
                raise CheckpointError(
                    f"{where}: holds {dtype}{list(shape)}, the manifest says {entry.dtype}"
                    f"{list(entry.shape)} (damaged file)"
                )
            if size != offset + entry.nbytes:
                raise CheckpointError(
                    f"{where}: {size} bytes, expected {offset + entry.nbytes} (truncated or "
                    "damaged)"
                )
            yield fh, offset
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read: {exc.strerror}") from exc


def _check_crc(path: Path, entry: FileEntry, crc: int) -> None:
    if crc != entry.crc32:
        raise CheckpointError(
            f"checkpoint {path}: {entry.file} fails its crc32 check (damaged file); "
            "restore an older checkpoint"
        )


def _read_payload(path: Path, entry: FileEntry, piece: int = READ_BYTES) -> Iterator[memoryview]:
    """The array bytes of a checkpoint file, in pieces of ``piece`` bytes (the last may be
    shorter). Each piece is only valid until the next one is read."""
    with _open_array(path.parent, entry) as (fh, offset):
        fh.seek(offset)
        view = memoryview(bytearray(piece))
        while True:
            n = 0
            while n < piece:  # fill the piece: readinto may return less
                got = fh.readinto(view[n:])
                if not got:
                    break
                n += got
            if n:
                yield view[:n]
            if n < piece:
                return


# -- restoring ---------------------------------------------------------------------------------


def restore_table(
    core: TableCore,
    checkpoint: Checkpoint,
    *,
    truncate: bool = False,
    progress: Callable[[str], None] | None = None,
) -> RestoreReport:
    """Restore the table ``core.name`` of ``checkpoint`` into ``core``: a freshly initialized,
    empty table nobody else uses yet.

    Items keep their keys, priorities, times_sampled and insertion order; the rate-limiter and
    lifetime counters are restored (with the deletes counter raised by the items not restored,
    so that inserts − deletes is the table's size, as the limiter assumes). Items go back to
    the slot their key names; only when the table now has fewer slots are some moved to free
    slots, with new keys (``rekeyed`` in the report). Heap tie-break order is restored when the
    checkpoint came from a heap selector, else it follows insertion order.

    Raises CheckpointError, leaving the table empty, if the signature differs (naming the
    field), if the checkpoint holds more items than ``max_size`` and ``truncate`` is false (with
    truncate the newest ``max_size`` items are kept), or if a data file fails its checksum.
    Data rows are copied first, into slots that stay free (invisible) until the metadata is
    written under the mutex at the end. ``progress`` gets a line now and then.
    """
    t0 = time.perf_counter()
    tc = checkpoint.table(core.name)
    _check_signature(core, tc)
    busy = int(np.count_nonzero(core.state != SlotState.FREE))
    if busy:
        raise CheckpointError(
            f"table {core.name!r} is not empty ({busy} slots in use); restore only into a "
            "freshly created table, before clients attach"
        )
    n, max_size = tc.items, core.spec.max_size
    if n > max_size and not truncate:
        raise CheckpointError(
            f"checkpoint {checkpoint.path} holds {n} items for table {core.name!r} but its "
            f"max_size is now {max_size}; raise max_size to at least {n} in tables.toml, or "
            f"restore with --truncate to keep the newest {max_size}"
        )
    first = max(0, n - max_size)  # items are sorted by insertion order: drop the oldest
    # Read again and re-validated: the files may have changed since read_checkpoint.
    meta = {m: a[first:] for m, a in _load_meta(tc).items()}
    notes = _fit_current_spec(core, meta)
    keys = meta["key"]
    slots = (keys & SLOT_MASK).astype(np.int64)
    fresh_tag = np.uint64(tc.max_tag + 1)  # above every key the source handed out
    moved = slots >= core.num_slots
    if moved.any():
        free = np.ones(core.num_slots, bool)
        free[slots[~moved]] = False
        slots[moved] = np.flatnonzero(free)[: int(np.count_nonzero(moved))]
        keys[moved] = (fresh_tag << TAG_SHIFT) | slots[moved].astype(np.uint64)

    nbytes = _restore_rows(core, checkpoint, tc, slots, first, _Ticker(progress))

    restored = ["items", "keys", "priorities", "times_sampled", "insertion order", "counters"]
    with core.mutex:
        repairs = int(core.ctrl[Ctrl.REPAIRS])
        core.key[:] = (fresh_tag << TAG_SHIFT) | np.arange(core.num_slots, dtype=np.uint64)
        core.key[slots] = keys
        core.priority[slots] = meta["priority"]
        core.times_sampled[slots] = meta["times_sampled"]
        core.seq[slots] = meta["seq"]
        core.episode[slots] = meta["episode"]
        core.episode_steps[slots, 0] = meta["episode_first"]
        core.episode_steps[slots, 1] = meta["episode_last"]
        core.owner[slots] = -1
        core.state[slots] = SlotState.READY
        c = tc.counters
        lost = c["size"] - len(slots)  # dropped during the copy, or truncated
        core.ctrl[Ctrl.INSERTS] = c["inserts"]
        core.ctrl[Ctrl.SAMPLES] = c["samples"]
        core.ctrl[Ctrl.DELETES] = c["deletes"] + lost
        core.ctrl[Ctrl.TOTAL_INSERTED] = c["total_inserted"]
        core.ctrl[Ctrl.TOTAL_SAMPLED] = c["total_sampled"]
        core.ctrl[Ctrl.TOTAL_EVICTED] = c["total_evicted"] + first
        core.ctrl[Ctrl.RESETS] = c["resets"]
        core.ctrl[Ctrl.EPISODES] = c["episodes"]
        top = int(meta["seq"].max()) + 1 if len(slots) else 0
        core.ctrl[Ctrl.SEQ] = max(c["seq"], top)
        core.sampler.clear()
        core.remover.clear()
        if "touch" in meta and _restore_touches(core, meta["touch"], slots):
            restored.append("heap order")
        core.repair()  # selectors, free ring, size, unique_sampled from the per-slot truth
        core.ctrl[Ctrl.REPAIRS] = repairs
    return RestoreReport(
        table=core.name,
        checkpoint=checkpoint.path,
        items=len(slots),
        truncated=first,
        rekeyed=int(np.count_nonzero(moved)),
        restored=tuple(restored),
        notes=_spec_notes(tc.spec, core.spec) + notes,
        seconds=time.perf_counter() - t0,
        bytes=nbytes,
    )


def _fit_current_spec(core: TableCore, meta: dict[str, np.ndarray]) -> tuple[str, ...]:
    """Adapt valid metadata to the table's current spec (in place); returns notes for the
    report. Priorities above the table's max_priority (a larger priority_exponent or table
    lowers it; checkpoints written before the limit existed may hold them) are lowered to it:
    their items stay, the most likely to be drawn. A lower max_times_sampled: items sampled
    that often already may be sampled once more."""
    notes = []
    limit = core.max_priority
    high = meta["priority"] > limit
    if high.any():
        meta["priority"][high] = limit
        notes.append(
            f"{int(np.count_nonzero(high))} priorities above {limit!r}, the largest the table "
            "accepts now, were lowered to it"
        )
    mts = core.spec.max_times_sampled
    if mts > 0:
        over = meta["times_sampled"] >= mts
        if over.any():
            meta["times_sampled"][over] = mts - 1
            notes.append(
                f"{int(np.count_nonzero(over))} items sampled max_times_sampled ({mts}) times "
                "or more may be sampled once more"
            )
    return tuple(notes)


def _check_signature(core: TableCore, tc: TableCheckpoint) -> None:
    have = {f.name: f for f in core.spec.signature}
    saved = {f.name: f for f in tc.spec.signature}

    def describe(fields: dict) -> str:
        return ", ".join(f"{f.name}: {f.dtype}{list(f.shape)}" for f in fields.values())

    for name in sorted(have.keys() | saved.keys()):
        a, b = saved.get(name), have.get(name)
        if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
            what = (
                f"field {name!r} is not in the checkpoint"
                if a is None
                else f"field {name!r} is not in the table"
                if b is None
                else f"field {name!r} is {a.dtype}{list(a.shape)} in the checkpoint but "
                f"{b.dtype}{list(b.shape)} in the table"
            )
            raise CheckpointError(
                f"table {core.name!r}: the checkpoint's signature differs: {what} (checkpoint: "
                f"{describe(saved)}; table: {describe(have)}); restore into a table with the "
                "checkpoint's signature, or start without restoring"
            )


def _restore_rows(
    core: TableCore,
    checkpoint: Checkpoint,
    tc: TableCheckpoint,
    slots: np.ndarray,
    first: int,
    ticker: _Ticker,
) -> int:
    """Copy every field's rows ``first:`` into ``slots``, checking each file's crc32 on the way
    (the whole file is read, truncated rows included). Returns the bytes read."""
    total = 0
    for f in core.spec.signature:
        entry = tc.files[f"data.{f.name}"]
        dest = core.data[f.name]
        row = f.nbytes
        crc = 0
        index = 0  # rows of the file seen so far
        # Pieces of whole rows; a short read (none for a regular file before its end) is
        # completed by _read_payload.
        piece_bytes = max(1, READ_BYTES // row) * row
        for piece in _read_payload(checkpoint.path / entry.file, entry, piece_bytes):
            crc = zlib.crc32(piece, crc)
            total += len(piece)
            whole = len(piece) // row
            rows = np.frombuffer(piece, f.np_dtype).reshape(whole, *f.shape)
            lo, hi = max(index, first), index + whole
            if hi > lo:
                _scatter(dest, slots[lo - first : hi - first], rows[lo - index :])
            index = hi
            ticker.tick(lambda i=index: f"restore: table {core.name!r}: {i}/{tc.items} items")
        _check_crc(checkpoint.path, entry, crc)
    return total


def _scatter(dest: np.ndarray, slots: np.ndarray, rows: np.ndarray) -> None:
    """dest[slots] = rows, as one slice copy when the slots are consecutive (the common case:
    a table filled in order), else row by row in numpy."""
    if len(slots) and slots[-1] - slots[0] == len(slots) - 1 and (np.diff(slots) == 1).all():
        dest[slots[0] : slots[-1] + 1] = rows
    else:
        dest[slots] = rows


def _restore_touches(core: TableCore, touch: np.ndarray, slots: np.ndarray) -> bool:
    """Give heap selectors the saved tie-break order (ranks 1..n, the clock at n), which their
    rebuild() keeps; mutex held, selectors cleared. ``touch``: the checked metadata's, cut as
    ``slots`` are. False if the table has no heap."""
    ranks = np.empty(len(touch), np.int64)
    ranks[np.argsort(touch, kind="stable")] = np.arange(1, len(touch) + 1)
    found = False
    for sel in (core.sampler, core.remover):
        if isinstance(sel, Heap):
            sel.touch[slots] = ranks
            sel.arrays["clock"][0] = len(ranks)
            found = True
    return found


def _spec_notes(saved: TableSpec, now: TableSpec) -> tuple[str, ...]:
    """How the table's current spec differs from the checkpoint's (restored into the former)."""
    notes = []
    for attr in ("max_size", "sampler", "remover", "rate_limiter", "max_times_sampled"):
        a, b = getattr(saved, attr), getattr(now, attr)
        if a != b:
            if hasattr(a, "to_dict"):
                a, b = a.to_dict(), b.to_dict()
            notes.append(f"{attr} was {a} in the checkpoint, is {b} now")
    return tuple(notes)
