"""A table handle: :class:`Table` (inserts, reservations, sampling, priorities, info) and
:class:`ReservedSlot`, what ``Table.reserve()`` hands out.

Data rules: a field given as a numpy array must have exactly the field's shape and a dtype that
casts to the field's dtype without loss (``np.can_cast(..., "safe")``: int32 into int64 is fine,
float64 into float32 is refused). Python numbers and nested lists are accepted when the field's
kind holds them without loss: bools anywhere, ints into integer fields within range and into float
fields, floats into float fields.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from ..config import FieldSpec
from ..engine import _native
from ..engine.layout import LEASE_CAPACITY, PUBLISH_CAPACITY, Chan, Ctrl
from ..engine.table import Sample, TableCore, TableInfo
from ..errors import (
    ClientClosedError,
    InvalidArgumentError,
    RateLimiterTimeout,
    SignatureError,
)
from ..values import check_keys, check_priorities, check_priority, host_array, python_values_fit
from .loader import Prefetcher

if TYPE_CHECKING:
    from .client import Client

__all__ = ["Table", "ReservedSlot"]

# A writer with this few leased slots left wakes a napping daemon to refill them.
# What the C writer's insert/take/publish return instead of a key or count (keys are unsigned).
_NO_LEASE, _NO_ROOM, _BAD_VALUE, _CHECK = -1, -2, -3, -4

_EPISODE_ID_RANGE = (-(2**63), 2**63 - 1)
_EPISODE_STEP_RANGE = (-(2**31), 2**31 - 1)


def _check_episode(episode) -> tuple[int, int, int]:
    """(episode id, first step, last step) as Python ints; InvalidArgumentError unless they are
    three integers that fit the table's int64 id and int32 steps, first <= last."""
    if episode is None:
        return (0, 0, 0)
    try:
        eid, first, last = (operator.index(x) for x in episode)
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"episode must be three integers (episode id, first step, last step), got {episode!r}"
        ) from None
    lo, hi = _EPISODE_ID_RANGE
    if not lo <= eid <= hi:
        raise InvalidArgumentError(
            f"episode id must fit in an int64 ({lo} to {hi}), got {eid}; use a smaller id "
            "(e.g. a counter, or a random id below 2**63)"
        )
    lo, hi = _EPISODE_STEP_RANGE
    if not lo <= first <= last <= hi:
        raise InvalidArgumentError(
            f"episode steps must satisfy {lo} <= first <= last <= {hi} (int32), got {episode!r}"
        )
    return eid, first, last


def _check_episodes(episodes, n: int) -> np.ndarray:
    """One (episode id, first step, last step) row per item as int64[n, 3], checked as
    :func:`_check_episode` checks one."""
    episodes = host_array(episodes)
    try:
        arr = np.asarray(episodes)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgumentError(f"episodes: cannot read {episodes!r}: {exc}") from None
    if arr.shape != (n, 3):
        raise InvalidArgumentError(
            f"episodes must have shape ({n}, 3): (episode id, first step, last step) per item, "
            f"got {arr.shape}"
        )
    if arr.size and arr.dtype.kind not in "iu":
        # object (Python ints beyond int64), float, str: refused rather than truncated
        raise InvalidArgumentError(
            f"episodes must be integers that fit in an int64, got an array of {arr.dtype}"
        )
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > _EPISODE_ID_RANGE[1]:
        raise InvalidArgumentError(
            f"episode ids must fit in an int64, got {int(arr.max())}; use smaller ids"
        )
    arr = arr.astype(np.int64, copy=False)
    lo, hi = _EPISODE_STEP_RANGE
    steps = arr[:, 1:]
    if arr.size and (steps.min() < lo or steps.max() > hi):
        raise InvalidArgumentError(f"episodes: steps must fit in an int32 ({lo} to {hi})")
    if (arr[:, 1] > arr[:, 2]).any():
        raise InvalidArgumentError("episodes: first step after last step")
    return arr


