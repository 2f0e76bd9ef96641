"""Checkpoints edited with their checksums recomputed, and files planted in them.

A checksum only proves that a file is as the manifest says; someone who can write the
checkpoint directory can recompute it. Before these checks a restore took NaN or negative
priorities (then every sample raised a plain ValueError, or the daemon died), an object-dtype
``.npy`` stopped the start instead of falling back to the older checkpoint, a data file that was
a symbolic link to a FIFO hung the start, and an absolute ``file`` in the manifest was read from
outside the checkpoint. Now every such checkpoint is skipped with a warning saying why, and the
next older intact one is restored, within a bounded time.

Each edit goes through the checkpoint module's own checksum functions (``_crc``, ``_canonical``),
so only the validation of values, dtypes and files can catch it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import shmreplay
from shmreplay.config import FieldSpec, SelectorSpec, TableSpec
from shmreplay.daemon import checkpoint as cp
from shmreplay.daemon.checkpoint import CheckpointError, latest_checkpoint, read_checkpoint
from shmreplay.engine.instance import remove_shm_objects
from shmreplay.engine.layout import SlotState
from shmreplay.testing import (
    STAMPED_SIGNATURE,
    local_table,
    stamped_batch,
    stamped_row,
    table_toml,
    verify_stamped,
)

STAMPED = (
    FieldSpec("uid", (), "int64"),
    FieldSpec("obs", (16,), "float32"),
    FieldSpec("check", (), "uint32"),
)
SPEC = TableSpec(
    name="replay",
    max_size=200,
    signature=STAMPED,
    sampler=SelectorSpec("prioritized", 1.0),
    remover=SelectorSpec("fifo"),
    max_times_sampled=3,
)
# Seconds a start or a latest_checkpoint() may take here; a FIFO used to make it wait forever.
BOUND_S = 10.0


# -- editing a checkpoint as an attacker would: checksums recomputed ---------------------------


def _manifest(p: Path) -> dict:
    body = json.loads((p / cp.MANIFEST).read_text())
    body.pop("checksum")
    return body


def _save_manifest(p: Path, body: dict) -> None:
    body["checksum"] = zlib.crc32(cp._canonical(body))
    (p / cp.MANIFEST).write_text(json.dumps(body))


def _replace_array(p: Path, what: str, arr: np.ndarray) -> None:
    """Write ``arr`` as the file of ``what`` and make the manifest agree (dtype, shape, crc)."""
    body = _manifest(p)
    entry = body["tables"]["replay"]["files"][what]
    f = p / entry["file"]
    f.unlink()
    with open(f, "wb") as fh:
        np.save(fh, arr, allow_pickle=arr.dtype.hasobject)
    crc = cp._crc(arr) if not arr.dtype.hasobject else 0
    entry.update(dtype=arr.dtype.name, shape=list(arr.shape), crc32=crc)
    _save_manifest(p, body)


def _edit_meta(what: str, change: Callable[[np.ndarray], None]) -> Callable[[Path], None]:
    def edit(p: Path) -> None:
        arr = np.load(p / f"replay.meta.{what}.npy").copy()
        change(arr)
        _replace_array(p, f"meta.{what}", arr)

    return edit


def _setitem(index: int, value) -> Callable[[np.ndarray], None]:
    def change(arr: np.ndarray) -> None:
        arr[index] = value

    return change


def _object_priorities(p: Path) -> None:
    """An object array, its file cut or padded to the size its header and shape imply (8 bytes
    an item), so that only its dtype tells it apart: it used to stop the daemon's start."""
    arr = np.load(p / "replay.meta.priority.npy")
    _replace_array(p, "meta.priority", arr.astype(object))
    f = p / "replay.meta.priority.npy"
    with open(f, "rb") as fh:
        np.lib.format.read_magic(fh)
        np.lib.format.read_array_header_1_0(fh, max_header_size=10**6)
        offset = fh.tell()
    os.truncate(f, offset + 8 * len(arr))


def _obs_as_float64(p: Path) -> None:
    arr = np.load(p / "replay.data.obs.npy")
    _replace_array(p, "data.obs", arr.astype(np.float64))


