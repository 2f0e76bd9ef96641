"""The byte layout of a table's shared-memory segment, computed from its spec by one function.

A segment is self-describing. It starts with a header::

    offset  size  field
    0       8     magic  b"SHMRPLY\\0"
    8       4     format version (FORMAT_VERSION)
    12      4     header size (bytes before the first array, a multiple of 4096)
    16      8     total segment size
    24      4     payload length (msgpack: the table spec and the layout parameters)
    28      4     crc32 of the payload
    32      32    layout digest (sha256 of every array's name, dtype, shape and offset)
    64      4     crc32 of bytes 0..63
    128     ...   payload

followed by 64-byte aligned arrays: control lines, the table mutex, per-slot metadata (the source
of truth), the free-slot ring, the writers' channels (lease and publish rings), the sampler's and
the remover's structures, and one data array of shape ``[num_slots, *field_shape]`` per signature
field. :func:`compute_layout` derives all of it from the spec; an attaching process reads the spec
from the header, derives the layout again and checks that the digests agree.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
import zlib
from dataclasses import dataclass

import msgpack
import numpy as np

from ..config import TableSpec
from ..errors import FormatVersionError, SegmentError
from . import _native
from .mutex import MUTEX_NBYTES
from .selectors import selector_class

MAGIC = b"SHMRPLY\0"
# Bump when anything in this file, the control-line indices or a selector's arrays change.
FORMAT_VERSION = 3
ALIGN = 64  # a cache line: counters on their own line never tear and never false-share
PAGE = 4096
PAYLOAD_OFFSET = 128
_PREFIX = struct.Struct("<8sIIQII32s")
_PREFIX_CRC = struct.Struct("<I")

# The fixed part of the layout (ring capacities, control-word indices, slot states) is defined
# once, in the engine's csrc/shm_layout.h, and taken from the compiled module here.
# Channel rings. A writer holds at most LEASE_CAPACITY leased slots; the publish ring is larger
# than the lease ring so a writer never waits for room to publish what it was leased.
LEASE_CAPACITY = _native.LEASE_CAPACITY
PUBLISH_CAPACITY = _native.PUBLISH_CAPACITY
LINE = _native.LINE  # int64 words per 64-byte line
# A writer with this many leased slots left or fewer wakes a napping daemon to refill them.
LEASE_LOW_WATER = _native.LEASE_LOW_WATER


class Ctrl:
    """Indices of the table's control lines (one int64 per 64-byte line)."""

    INSERTS = _native.CTRL_INSERTS  # rate limiter: committed inserts since the last reset
    SAMPLES = _native.CTRL_SAMPLES  # rate limiter: samples since the last reset
    # rate limiter: deletions (evictions, max_times_sampled, delete()) since reset
    DELETES = _native.CTRL_DELETES
    SIZE = _native.CTRL_SIZE  # items in the table (state READY)
    SEQ = _native.CTRL_SEQ  # next insertion sequence number
    FREE_HEAD = _native.CTRL_FREE_HEAD  # free-slot ring: next slot to lease
    FREE_TAIL = _native.CTRL_FREE_TAIL  # free-slot ring: where the next freed slot goes
    # 1 once the daemon shuts down: waiters raise instead of sleeping again
    SHUTDOWN = _native.CTRL_SHUTDOWN
    DAEMON_PID = _native.CTRL_DAEMON_PID
    # Sleep.NAP or Sleep.IDLE while the daemon waits on its semaphore
    DAEMON_SLEEPING = _native.CTRL_DAEMON_SLEEPING
    TOTAL_INSERTED = _native.CTRL_TOTAL_INSERTED  # never reset: for rates
    TOTAL_SAMPLED = _native.CTRL_TOTAL_SAMPLED
    REPAIRS = _native.CTRL_REPAIRS  # times a dead lock holder's damage was repaired
    RESETS = _native.CTRL_RESETS
    UNIQUE_SAMPLED = _native.CTRL_UNIQUE_SAMPLED  # items (still in the table) sampled at least once
    COMMITS = _native.CTRL_COMMITS
    READY = _native.CTRL_READY  # 1 once the daemon finished initialising the segment
    TOTAL_EVICTED = _native.CTRL_TOTAL_EVICTED
    # hint: a sampler sleeps waiting for items; writers wake the daemon
    SAMPLER_WAITING = _native.CTRL_SAMPLER_WAITING
    # episodes that have had items in the table (since the last reset)
    EPISODES = _native.CTRL_EPISODES
    # The daemon's start time (ms since the epoch; 0: not recorded) next to DAEMON_PID: with
    # it, anyone who can read the segment tells a live daemon from a dead one whose pid was
    # reused, whatever runtime directory it used (gc, a second daemon of the same name).
    DAEMON_START = _native.CTRL_DAEMON_START
    # TableState: the daemon quarantined the table (writes are refused)
    TABLE_STATE = _native.CTRL_TABLE_STATE
    COUNT = _native.CTRL_COUNT