def _check_timeout(timeout, what: str = "timeout") -> float | None:
    """None (wait without limit) or a number of seconds; ≤ 0 means "do not wait". NaN and
    non-numbers are refused: a NaN deadline would never pass and never fail."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)):
        raise InvalidArgumentError(f"{what} must be None or a number of seconds, got {timeout!r}")
    value = float(timeout)  # an int beyond 1.8e308 is inf here: a wait without limit
    if math.isnan(value):
        raise InvalidArgumentError(f"{what} must be None or a number of seconds, got nan")
    return value


def _coerce(field: FieldSpec, value, batch: int | None) -> np.ndarray:
    """Check ``value`` against ``field`` (with a leading batch axis if ``batch``); no copy if ok."""
    shape = field.shape if batch is None else (batch, *field.shape)
    dtype = field.np_dtype
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
        if arr.dtype != dtype and not np.can_cast(arr.dtype, dtype, "safe"):
            raise SignatureError(
                f"field {field.name!r}: expected dtype {field.dtype} (or one that casts to it "
                f"without loss), got {arr.dtype}"
            )
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"field {field.name!r}: cannot read {value!r}: {exc}") from None
        if arr.dtype.kind not in "biuf" or not python_values_fit(arr, dtype):
            raise SignatureError(
                f"field {field.name!r}: expected {field.dtype} values, got {value!r} "
                f"({arr.dtype}) which does not fit without loss"
            )
    if arr.shape != shape:
        what = "batch shape" if batch is not None else "shape"
        raise SignatureError(f"field {field.name!r}: expected {what} {shape}, got {arr.shape}")
    return arr


class ReservedSlot:
    """Writable views of one reserved slot: ``slot["obs"][...] = frame``; 0-d for scalars.

    The views are valid inside the ``with`` block only: when it ends (committed or discarded)
    they are made read-only and ``slot[field]`` raises :class:`ClientClosedError`, because the
    slot then belongs to the table (a committed item that samplers read, a slot that is
    recycled). A view derived from them inside the block (``v = slot["obs"][2:]``) is a numpy
    view of its own that cannot be recalled: do not keep one past the block.
    """

    def __init__(self, views: dict[str, np.ndarray], key: int) -> None:
        self._views = views
        self._open = True
        self.key = key  # the item's key once committed

    def __getitem__(self, field: str) -> np.ndarray:
        if not self._open:
            raise ClientClosedError(
                f"the reservation of key {self.key} ended with its with-block: its item is "
                "committed (or discarded) and no longer writable; reserve() a new slot"
            )
        try:
            return self._views[field]
        except KeyError:
            raise SignatureError(
                f"no field {field!r} in this table; fields: {', '.join(self._views)}"
            ) from None

    def keys(self) -> Iterable[str]:
        return self._views.keys()

    def _end(self) -> None:
        """Revoke write access: every view handed out becomes read-only."""
        self._open = False
        for view in self._views.values():
            view.flags.writeable = False


class _Reservation:
    def __init__(
        self,
        table: Table,
        priority: float,
        timeout: float | None,
        episode: tuple[int, int, int] = (0, 0, 0),
    ) -> None:
        self.table, self.priority, self.timeout = table, priority, timeout
        self.episode = episode
        self.slot = -1
        self.reserved: ReservedSlot | None = None

    def __enter__(self) -> ReservedSlot:
        t = self.table
        self.slot = slot = t._take_one(self.timeout)
        core = t.core
        self.gen = t._w.begin(slot)  # odd while being written
        views = {f.name: column[slot, ...] for f, _, _, column in t._columns}
        self.reserved = ReservedSlot(views, int(core.key[slot]))
        return self.reserved

    def __exit__(self, exc_type, exc, tb) -> None:
        t, slot = self.table, self.slot
        if self.reserved is not None:
            self.reserved._end()  # before the item becomes visible, or its slot reusable
        core = t.core
        if core is None:
            return
        if exc_type is not None:
            t._w.abandon(slot, self.gen)  # discarded: reused by the next insert, never published
            return
        t._w.end(slot, self.gen, self.priority, *self.episode)  # even: complete
        t._publish_one(slot)


class Table:
    """A handle on one table of an attached instance. Get it with ``client.table(name)``."""

    _closed = False

    def __init__(self, client: Client, core: TableCore) -> None:
        self.client = client
        self.core = core
        self.name = core.name
        self.spec = core.spec
        self._fields = self.spec.signature
        self._field_names = {f.name for f in self._fields}
        # (field, its dtype, the numpy scalar type a 0-d field takes as is, its data array)
        self._columns = [
            (f, f.np_dtype, f.np_dtype.type if f.shape == () else None, core.data[f.name])
            for f in self._fields
        ]
        c = client.channel
        self._chan = core.chan[c]
        self._lease = core.lease_ring[c]
        self._publish = core.publish_ring[c]
        # The insert path in C: it holds the channel's words and rings, the slot metadata and
        # the data columns, and the local ring positions (lease_head, pub_tail, ...).
        arrays = core.segment.arrays
        self._w = _native.Writer(
            arrays["chan.ctrl"][c],
            arrays["ctrl"],
            self._lease,
            self._publish,
            core.gen,
            core.priority,
            core.episode,
            core.episode_steps,
            core.key,
            [column for _, _, _, column in self._columns],
            [f.name for f in self._fields],
            [scalar_type for _, _, scalar_type, _ in self._columns],
            np.ndarray,
            float(core.max_priority),
            int(core.daemon_pid) if core.daemon_pid is not None else -1,
        )
        self._writing = False

    def _check(self, writing: bool = False) -> None:
        if self._closed:
            raise ClientClosedError(f"table {self.name!r}: its client is closed")
        self.client._check()
        ctrl = self.core.ctrl
        if (
            ctrl[Ctrl.SHUTDOWN]
            or ctrl[Ctrl.DAEMON_PID] != self.core.daemon_pid
            or self._chan[Chan.PID] != self.client._pid
            or (writing and ctrl[Ctrl.TABLE_STATE])
        ):
            # Raises: the daemon went away or was replaced, cut us off, or quarantined the table
            self.core.check_open(writing)

    # -- writing -------------------------------------------------------------------------------

    def insert(
        self,
        data: Mapping[str, object],
        priority: float = 1.0,
        timeout: float | None = None,
        *,
        episode: tuple[int, int, int] | None = None,
    ) -> int:
        """Insert one item; returns its key once published (sampleable once committed).

        Copies ``data`` into a leased slot. Blocks only if no slot is leased to this client
        (the daemon is behind, or the rate limiter holds inserts back), for at most ``timeout``
        seconds, then raises :class:`RateLimiterTimeout`. ``episode`` = (episode id ≠ 0, first
        step, last step) records which steps of which episode the item holds (trajectory
        writers pass it; ``info()`` counts episodes from it).
        """
        if timeout is None and episode is None and not self._closed and not self.client._closed:
            # The common case whole in C: exact dtypes and shapes, a float priority in range, an
            # open table, a leased slot. Anything else (_CHECK) takes the checked path below.
            w = self._w
            key = w.insert_mapping(data, priority)
            if key >= 0:
                if w.wake_needed:
                    self.core.events.daemon.post(1)
                return key
        self._check(writing=True)
        row = self._validate_row(data)
        prio = check_priority(priority, self.core.max_priority, self.name)
        timeout = _check_timeout(timeout)
        return self._write_row(row, prio, timeout, _check_episode(episode))

    def _validate_row(self, data: Mapping[str, object]) -> list[np.ndarray]:
        if not isinstance(data, Mapping):
            raise SignatureError(f"table {self.name!r}: data must be a mapping of field to value")
        if len(data) != len(self._columns):
            self._field_mismatch(data)
        row = []
        for f, dtype, scalar_type, _ in self._columns:
            try:
                v = data[f.name]  # with the length equal, every field found = same names
            except KeyError:
                self._field_mismatch(data)
            t = type(v)
            if t is scalar_type or (t is np.ndarray and v.dtype == dtype and v.shape == f.shape):
                row.append(v)
            else:
                row.append(_coerce(f, v, None))
        return row

    def _field_mismatch(self, data: Mapping[str, object]):
        missing = sorted(self._field_names - set(data))
        extra = sorted(set(data) - self._field_names)
        raise SignatureError(
            f"table {self.name!r}: fields do not match the signature "
            f"(missing {missing}, unknown {extra}); expected "
            + ", ".join(f"{f.name}: {f.dtype}{list(f.shape)}" for f in self._fields)
        )

    def _write_row(
        self,
        row: list[np.ndarray],
        priority: float,
        timeout: float | None,
        episode: tuple[int, int, int] = (0, 0, 0),
    ) -> int:
        w = self._w
        key = w.insert(row, priority, *episode)  # take, seqlocked copy, publish, wake rule
        if key >= 0:
            if w.wake_needed:
                self.core.events.daemon.post(1)
            return key
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if key == _BAD_VALUE:  # another dtype (checked to cast safely), or not contiguous
                row = [
                    np.ascontiguousarray(v, c[1]) for c, v in zip(self._columns, row, strict=True)
                ]
            elif key == _NO_ROOM:
                self._wait_for_room(1)
            else:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                self._wait_for_lease(remaining)
            key = w.insert(row, priority, *episode)
            if key >= 0:
                if w.wake_needed:
                    self.core.events.daemon.post(1)
                return key

    def insert_batch(
        self,
        data: Mapping[str, object],
        priorities=1.0,
        timeout: float | None = None,
        *,
        episodes=None,
    ) -> np.ndarray:
        """Insert a batch (leading axis = items); returns the keys as a uint64 array.

        ``priorities`` is one number or one per item; ``episodes`` (optional) one (episode id,
        first step, last step) row per item, as for :meth:`insert`. All of the batch is
        validated before any of it is written; it is copied into leased slots chunk by chunk
        and each chunk is published as soon as it is written.

        Blocks while no slot is leased to this client (the rate limiter holds inserts back, or
        the daemon is behind), for at most ``timeout`` seconds in all (None: without limit).
        Then it raises :class:`RateLimiterTimeout` whose ``keys`` attribute holds the keys of
        the items already written: the first ``len(exc.keys)`` items of the batch, which are
        committed like any insert. A retry sends the rest only::

            try:
                keys = table.insert_batch(batch, timeout=1.0)
            except shmreplay.RateLimiterTimeout as exc:
                done = len(exc.keys)   # items [0, done) are in; retry items [done, n)
        """
        keys, done = None, 0
        if (
            timeout is None
            and (episodes is None or type(episodes) is np.ndarray)
            and type(data) is dict
            and not self._closed
            and not self.client._closed
        ):
            keys, done = self._insert_batch_c(data, priorities, episodes)
            if keys is not None and done == len(keys):
                return keys
        self._check(writing=True)
        timeout = _check_timeout(timeout)
        if not isinstance(data, Mapping):
            raise SignatureError(f"table {self.name!r}: data must be a mapping of field to array")
        if len(data) != len(self._fields) or not all(k in self._field_names for k in data):
            self._field_mismatch(data)
        first = data[self._fields[0].name]
        n = len(first) if hasattr(first, "__len__") else -1
        if n < 0:
            raise SignatureError(
                f"field {self._fields[0].name!r}: expected a batch with a leading axis"
            )
        cols = [np.ascontiguousarray(_coerce(f, data[f.name], n), f.np_dtype) for f in self._fields]
        prios = np.ascontiguousarray(
            check_priorities(priorities, n, self.core.max_priority, self.name), np.float64
        )
        eps = np.zeros((n, 3), np.int64) if episodes is None else _check_episodes(episodes, n)
        eps = np.ascontiguousarray(eps, np.int64)
        if keys is None or len(keys) != n:
            keys, done = np.empty(n, np.uint64), 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while done < n:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                slots = self._take_slots(n - done, remaining)
            except RateLimiterTimeout as exc:
                # Items [0, done) are published and will be committed: hand their keys back,
                # so that a retry does not insert them twice.
                raise RateLimiterTimeout(
                    f"{exc}; {done} of the batch's {n} items were written before the timeout "
                    f"(their keys are in this error's .keys); retry with items [{done}:{n}]",
                    keys=keys[:done].copy(),
                ) from None
            k = len(slots)
            end = done + k
            self._w.write_batch(  # seqlocked gather into the slots (GIL released when large)
                slots, [c[done:end] for c in cols], prios[done:end], eps[done:end], keys[done:end]
            )
            self._publish_many(slots)
            done += k
        return keys

    def _insert_batch_c(
        self, data: dict, priorities, episodes: np.ndarray | None = None
    ) -> tuple[np.ndarray | None, int]:
        """insert_batch's common case in C (exact dtypes and shapes, float priorities in range,
        no timeout, episodes None or int64[n, 3] whose steps fit int32): (keys, items written
        and published). Stops short when it must wait for leases or commits (insert_batch's
        checked path goes on from there); (None, 0) when it is not the common case."""
        first = data.get(self._fields[0].name)
        if type(first) is not np.ndarray or first.ndim == 0:
            return None, 0
        w = self._w
        keys = np.empty(len(first), np.uint64)
        done = w.insert_batch_mapping(data, priorities, keys, 0, episodes)
        if done < 0:
            return None, 0
        while done < len(keys) and w.wake_needed:  # posts between chunks, as _publish_many
            self.core.events.daemon.post(1)
            more = w.insert_batch_mapping(data, priorities, keys, done, episodes)
            if more < 0:  # the table was closed or quarantined meanwhile: the checked path
                return keys, done  # goes on from ``done`` (and raises)
            done = more
        if w.wake_needed:
            self.core.events.daemon.post(1)
        return keys, done

    def reserve(
        self,
        priority: float = 1.0,
        timeout: float | None = None,
        *,
        episode: tuple[int, int, int] | None = None,
    ) -> _Reservation:
        """Reserve a slot and write into it in place (zero-copy)::

            with table.reserve(priority=1.0) as slot:
                slot["obs"][...] = frame      # a view into shared memory
            key = slot.key

        Published on a clean exit; discarded (never visible) if the block raises.
        """
        self._check(writing=True)
        prio = check_priority(priority, self.core.max_priority, self.name)
        return _Reservation(self, prio, _check_timeout(timeout), _check_episode(episode))

    def _take_one(self, timeout: float | None) -> int:
        """One leased slot (an abandoned reservation's first), waiting for the daemon's lease
        for at most ``timeout`` seconds."""
        slot = self._w.take_one()
        while slot < 0:
            self._wait_for_lease(timeout, 1)
            slot = self._w.take_one()
        return slot

    def _take_slots(self, n: int, timeout: float | None) -> np.ndarray:
        """1 to n leased slots (at most a lease ring's worth), waiting as _take_one does."""
        out = np.empty(min(n, LEASE_CAPACITY), np.int64)
        k = self._w.take(out)
        while k < 0:
            self._wait_for_lease(timeout, n)
            k = self._w.take(out)
        return out[:k]

    def _wait_for_lease(self, timeout: float | None, n: int = 1) -> None:
        """Wait until the daemon leases us a slot. Under a limiter that can block inserts we ask
        for exactly the ``n`` we need now (slots leased ahead would be counted as inserted and
        could starve other writers); otherwise the daemon keeps our lease ring filled."""
        core = self.core
        chan = self._chan
        on_demand = core.limiter.blocks_inserts
        if on_demand:
            chan[Chan.WANT_LEASE] = n
        elif not chan[Chan.WANT_LEASE]:
            chan[Chan.WANT_LEASE] = 1
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                chan[Chan.WAIT_INSERT] = 1
                self._wake_daemon(force=True)  # its seq_cst fence orders the flag before...
                if self._w.leased() > 0 or self._w.spare:  # ...LEASE_TAIL's load-acquire
                    if on_demand:
                        chan[Chan.WANT_LEASE] = 0
                    return
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    if on_demand:
                        chan[Chan.WANT_LEASE] = 0
                    lim = core.limiter.info()
                    raise RateLimiterTimeout(
                        f"table {self.name!r}: insert blocked for {timeout} s "
                        f"(size {int(core.ctrl[Ctrl.SIZE])}/{self.spec.max_size}, "
                        f"{core.free_count} free slots, rate limiter {lim.kind}: "
                        f"inserts {lim.inserts}, samples {lim.samples}, deletes {lim.deletes}, "
                        f"max_diff {lim.max_diff:g}); pass a longer timeout"
                    )
                core.events.insert.wait(0.5 if remaining is None else remaining)
                core.check_open(writing=True)
        finally:
            chan[Chan.WAIT_INSERT] = 0

    def _publish_one(self, slot: int) -> None:
        w = self._w
        while w.publish_one(slot) == _NO_ROOM:
            self._wait_for_room(1)
        self._wake_daemon()

    def _publish_many(self, slots: np.ndarray) -> None:
        """Publish ``slots`` (int64, contiguous) in runs of half a ring, each with one
        store-release of PUB_TAIL, waking the daemon by the wake rule after each."""
        w = self._w
        for start in range(0, len(slots), PUBLISH_CAPACITY // 2):
            part = slots[start : start + PUBLISH_CAPACITY // 2]
            while w.publish(part) == _NO_ROOM:
                self._wait_for_room(len(part))
            self._wake_daemon()

    def _wait_for_room(self, k: int) -> None:
        w = self._w
        while not w.room(k):
            self._wait_committed(w.pub_tail + k - PUBLISH_CAPACITY, None)

    def _wake_daemon(self, force: bool = False) -> None:
        """Post the daemon if it sleeps for long, or naps while we are about to need leases or
        a sampler waits for items (the rule is shm_writer_wake in engine/csrc/writer.c)."""
        if self._w.wake(force):
            self.core.events.daemon.post(1)

    def _wait_committed(self, upto: int, timeout: float | None) -> None:
        core, chan = self.core, self._chan
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                chan[Chan.WAIT_INSERT] = 1
                committed = self._w.committed()
                if committed >= upto:
                    return
                self._wake_daemon(force=True)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise RateLimiterTimeout(
                        f"table {self.name!r}: flush timed out after {timeout} s with "
                        f"{upto - committed} item(s) not yet committed by the daemon"
                    )
                core.events.insert.wait(0.5 if remaining is None else remaining)
                core.check_open(writing=True)
        finally:
            chan[Chan.WAIT_INSERT] = 0

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything this client published to the table is committed."""
        self._check()
        self._wait_committed(self._w.pub_tail, _check_timeout(timeout))

    # -- sampling and mutation ------------------------------------------------------------------

    def sample(
        self,
        batch_size: int,
        timeout: float | None = None,
        *,
        partial: bool = False,
        out: dict[str, np.ndarray] | None = None,
    ) -> Sample:
        """Sample ``batch_size`` items; ``.data[field]`` is ``[B, *shape]``, ``.info`` per item.

        Blocks while the rate limiter (or an empty table) forbids sampling, for at most
        ``timeout`` seconds (None: forever), then raises :class:`RateLimiterTimeout`, or with
        ``partial=True`` returns the items it has if any. Items are taken one by one as the
        limiter allows, as in Reverb; those a timed-out call had taken are not lost: the next
        ``sample`` call on this handle returns them first. Rows are copied into new arrays, or
        into ``out`` (C-contiguous arrays of shape ``[B, *shape]``) when given.
        """
        self._check()
        return self.core.sample(
            batch_size,
            channel=self.client.channel,
            timeout=_check_timeout(timeout),
            partial=partial,
            out=out,
        )

    def sample_nowait(self, batch_size: int, *, out: dict[str, np.ndarray] | None = None) -> Sample:
        """Sample ``batch_size`` items if the rate limiter allows it now; otherwise raise
        :class:`RateLimiterTimeout` at once."""
        return self.sample(batch_size, timeout=0.0, out=out)

    def as_iterator(
        self,
        batch_size: int,
        prefetch: int = 2,
        timeout: float | None = None,
        *,
        keep: int = 1,
        copy: bool = False,
        seed: int | None = None,
    ) -> Prefetcher:
        """An iterator of :class:`Sample` batches that a background thread samples ahead, so
        that sampling overlaps training (see :mod:`shmreplay.client.loader`)::

            with table.as_iterator(256, prefetch=2) as batches:
                for batch in batches:
                    table.update_priorities(batch.info.key, train_step(batch.data))

        The thread attaches a client of its own; this handle stays usable meanwhile. Batches
        are sampled into ``prefetch + keep`` reused buffer sets: a batch's data arrays stay
        valid until ``keep`` more batches are taken (``info`` arrays are never reused);
        ``copy=True`` yields fresh arrays instead. Each ``next()`` waits up to ``timeout``
        seconds (None: forever) for a batch, then raises :class:`RateLimiterTimeout` (the
        iterator stays usable); an error of the thread (:class:`DaemonNotRunning`, ...) is
        raised by ``next()``. Batches are always full (no ``partial``). ``close()``, a ``with``
        block or dropping the iterator stops the thread within ~0.1 s.
        """
        return Prefetcher(
            self, batch_size, prefetch=prefetch, timeout=timeout, keep=keep, copy=copy, seed=seed
        )

    def update_priorities(
        self, keys, priorities, *, deletes=None, timeout: float | None = None
    ) -> int:
        """Set the priorities of items by key; keys no longer present are ignored and counted.

        Returns the number of missing keys. Duplicate keys: the last priority wins. ``deletes``
        (keys) are deleted first, atomically with the update, as Reverb's mutation does.

        ``keys``, ``priorities`` and ``deletes`` may be numpy arrays, lists, torch tensors (on
        any device, requiring grad or not: they are detached and copied to the host) or JAX
        arrays. Keys are uint64; int64 keys ≥ 0 (as :mod:`shmreplay.torch` yields) are accepted.
        Safe to call from one thread while another thread samples through another client
        (e.g. :meth:`as_iterator`'s): the table lock orders them.

        ``timeout`` (here and in :meth:`delete`, :meth:`reset`, :meth:`info`) bounds the wait
        for the table lock, which a live process holds for microseconds; only a stopped
        (SIGSTOP) or stuck holder makes it run out: :class:`LockTimeout` names its pid.
        None waits as long as it takes.
        """
        self._check()
        k = check_keys(keys)
        d = None if deletes is None else check_keys(deletes, "deletes")
        # TableCore.update_priorities checks the priorities (once: ~6 µs a call).
        return self.core.update_priorities(k, priorities, d, timeout=_check_timeout(timeout))

    def delete(self, keys, *, timeout: float | None = None) -> int:
        """Delete items by key; returns how many keys were not present. ``keys`` as for
        :meth:`update_priorities` (arrays, lists, torch tensors, JAX arrays)."""
        self._check()
        return self.core.delete(check_keys(keys), timeout=_check_timeout(timeout))

    def reset(self, *, timeout: float | None = None) -> None:
        """Remove every item and zero the rate limiter's counters."""
        self._check()
        self.core.reset(timeout=_check_timeout(timeout))

    def info(self, *, timeout: float | None = None) -> TableInfo:
        """A frozen statistics record, a consistent snapshot taken under the table lock."""
        self._check()
        return self.core.info(timeout=_check_timeout(timeout))

    def __repr__(self) -> str:
        return f"<shmreplay.Table {self.name!r} of instance {self.client.instance!r}>"