def _obs_symlink_to_fifo(p: Path) -> None:
    fifo = p.parent.parent / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    (p / "replay.data.obs.npy").unlink()
    os.symlink(fifo, p / "replay.data.obs.npy")


def _obs_is_a_fifo(p: Path) -> None:
    (p / "replay.data.obs.npy").unlink()
    os.mkfifo(p / "replay.data.obs.npy")


def _obs_symlink_outside(p: Path) -> None:
    outside = p.parent.parent / "outside.npy"
    os.replace(p / "replay.data.obs.npy", outside)  # the intact file, moved out
    os.symlink(outside, p / "replay.data.obs.npy")


def _file_outside(name: Callable[[Path], str]) -> Callable[[Path], None]:
    """The manifest names a file outside the checkpoint (an intact one, moved there)."""

    def edit(p: Path) -> None:
        outside = p.parent.parent / "outside.npy"
        os.replace(p / "replay.data.obs.npy", outside)
        body = _manifest(p)
        body["tables"]["replay"]["files"]["data.obs"]["file"] = name(p)
        _save_manifest(p, body)

    return edit


def _manifest_symlink_to_fifo(p: Path) -> None:
    fifo = p.parent.parent / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    (p / cp.MANIFEST).unlink()
    os.symlink(fifo, p / cp.MANIFEST)


def _counter_missing(p: Path) -> None:
    body = _manifest(p)
    del body["tables"]["replay"]["counters"]["size"]
    _save_manifest(p, body)


def _other_slot(index: int) -> Callable[[np.ndarray], None]:
    def change(keys: np.ndarray) -> None:
        keys[index] = keys[0]  # two items in one slot

    return change


EDITS = [
    # (edit, words the warning must contain)
    (_edit_meta("priority", _setitem(3, np.nan)), "priority is not a finite number >= 0"),
    (_edit_meta("priority", _setitem(3, -1.0)), "priority is not a finite number >= 0"),
    (_edit_meta("priority", _setitem(3, np.inf)), "priority is not a finite number >= 0"),
    (_edit_meta("times_sampled", _setitem(2, -1)), "times_sampled must be >= 0"),
    (_edit_meta("times_sampled", _setitem(2, 3)), "below max_times_sampled 3"),
    (_edit_meta("key", _other_slot(5)), "the same slot"),
    (_edit_meta("key", _setitem(4, 10**6)), "names no slot"),
    (_edit_meta("seq", _setitem(2, 0)), "sequence numbers must be"),
    (_edit_meta("episode_first", _setitem(1, 5)), "first step is after its last"),
    (_object_priorities, "object arrays are never restored"),
    (_obs_as_float64, "must be float32[21, 16] (the table's signature)"),
    (_obs_symlink_to_fifo, "is a symbolic link"),
    (_obs_is_a_fifo, "is not a regular file"),
    (_obs_symlink_outside, "is a symbolic link"),
    (_file_outside(lambda p: str(p.parent.parent / "outside.npy")), "plain names"),
    (_file_outside(lambda p: "../../outside.npy"), "plain names"),
    (_manifest_symlink_to_fifo, "is a symbolic link"),
    (_counter_missing, "counters lack ['size']"),
]
IDS = [
    "nan-priority",
    "negative-priority",
    "inf-priority",
    "negative-times-sampled",
    "times-sampled-at-max",
    "two-keys-one-slot",
    "key-beyond-slots",
    "seq-not-increasing",
    "episode-first-after-last",
    "object-dtype",
    "data-dtype-not-signature",
    "data-symlink-to-fifo",
    "data-is-a-fifo",
    "data-symlink-outside",
    "absolute-file",
    "dotdot-file",
    "manifest-symlink-to-fifo",
    "counter-missing",
]


def _fill(core, uids) -> None:
    """Insert stamped rows as a writer and the daemon do (lease, write, commit)."""
    uids = np.asarray(uids, np.int64)
    with core.mutex:
        slots = core.lease(0, len(uids))
    core.gen[slots] += 1
    for name, column in stamped_batch(uids).items():
        core.data[name][slots] = column
    core.priority[slots] = 1.0 + uids % 3
    core.episode[slots] = 1
    core.episode_steps[slots] = np.stack([uids, uids], axis=1)
    core.gen[slots] += 1
    with core.mutex:
        core.commit(slots)