class Sleep:
    """Values of Ctrl.DAEMON_SLEEPING.

    Waking a sleeping process costs a syscall and, on a virtual machine, an inter-processor
    interrupt that was measured at ~200 µs: writers must not pay it per item. While writers are
    active the daemon only naps (NAP_S, wakes by itself) and writers post only when they run
    low on leased slots; after an idle sleep the first publish posts.
    """

    AWAKE = _native.SLEEP_AWAKE
    NAP = _native.SLEEP_NAP
    IDLE = _native.SLEEP_IDLE


class TableState:
    """Values of Ctrl.TABLE_STATE, written by the daemon only (see CommitLoop.quarantine)."""

    OK = _native.TABLE_OK
    # cannot go on: reads work if its lock does, writes raise TableQuarantined
    QUARANTINED = _native.TABLE_QUARANTINED


class Param:
    """Indices of the float64 parameter lines (the rate limiter's, changeable at run time)."""

    SAMPLES_PER_INSERT = _native.PARAM_SAMPLES_PER_INSERT
    MIN_SIZE_TO_SAMPLE = _native.PARAM_MIN_SIZE_TO_SAMPLE
    MIN_DIFF = _native.PARAM_MIN_DIFF
    MAX_DIFF = _native.PARAM_MAX_DIFF
    KIND = _native.PARAM_KIND  # index in config.RATE_LIMITER_KINDS (reconfiguration changes it)
    COUNT = _native.PARAM_COUNT


class Chan:
    """Indices of a writer channel's control lines."""

    PID = _native.CHAN_PID  # owner process, 0 when the channel is free
    LEASE_HEAD = _native.CHAN_LEASE_HEAD  # consumer (writer) index into the lease ring
    LEASE_TAIL = _native.CHAN_LEASE_TAIL  # producer (daemon) index into the lease ring
    # consumer (daemon) index into the publish ring: committed up to here
    PUB_HEAD = _native.CHAN_PUB_HEAD
    PUB_TAIL = _native.CHAN_PUB_TAIL  # producer (writer) index into the publish ring
    # the writer inserts: the daemon keeps its lease ring filled
    WANT_LEASE = _native.CHAN_WANT_LEASE
    WAIT_SAMPLE = _native.CHAN_WAIT_SAMPLE  # the channel's process sleeps on the sample event
    WAIT_INSERT = _native.CHAN_WAIT_INSERT  # the channel's process sleeps on the insert event
    COUNT = _native.CHAN_COUNT


class SlotState:
    FREE = _native.SLOT_FREE
    LEASED = _native.SLOT_LEASED  # handed to a writer's channel, being written or published
    READY = _native.SLOT_READY  # committed: in the selectors, sampleable
    # deleted by its own sample; freed once that sampler copied it
    RELEASING = _native.SLOT_RELEASING


@dataclass(frozen=True)
class ArrayLayout:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize  # Python ints: no wrap


@dataclass(frozen=True)
class Layout:
    """Where every array of a table's segment lives. Built only by :func:`compute_layout`."""

    spec: TableSpec
    max_clients: int
    header_size: int
    total_size: int
    arrays: tuple[ArrayLayout, ...]
    digest: bytes

    def array(self, name: str) -> ArrayLayout:
        for a in self.arrays:
            if a.name == name:
                return a
        raise KeyError(name)

    @property
    def data_bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays if a.name.startswith("data."))

    def payload(self) -> bytes:
        return msgpack.packb({"spec": self.spec.to_dict(), "max_clients": self.max_clients})


