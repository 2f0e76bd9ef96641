"""Checkpoints: round trips per selector kind, retention, damaged and partial checkpoints, refusals
with clear messages, truncation, and a checkpoint taken while another process keeps writing.

Most tables here live in shared memory without a daemon (``local_table``): the test plays the
writer and the daemon (lease, write, commit) so that contents are deterministic. The concurrent
test uses a real daemon and a real writer process.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

import shmreplay
from shmreplay.config import FieldSpec, SelectorSpec, TableSpec
from shmreplay.daemon import checkpoint as cp
from shmreplay.daemon.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    read_checkpoint,
    restore_table,
    write_checkpoint,
)
from shmreplay.engine.layout import Ctrl, SlotState
from shmreplay.engine.table import TableCore
from shmreplay.testing import (
    STAMPED_SIGNATURE,
    local_table,
    stamped_actor,
    stamped_batch,
    table_toml,
    verify_stamped,
)

CTX = mp.get_context("spawn")
STAMPED = (
    FieldSpec("uid", (), "int64"),
    FieldSpec("obs", (16,), "float32"),
    FieldSpec("check", (), "uint32"),
)
KINDS = ("uniform", "prioritized", "fifo", "lifo", "min_heap", "max_heap")
RESTORED_COUNTERS = (
    Ctrl.INSERTS,
    Ctrl.SAMPLES,
    Ctrl.DELETES,
    Ctrl.SIZE,
    Ctrl.SEQ,
    Ctrl.UNIQUE_SAMPLED,
    Ctrl.TOTAL_INSERTED,
    Ctrl.TOTAL_SAMPLED,
    Ctrl.TOTAL_EVICTED,
    Ctrl.RESETS,
)


def spec(
    kind: str = "uniform",
    max_size: int = 200,
    signature: tuple[FieldSpec, ...] = STAMPED,
    remover: str = "fifo",
    max_times_sampled: int = 3,
) -> TableSpec:
    sampler = SelectorSpec(kind, 0.7 if kind == "prioritized" else 1.0)
    return TableSpec(
        name="replay",
        max_size=max_size,
        signature=signature,
        sampler=sampler,
        remover=SelectorSpec(remover),
        max_times_sampled=max_times_sampled,
    )


def fill(core: TableCore, uids, priorities=None) -> None:
    """Insert stamped rows as a writer and the daemon do: lease, write (generation odd, data,
    generation even), commit (evicting beyond max_size)."""
    uids = np.asarray(uids, np.int64)
    if priorities is None:
        priorities = np.ones(len(uids))
    done = 0
    while done < len(uids):
        with core.mutex:
            slots = core.lease(0, len(uids) - done)
        k = len(slots)
        core.gen[slots] += 1
        for name, column in stamped_batch(uids[done : done + k]).items():
            core.data[name][slots] = column
        core.priority[slots] = priorities[done : done + k]
        core.gen[slots] += 1
        with core.mutex:
            core.commit(slots)
        done += k


def ready_slots(core: TableCore) -> np.ndarray:
    return np.flatnonzero(core.state == SlotState.READY)


def keys_of(core: TableCore, slots: np.ndarray) -> list[int]:
    return core.key[slots].tolist()


def assert_same_items(src: TableCore, dst: TableCore) -> None:
    """Same items in the same slots, with the same keys, metadata and rows."""
    slots = ready_slots(src)
    assert ready_slots(dst).tolist() == slots.tolist()
    for name in ("key", "priority", "times_sampled", "seq"):
        assert getattr(dst, name)[slots].tolist() == getattr(src, name)[slots].tolist(), name
    for f in src.spec.signature:
        np.testing.assert_array_equal(dst.data[f.name][slots], src.data[f.name][slots])
    for c in RESTORED_COUNTERS:
        assert dst.ctrl[c] == src.ctrl[c], c
    assert dst.ctrl[Ctrl.REPAIRS] == 0
    assert dst.free_count == src.free_count


def churned_table(core: TableCore, kind: str) -> None:
    """350 inserts into 200 (evictions, reused slots, key tags above 0), samples, priority
    updates that tie (so a heap's touch order is not the insertion order) and deletions."""
    rng = np.random.default_rng(7)
    fill(core, np.arange(350), rng.integers(1, 4, 350).astype(float))
    core.sample(40, channel=1)
    present = core.key[ready_slots(core)]
    core.update_priorities(present[::7], np.full(len(present[::7]), 2.0))
    core.delete(present[5:15])


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_restores_items_keys_order_and_counters(kind, tmp_path):
    table_spec = spec(kind)
    with local_table(table_spec) as src, local_table(table_spec) as dst:
        churned_table(src, kind)
        size = int(src.ctrl[Ctrl.SIZE])  # 190, less what max_times_sampled deleted
        report = write_checkpoint({"replay": src}, tmp_path)
        assert report.items == {"replay": size} and report.dropped == {"replay": 0}
        assert 0 < report.max_lock_s < 0.05
        assert report.path.parent == tmp_path and report.bytes > size * 84

        restored = restore_table(dst, read_checkpoint(report.path))
        assert (restored.items, restored.truncated, restored.rekeyed) == (size, 0, 0)
        assert restored.notes == ()
        assert_same_items(src, dst)

        if kind == "prioritized":  # the same sampling distribution
            slots = ready_slots(src)
            assert dst.sampler.tree.total == pytest.approx(src.sampler.tree.total, rel=1e-12)
            np.testing.assert_allclose(
                dst.sampler.tree.get(slots) / dst.sampler.tree.total,
                src.sampler.tree.get(slots) / src.sampler.tree.total,
                rtol=1e-12,
            )
        elif kind == "uniform":
            live = dst.sampler.items.live[: dst.sampler.items.count]
            assert sorted(live.tolist()) == ready_slots(src).tolist()
        else:  # the same order, hence the same sample sequence
            assert ("heap order" in restored.restored) == kind.endswith("heap")
            rng = np.random.default_rng()
            order = src.sampler.victims(size, rng)
            assert len(order) == size
            assert keys_of(dst, dst.sampler.victims(size, rng)) == keys_of(src, order)
            for _ in range(5):  # max_times_sampled = 3: walks along the order, deleting
                a, b = src.sample(32, channel=1), dst.sample(32, channel=1)
                assert b.info.key.tolist() == a.info.key.tolist()
                assert b.info.times_sampled.tolist() == a.info.times_sampled.tolist()
        # The remover (fifo) evicts the same items next.
        rng = np.random.default_rng()
        assert keys_of(dst, dst.remover.victims(50, rng)) == keys_of(
            src, src.remover.victims(50, rng)
        )
        # New keys never collide with restored ones, nor with keys the source handed out.
        fill(dst, np.arange(1000, 1100))
        keys = dst.key[ready_slots(dst)]
        assert len(np.unique(keys)) == len(keys)
        assert (dst.key[ready_slots(dst)] >> 32).max() > (src.key >> 32).max()


def test_files_are_plain_npy_with_the_manifest_crc32(tmp_path):
    with local_table(spec()) as src:
        fill(src, np.arange(250))
        report = write_checkpoint({"replay": src}, tmp_path)
    manifest = json.loads((report.path / "manifest.json").read_text())
    table = manifest["tables"]["replay"]
    assert table["items"] == 200 and table["counters"]["inserts"] == 250
    assert table["spec"] == spec().to_dict()
    for entry in table["files"].values():
        arr = np.load(report.path / entry["file"], allow_pickle=False)
        assert str(arr.dtype) == entry["dtype"] and list(arr.shape) == entry["shape"]
        assert zlib.crc32(arr) == entry["crc32"]
    uids = np.load(report.path / "replay.data.uid.npy")
    assert uids.tolist() == list(range(50, 250))  # insertion order
    assert verify_stamped(
        {f: np.load(report.path / f"replay.data.{f}.npy") for f in ("uid", "obs", "check")}
    ).all()


def test_progress_lines_for_long_operations(tmp_path, monkeypatch):
    monkeypatch.setattr(cp, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(cp, "CHUNK_BYTES", 1024)  # many chunks
    lines: list[str] = []
    with local_table(spec()) as src, local_table(spec()) as dst:
        fill(src, np.arange(200))
        report = write_checkpoint({"replay": src}, tmp_path, progress=lines.append)
        assert any("checkpoint: table 'replay'" in line for line in lines)
        lines.clear()
        restore_table(dst, read_checkpoint(report.path), progress=lines.append)
        assert any("restore: table 'replay'" in line for line in lines)


# -- the directory: retention, damage, partial writes --------------------------------------------


def test_keep_deletes_older_checkpoints(tmp_path):
    with local_table(spec()) as src:
        paths = []
        for i in range(4):
            fill(src, [i])
            report = write_checkpoint({"replay": src}, tmp_path, keep=2)
            paths.append(report.path)
        assert report.removed == (paths[1],)
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert names == [paths[2].name, paths[3].name]
    assert [p.name[-6:] for p in paths] == ["000001", "000002", "000003", "000004"]
    assert latest_checkpoint(tmp_path) == paths[3]
    assert read_checkpoint(paths[3]).table("replay").items == 4


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _damage_data_byte(p: Path) -> None:
    f = p / "replay.data.obs.npy"
    _flip(f, f.stat().st_size - 100)


def _truncate_data(p: Path) -> None:
    f = p / "replay.data.obs.npy"
    os.truncate(f, f.stat().st_size - 64)


def _damage_meta_byte(p: Path) -> None:
    f = p / "replay.meta.priority.npy"
    _flip(f, f.stat().st_size - 3)


def _damage_manifest_counter(p: Path) -> None:
    f = p / "manifest.json"
    text = f.read_text()
    assert '"inserts": 21' in text
    f.write_text(text.replace('"inserts": 21', '"inserts": 22'))


def _other_format_version(p: Path) -> None:
    f = p / "manifest.json"
    body = json.loads(f.read_text())
    body.pop("checksum")
    body["format_version"] = 99
    body["checksum"] = zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    f.write_text(json.dumps(body))


def _remove_file(p: Path) -> None:
    (p / "replay.meta.seq.npy").unlink()


@pytest.mark.parametrize(
    "damage, message",
    [
        (_damage_data_byte, "fails its crc32 check"),
        (_truncate_data, "truncated or damaged"),
        (_damage_meta_byte, "fails its crc32 check"),
        (_damage_manifest_counter, "checksum mismatch"),
        (_other_format_version, "version 99"),
        (_remove_file, "replay.meta.seq.npy"),
    ],
)
def test_a_damaged_checkpoint_is_skipped_with_a_warning(damage, message, tmp_path, caplog):
    with local_table(spec()) as src:
        fill(src, np.arange(20))
        older = write_checkpoint({"replay": src}, tmp_path).path
        fill(src, [20])
        newer = write_checkpoint({"replay": src}, tmp_path).path
    damage(newer)
    log = logging.getLogger("test-checkpoint")
    with caplog.at_level(logging.WARNING, logger="test-checkpoint"):
        assert latest_checkpoint(tmp_path, log=log) == older
    assert newer.name in caplog.text and message in caplog.text
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(newer).verify()


def test_restore_checks_data_crc_and_leaves_the_table_empty(tmp_path):
    with local_table(spec()) as src, local_table(spec()) as dst:
        fill(src, np.arange(50))
        path = write_checkpoint({"replay": src}, tmp_path).path
        _damage_data_byte(path)
        checkpoint = read_checkpoint(path)  # the headers and metadata are intact
        with pytest.raises(CheckpointError, match="crc32"):
            restore_table(dst, checkpoint)
        assert dst.ctrl[Ctrl.SIZE] == 0 and not ready_slots(dst).size


def test_a_partial_checkpoint_is_ignored_then_removed(tmp_path, caplog):
    partial = tmp_path / ".tmp-checkpoint-20240101T000000Z-000007"
    partial.mkdir()
    (partial / "replay.data.obs.npy").write_bytes(b"\x93NUMPY half written")
    with caplog.at_level(logging.WARNING, logger="shmreplay"):
        assert latest_checkpoint(tmp_path) is None
    assert "partial checkpoint" in caplog.text
    with local_table(spec()) as src:
        fill(src, np.arange(5))
        report = write_checkpoint({"replay": src}, tmp_path)
    assert not partial.exists()
    assert report.path.name.endswith("-000001")
    assert latest_checkpoint(tmp_path) == report.path
    assert latest_checkpoint(tmp_path / "missing") is None


# -- refusals and truncation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "signature, message",
    [
        (
            (STAMPED[0], FieldSpec("obs", (8,), "float32"), STAMPED[2]),
            "field 'obs' is float32[16] in the checkpoint but float32[8] in the table",
        ),
        (
            (STAMPED[0], FieldSpec("obs", (16,), "float64"), STAMPED[2]),
            "field 'obs' is float32[16] in the checkpoint but float64[16] in the table",
        ),
        (STAMPED[:2], "field 'check' is not in the table"),
        ((*STAMPED, FieldSpec("extra", (), "bool")), "field 'extra' is not in the checkpoint"),
    ],
)
def test_a_changed_signature_is_refused_naming_the_field(signature, message, tmp_path):
    with local_table(spec()) as src, local_table(spec(signature=signature)) as dst:
        fill(src, np.arange(10))
        checkpoint = read_checkpoint(write_checkpoint({"replay": src}, tmp_path).path)
        with pytest.raises(CheckpointError, match="signature differs") as err:
            restore_table(dst, checkpoint)
        assert message in str(err.value)
        assert dst.ctrl[Ctrl.SIZE] == 0


def test_a_smaller_table_is_refused_unless_truncating_which_keeps_the_newest(tmp_path):
    with local_table(spec("fifo")) as src, local_table(spec("fifo", max_size=120)) as dst:
        fill(src, np.arange(350))  # 200 items in slots up to 399; dst has 240 slots
        checkpoint = read_checkpoint(write_checkpoint({"replay": src}, tmp_path).path)
        with pytest.raises(CheckpointError) as err:
            restore_table(dst, checkpoint)
        text = str(err.value)
        assert "200 items" in text and "max_size is now 120" in text and "--truncate" in text

        report = restore_table(dst, checkpoint, truncate=True)
        assert (report.items, report.truncated) == (120, 80)
        assert any("max_size was 200" in note for note in report.notes)
        slots = ready_slots(dst)
        by_seq = slots[np.argsort(dst.seq[slots])]
        assert dst.data["uid"][by_seq].tolist() == list(range(230, 350))  # the newest
        assert verify_stamped({k: v[slots] for k, v in dst.data.items()}).all()
        # Items whose slot no longer exists moved, with new keys naming their new slot.
        src_key = {int(u): int(k) for u, k in zip(src.data["uid"], src.key, strict=True)}
        kept = [int(dst.key[s]) == src_key[int(dst.data["uid"][s])] for s in slots]
        assert report.rekeyed == kept.count(False) > 0
        assert ((dst.key[slots] & 0xFFFFFFFF) == slots.astype(np.uint64)).all()
        assert len(np.unique(dst.key[slots])) == 120
        assert dst.ctrl[Ctrl.SIZE] == 120
        assert dst.ctrl[Ctrl.INSERTS] - dst.ctrl[Ctrl.DELETES] == 120  # what the limiter sees
        assert dst.ctrl[Ctrl.TOTAL_EVICTED] == 150 + 80
        # Still a working fifo table: it evicts the oldest next.
        fill(dst, [1000])
        by_seq = ready_slots(dst)[np.argsort(dst.seq[ready_slots(dst)])]
        assert dst.data["uid"][by_seq].tolist() == [*range(231, 350), 1000]


def test_restore_refuses_a_table_in_use(tmp_path):
    with local_table(spec()) as src, local_table(spec()) as dst:
        fill(src, np.arange(10))
        checkpoint = read_checkpoint(write_checkpoint({"replay": src}, tmp_path).path)
        fill(dst, [99])
        with pytest.raises(CheckpointError, match="not empty"):
            restore_table(dst, checkpoint)


def test_arguments_and_unknown_tables(tmp_path):
    with local_table(spec()) as src:
        with pytest.raises(shmreplay.InvalidArgumentError, match="keep"):
            write_checkpoint({"replay": src}, tmp_path, keep=0)
        checkpoint = read_checkpoint(write_checkpoint({"replay": src}, tmp_path).path)
    with pytest.raises(CheckpointError, match="no table 'other'.*replay"):
        checkpoint.table("other")
    assert isinstance(CheckpointError("x"), shmreplay.ShmReplayError)


def test_an_empty_table_round_trips(tmp_path):
    with local_table(spec("fifo")) as src, local_table(spec("fifo")) as dst:
        fill(src, np.arange(30))
        src.reset()  # no items, counters of a used table
        report = write_checkpoint({"replay": src}, tmp_path)
        assert report.items == {"replay": 0}
        restored = restore_table(dst, read_checkpoint(latest_checkpoint(tmp_path)))
        assert restored.items == 0
        assert_same_items(src, dst)
        fill(dst, [7])
        assert dst.seq[ready_slots(dst)].tolist() == [30]  # the sequence goes on


def test_write_errors_leave_nothing_behind(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    with local_table(spec()) as src:
        fill(src, np.arange(10))
        with pytest.raises(CheckpointError, match="writable"):
            write_checkpoint({"replay": src}, tmp_path / "file" / "checkpoints")

        def fail(*args):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(cp, "_write_manifest", fail)
        with pytest.raises(CheckpointError, match="free space in .*checkpoint_keep"):
            write_checkpoint({"replay": src}, tmp_path / "ckpt")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [".lock"]


# -- consistency under a concurrent writer ---------------------------------------------------------


def test_a_checkpoint_under_a_writer_holds_only_rows_that_match_their_keys(
    daemon_factory, tmp_path, monkeypatch
):
    """A writer process keeps inserting into a full fifo table (every insert evicts the oldest)
    while checkpoints are taken with one row per chunk, so that slots are recycled while their
    rows are copied. Every row saved must be intact and be the row its key was returned for;
    recycled rows are dropped and counted.

    This test bites: with the generation re-check in ``_write_table`` disabled (``ok`` all
    true), checkpoints hold foreign rows (826 keys saved with another item's uid in one run).
    """
    monkeypatch.setattr(cp, "CHUNK_BYTES", 1)  # one row per chunk: a slow copy
    max_size, count = 1000, 40_000
    d = daemon_factory(
        table_toml(max_size=max_size, sampler='{ kind = "fifo" }', signature=STAMPED_SIGNATURE)
    )
    results = CTX.Queue()
    actor = CTX.Process(target=stamped_actor, args=(d.name, "replay", 1, count, results))
    reports = []
    with shmreplay.attach(d.name) as client:
        core = client.table("replay").core
        actor.start()
        try:
            while core.ctrl[Ctrl.SIZE] < max_size and actor.is_alive():
                pass
            while core.ctrl[Ctrl.TOTAL_INSERTED] < count and len(reports) < 20:
                reports.append(write_checkpoint({"replay": core}, tmp_path, keep=100))
            written = results.get(timeout=60)
            actor.join(30)
        finally:
            if actor.is_alive():
                actor.kill()
                actor.join()
    assert actor.exitcode == 0
    _, keys, uids = written
    key_to_uid = dict(zip(keys, uids, strict=True))
    assert len(reports) >= 3
    for report in reports:
        t = read_checkpoint(report.path).table("replay")
        data = {f: np.asarray(t.array(f"data.{f}")) for f in ("uid", "obs", "check")}
        assert verify_stamped(data).all()
        saved = dict(zip(t.array("meta.key").tolist(), data["uid"].tolist(), strict=True))
        assert {k: u for k, u in saved.items() if key_to_uid.get(k) != u} == {}
        assert report.items["replay"] + report.dropped["replay"] == max_size
        assert report.max_lock_s < 0.05
    assert sum(r.dropped["replay"] for r in reports) > 0, "no slot was recycled during a copy"


def test_rows_whose_generation_moved_after_the_snapshot_are_dropped(tmp_path, monkeypatch):
    """The row copy is the sampler's seqlock read (TableCore._engine.gather): a slot whose
    generation differs from the snapshot's was rewritten, so its row and metadata are left out
    and counted; the other rows are written in order, intact."""
    monkeypatch.setattr(cp, "CHUNK_BYTES", 7 * 80)  # several chunks, one with two moved slots
    snapshot = cp._snapshot
    moved: list[int] = []

    def moved_snapshot(core):
        snap = snapshot(core)
        for i in (3, 4, 20):  # as if a writer had started on these slots since
            snap.gen[i] += 1
            moved.append(int(snap.slots[i]))
        return snap

    monkeypatch.setattr(cp, "_snapshot", moved_snapshot)
    with local_table(spec()) as src:
        fill(src, np.arange(50))
        report = write_checkpoint({"replay": src}, tmp_path)
        assert report.items == {"replay": 47} and report.dropped == {"replay": 3}
        t = read_checkpoint(report.path).tables["replay"]
        t_slots = [
            s for s in ready_slots(src)[np.argsort(src.seq[ready_slots(src)])] if s not in moved
        ]
        assert np.array_equal(t.array("data.uid"), src.data["uid"][t_slots])
        assert np.array_equal(t.array("data.obs"), src.data["obs"][t_slots])
        assert np.array_equal(t.array("meta.key"), src.key[t_slots])