def _in_bounded_time(fn: Callable[[], object], fifos: list[Path]) -> object:
    """``fn()`` in a thread; fails if it takes over BOUND_S (then a writer opens each FIFO, so
    that a reader blocked on one returns and the thread ends)."""
    result: list = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # raised again in the test's thread
            error.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND_S)
    if thread.is_alive():
        for f in fifos:
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(5)
        pytest.fail(f"still running after {BOUND_S} s (blocked on a FIFO?)")
    if error:
        raise error[0]
    return result[0]


@pytest.mark.parametrize("edit, words", EDITS, ids=IDS)
def test_an_edited_checkpoint_is_skipped_for_the_older_intact_one(edit, words, tmp_path, caplog):
    ckpts = tmp_path / "ckpts"
    with local_table(SPEC) as src:
        _fill(src, np.arange(20))
        older = cp.write_checkpoint({"replay": src}, ckpts).path
        _fill(src, [20])
        newer = cp.write_checkpoint({"replay": src}, ckpts).path
    edit(newer)
    log = logging.getLogger("test-checkpoint-hostile")
    fifos = [tmp_path / "fifo", newer / "replay.data.obs.npy"]
    with caplog.at_level(logging.WARNING, logger="test-checkpoint-hostile"):
        found = _in_bounded_time(lambda: latest_checkpoint(ckpts, log=log), fifos)
    assert found == older, caplog.text
    assert f"skipping damaged checkpoint {newer}" in caplog.text
    assert words in caplog.text, caplog.text
    with pytest.raises(CheckpointError):
        _in_bounded_time(lambda: read_checkpoint(newer).verify(), fifos)
    # Nothing outside the checkpoint was opened: the planted FIFO never had a reader.
    if (tmp_path / "fifo").exists():
        with pytest.raises(OSError):  # ENXIO: no process has the FIFO open for reading
            os.close(os.open(tmp_path / "fifo", os.O_WRONLY | os.O_NONBLOCK))


def test_a_symlinked_checkpoint_directory_is_not_read(tmp_path, caplog):
    """A ``checkpoint-…`` entry that is a symbolic link (to a valid checkpoint elsewhere) is
    ignored with a warning: checkpoints are read only from inside checkpoint_dir."""
    ckpts, elsewhere = tmp_path / "ckpts", tmp_path / "elsewhere"
    with local_table(SPEC) as src:
        _fill(src, np.arange(5))
        older = cp.write_checkpoint({"replay": src}, ckpts).path
        _fill(src, [5])
        planted = cp.write_checkpoint({"replay": src}, elsewhere).path
    os.symlink(planted, ckpts / "checkpoint-29990101T000000Z-999999")
    with caplog.at_level(logging.WARNING, logger="shmreplay"):
        assert latest_checkpoint(ckpts) == older
    assert "a symbolic link, not a checkpoint directory" in caplog.text


def test_restore_fits_priorities_and_times_sampled_to_a_changed_spec(tmp_path):
    """Valid in the checkpoint's spec, out of the current one's range (α raised, max_times_sampled
    lowered): restored within the table's limits, and the report says what changed."""
    with local_table(SPEC) as src:
        _fill(src, np.arange(10))
        src.priority[np.flatnonzero(src.state == SlotState.READY)[:2]] = 1e200
        src.times_sampled[np.flatnonzero(src.state == SlotState.READY)[:3]] = 2
        with src.mutex:
            src.repair()
        path = cp.write_checkpoint({"replay": src}, tmp_path).path
    changed = TableSpec(
        name="replay",
        max_size=200,
        signature=STAMPED,
        sampler=SelectorSpec("prioritized", 2.0),
        remover=SelectorSpec("fifo"),
        max_times_sampled=2,
    )
    with local_table(changed) as dst:
        report = cp.restore_table(dst, read_checkpoint(path))
        limit = dst.max_priority
        assert 1e150 < limit < 1e200
        ready = np.flatnonzero(dst.state == SlotState.READY)
        assert report.items == 10 and dst.priority[ready].max() == limit
        assert dst.times_sampled[ready].max() == 1
        assert any("2 priorities above" in n for n in report.notes), report.notes
        assert any("3 items sampled" in n for n in report.notes), report.notes
        prob = dst.sample(5, channel=1).info.probability
        assert np.isfinite(prob).all() and (prob > 0).all()