def _align(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def compute_layout(spec: TableSpec, max_clients: int) -> Layout:
    """Compute the full segment layout of ``spec``: the one place that decides it."""
    slots = spec.num_slots
    if slots >= 2**32:
        # Keys carry the slot index in their low 32 bits.
        raise SegmentError(f"table {spec.name!r}: max_size + headroom must be below 2**32")
    entries: list[tuple[str, np.dtype | str, tuple[int, ...]]] = [
        ("ctrl", "int64", (Ctrl.COUNT, LINE)),
        ("params", "float64", (Param.COUNT, LINE)),
        ("mutex", "uint8", (MUTEX_NBYTES,)),
        ("meta.key", "uint64", (slots,)),
        ("meta.state", "uint8", (slots,)),
        ("meta.priority", "float64", (slots,)),
        ("meta.times_sampled", "int32", (slots,)),
        ("meta.seq", "int64", (slots,)),
        ("meta.gen", "int64", (slots,)),
        ("meta.owner", "int32", (slots,)),
        ("meta.episode", "int64", (slots,)),  # the writer's episode id, 0 for none
        ("meta.episode_steps", "int32", (slots, 2)),  # first and last step, from its start
        ("free", "int64", (slots,)),
        ("chan.ctrl", "int64", (max_clients, Chan.COUNT, LINE)),
        ("chan.lease", "int64", (max_clients, LEASE_CAPACITY)),
        ("chan.publish", "int64", (max_clients, PUBLISH_CAPACITY)),
    ]
    for role, selector in (("sampler", spec.sampler), ("remover", spec.remover)):
        for name, dtype, shape in selector_class(selector.kind).array_specs(slots):
            entries.append((f"{role}.{name}", dtype, shape))
    for field in spec.signature:
        entries.append((f"data.{field.name}", field.dtype, (slots, *field.shape)))

    payload = msgpack.packb({"spec": spec.to_dict(), "max_clients": max_clients})
    header_size = _align(PAYLOAD_OFFSET + len(payload), PAGE)
    offset = header_size
    arrays = []
    for name, dtype, shape in entries:
        a = ArrayLayout(name, np.dtype(dtype).name, tuple(int(d) for d in shape), offset)
        arrays.append(a)
        offset = _align(offset + a.nbytes)
    total = _align(offset, PAGE)
    h = hashlib.sha256(f"shmreplay-layout-v{FORMAT_VERSION}".encode())
    for a in arrays:
        h.update(f"{a.name}|{np.dtype(a.dtype).str}|{a.shape}|{a.offset};".encode())
    return Layout(spec, max_clients, header_size, total, tuple(arrays), h.digest())


def encode_header(layout: Layout) -> bytes:
    """The header bytes to write at offset 0 of a new segment."""
    payload = layout.payload()
    prefix = _PREFIX.pack(
        MAGIC,
        FORMAT_VERSION,
        layout.header_size,
        layout.total_size,
        len(payload),
        zlib.crc32(payload),
        layout.digest,
    )
    prefix = prefix.ljust(64, b"\0")
    head = prefix + _PREFIX_CRC.pack(zlib.crc32(prefix))
    return head.ljust(PAYLOAD_OFFSET, b"\0") + payload


def decode_header(buf: mmap.mmap | bytes, segment_size: int, where: str) -> Layout:
    """Verify the header of a segment and return the layout it describes.

    Raises :class:`SegmentError` for anything that is not an intact shmreplay segment and
    :class:`FormatVersionError` for a segment of another format version.
    """
    if segment_size < PAYLOAD_OFFSET:
        raise SegmentError(f"{where}: segment of {segment_size} bytes is too small to be a table")
    head = bytes(buf[:PAYLOAD_OFFSET])
    magic, version, header_size, total, plen, pcrc, digest = _PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise SegmentError(f"{where}: not a shmreplay table segment (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise FormatVersionError(
            f"{where}: segment has format version {version}, this shmreplay speaks "
            f"{FORMAT_VERSION}; use the same shmreplay version in the daemon and its clients"
        )
    (crc,) = _PREFIX_CRC.unpack_from(head, 64)
    if crc != zlib.crc32(head[:64]):
        raise SegmentError(f"{where}: header checksum mismatch (corrupted segment)")
    if total != segment_size or not (PAYLOAD_OFFSET + plen <= header_size <= total):
        raise SegmentError(
            f"{where}: header says {total} bytes, header {header_size}, payload {plen}; "
            f"the segment has {segment_size} bytes (corrupted or truncated segment)"
        )
    payload = bytes(buf[PAYLOAD_OFFSET : PAYLOAD_OFFSET + plen])
    if zlib.crc32(payload) != pcrc:
        raise SegmentError(f"{where}: spec checksum mismatch (corrupted segment)")
    try:
        meta = msgpack.unpackb(payload)
        spec = TableSpec.from_dict(meta["spec"])
        max_clients = int(meta["max_clients"])
    except Exception as exc:  # any decoding problem means a damaged header
        raise SegmentError(f"{where}: cannot decode the table spec in the header: {exc}") from exc
    layout = compute_layout(spec, max_clients)
    if layout.digest != digest or layout.total_size != total:
        raise SegmentError(f"{where}: layout digest mismatch (segment written by another build)")
    return layout