# -- through a real daemon ---------------------------------------------------------------------


def _tables(ckpt_dir: Path) -> str:
    return f'[server]\ncheckpoint_dir = "{ckpt_dir}"\ncheckpoint_keep = 3\n' + table_toml(
        "replay",
        max_size=200,
        sampler='{ kind = "prioritized", priority_exponent = 1.0 }',
        signature=STAMPED_SIGNATURE,
    )


@pytest.mark.parametrize(
    "edit, words",
    [
        (_edit_meta("priority", _setitem(3, np.nan)), "priority is not a finite number >= 0"),
        (_edit_meta("priority", _setitem(3, -1.0)), "priority is not a finite number >= 0"),
        (_object_priorities, "object arrays are never restored"),
        (_obs_symlink_to_fifo, "is a symbolic link"),
        (_file_outside(lambda p: str(p.parent.parent / "outside.npy")), "plain names"),
    ],
    ids=["nan-priority", "negative-priority", "object-dtype", "symlink-to-fifo", "absolute-file"],
)
def test_a_daemon_restores_the_older_checkpoint_and_logs_why(edit, words, daemon_factory, tmp_path):
    ckpts = tmp_path / "ckpts"
    d = daemon_factory(_tables(ckpts))
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        for u in range(20):
            t.insert(stamped_row(u), priority=1.0 + u % 3, episode=(1, u, u))
        t.flush()
        older = Path(client.checkpoint()["path"])
        for u in range(20, 30):
            t.insert(stamped_row(u), priority=2.0)
        t.flush()
        newer = Path(client.checkpoint()["path"])
    os.kill(d.proc.pid, signal.SIGKILL)  # no final checkpoint
    d.proc.wait()
    remove_shm_objects(d.name)  # nothing to adopt: the checkpoints are all there is
    edit(newer)
    d2 = daemon_factory(_tables(ckpts), name=d.name, wait=False)
    try:
        t0 = time.monotonic()
        d2.wait_ready(BOUND_S)  # a FIFO used to hang the start here
        started = time.monotonic() - t0
        with shmreplay.attach(d.name) as client:
            t = client.table("replay")
            assert t.info().current_size == 20
            s = t.sample(500, timeout=5)
            assert verify_stamped(s.data).all() and s.data["uid"].max() < 20
            prob = s.info.probability
            assert np.isfinite(prob).all() and (prob > 0).all()
    finally:
        fifo = tmp_path / "fifo"
        if fifo.exists():  # release a daemon blocked on it, so that it can be stopped
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    assert started < BOUND_S
    log = d2.log()
    assert f"skipping damaged checkpoint {newer}" in log and words in log, log
    assert f"restored 20 items from {older}" in log, log


def test_a_priority_above_the_limit_is_restored_lowered_to_it(tmp_path):
    """1.7e308 in a checkpoint of an α = 1 table (edited, or written before the limit existed)
    is finite, so the checkpoint is used; the restore lowers it to the table's max_priority,
    says so, and the table samples with finite probabilities."""
    with local_table(SPEC) as src:
        _fill(src, np.arange(10))
        path = cp.write_checkpoint({"replay": src}, tmp_path).path
    _edit_meta("priority", _setitem(3, 1.7e308))(path)
    _edit_meta("priority", _setitem(4, 1.7e308))(path)
    assert latest_checkpoint(tmp_path) == path
    with local_table(SPEC) as dst:
        report = cp.restore_table(dst, read_checkpoint(path))
        assert any("2 priorities above" in n for n in report.notes), report.notes
        ready = np.flatnonzero(dst.state == SlotState.READY)
        assert sorted(dst.priority[ready])[-2:] == [dst.max_priority] * 2
        assert np.isfinite(dst.sampler.tree.total)
        prob = dst.sample(2, channel=1).info.probability
        assert np.isfinite(prob).all() and (prob > 0.4).all()
