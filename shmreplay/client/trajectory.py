"""The trajectory writer: append steps, make items that span several steps (Reverb's semantics).

Most users do not insert single transitions: they append one step at a time and create items
that cover several steps (n-step transitions, R2D2 sequences of 80 steps overlapping by 40, whole
episodes). :class:`TrajectoryWriter` does that with Reverb's calls::

    writer = TrajectoryWriter(client, num_keep_alive_refs=80)
    with writer:
        for episode in range(num_episodes):
            obs = env.reset()
            for t in range(episode_length):
                action = policy(obs)
                obs, reward, done = env.step(action)
                writer.append({"obs": obs, "action": action, "reward": reward})
                if writer.episode_steps >= 80 and writer.episode_steps % 40 == 0:
                    writer.create_item("r2d2", priority=1.0, trajectory={
                        "obs": writer.history["obs"][-80:],        # [80, 84, 84, 4]
                        "action": writer.history["action"][-80:],  # [80]
                        "reward": writer.history["reward"][-80:],  # [80]
                    })
            writer.end_episode()
    # leaving the block flushed the writer: every item is in the table

The history
-----------
``writer.history[field]`` is the field's column of steps since the last ``end_episode()`` that
cleared the buffers. It is indexed like a list::

    history index      0    1    2    3    4    5    6    7      len(history["obs"]) == 8
    negative index    -8   -7   -6   -5   -4   -3   -2   -1     (-1: the newest step)
    kept (K = 3)                                  [5    6    7]  older steps cannot be used

- ``history[f][-1]`` selects one step *without* a time axis (the field's step shape);
- ``history[f][a:b]`` and ``history[f][[0, 2, 5]]`` select steps *with* a time axis:
  ``T`` steps become ``[T, *step_shape]``.

Only the newest ``num_keep_alive_refs`` steps are kept: an item that references an older step
raises :class:`~shmreplay.InvalidArgumentError` at ``create_item``, naming the step and the
setting to raise. A step can be filled by several calls (``append(..., partial_step=True)``);
it is closed by the next ``append`` without ``partial_step``. A field may be given once per step;
fields missing from a step (or first seen after it) have no value there, and an item that uses
such a value is refused.

How data moves, and why each step costs the same whatever the item length
-------------------------------------------------------------------------
Every field's history is a preallocated numpy ring of ``num_keep_alive_refs`` + slack steps in
this process: ``append`` writes one row per field. A selection is only ``(ring, first step,
length)``; nothing is copied until the item is written:

- Items of at least ``DIRECT_MIN_BYTES`` (an Atari sequence) are written by ``create_item``
  straight into a slot of the table's shared memory with ``Table.reserve()``: one slice copy per
  field (two when the selection wraps round the ring).
- Smaller items (W1-sized steps, n-step transitions) are kept pending and sent in batches with
  ``Table.insert_batch``, one vectorised gather per field per batch: a single ``Table.insert``
  costs ~10 µs of Python, more than the whole per-step budget of 100k steps/s. A pending item is
  sent when its batch is full, when it has waited ``max_latency`` seconds (checked at each call
  of the writer; an item that follows a pause longer than that is sent at once), before the ring
  would overwrite a step it references, and by ``flush()``, ``end_episode()`` and the end of a
  ``with`` block. Reverb's writer also sends items in the background after ``create_item``
  returns; as there, call ``flush()`` when you need them in the table.

Items become sampleable when the daemon commits them (``flush()`` waits for that). A call that
sends items blocks while the table's rate limiter holds inserts back, as ``Table.insert`` does;
``flush(timeout=)`` and ``end_episode(timeout=)`` bound that wait.

Every episode gets an id, ``writer.episode_id`` = ``pid << 32 | n`` (unique on the host while
the process lives), renewed by ``end_episode()``.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import FieldSpec
from ..engine import _native
from ..engine.shm import physical_memory
from ..errors import ClientClosedError, InvalidArgumentError, RateLimiterTimeout, SignatureError
from ..values import check_priority, python_values_fit

if TYPE_CHECKING:
    from .client import Client, Table

__all__ = ["TrajectoryWriter", "TrajectoryColumn", "ColumnHistory", "History"]

# Items of at least this many bytes are written by create_item straight into shared memory
# (reserve(): one copy). Below it, batching wins: measured here for 32-step items, a reserved
# item costs 11-12 µs up to 33 KB (Python overhead), a batched one 1.3 µs at 1.3 KB and 9.4 µs
# at 33 KB; at 131 KB the batch's second copy makes it slower (47 µs against 30 µs).
DIRECT_MIN_BYTES = 64 << 10
# A batch's staging arrays stay within this many bytes (cache-sized: larger batches of large
# items were slower, not faster), and hold at most MAX_BATCH_ITEMS items.
STAGING_BYTES = 1 << 20
MAX_BATCH_ITEMS = 128


# Rows a field's ring holds beyond num_keep_alive_refs, so that pending items keep their steps
# while a batch fills: STAGING_BYTES worth of steps, within these bounds.
MIN_SLACK, MAX_SLACK = 8, 128
# How long an item may wait in a batch, in seconds: about the daemon's own commit delay.
DEFAULT_MAX_LATENCY = 0.001

_episode_counter = itertools.count()


def _new_episode_id() -> int:
    """``pid << 32 | n``: unique among the live processes of the host, ordered within one."""
    return (os.getpid() << 32) | (next(_episode_counter) & 0xFFFFFFFF)


class _Column:
    """One field's history: a ring of ``rows`` steps; step ``s`` (counted over the writer's
    life) lives in row ``s % rows``."""

    __slots__ = (
        "writer",
        "name",
        "dtype",
        "shape",
        "python",
        "fast",
        "ring",
        "rows",
        "born",
        "complete_since",
        "missing",
        "history",
    )

    def __init__(self, writer: TrajectoryWriter, name: str, value: Any, step: int) -> None:
        if isinstance(value, (np.ndarray, np.generic)):
            arr = np.asarray(value)
            python = False
        else:
            try:
                arr = np.asarray(value)
            except (TypeError, ValueError) as exc:
                raise InvalidArgumentError(
                    f"field {name!r}: cannot read {value!r} as a number or array: {exc}"
                ) from None
            python = True
        if arr.dtype.kind not in "biufc":
            raise InvalidArgumentError(
                f"field {name!r}: needs numbers (bool, int, float or complex), got {value!r} "
                f"({arr.dtype})"
            )
        self.writer = writer
        self.name = name
        self.dtype = arr.dtype
        self.shape = arr.shape
        # Python numbers that the ring's dtype holds as they are, besides its own numpy scalar.
        self.python = python
        fast: set[type] = {arr.dtype.type} if arr.shape == () else set()
        if arr.shape == ():
            fast.add(bool)
            if self.dtype.kind in "fc":
                fast.update((int, float))
            elif self.dtype == np.int64:
                fast.add(int)  # numpy raises OverflowError itself beyond int64
        self.fast = frozenset(fast)
        step_bytes = max(1, arr.nbytes)
        slack = min(MAX_SLACK, max(MIN_SLACK, STAGING_BYTES // step_bytes))
        self.rows = writer.num_keep_alive_refs + slack
        need, have = self.rows * step_bytes, physical_memory()
        if have is not None and need > have:
            raise InvalidArgumentError(
                f"field {name!r}: num_keep_alive_refs={writer.num_keep_alive_refs:,} steps of "
                f"{arr.nbytes:,} bytes need {need:,} bytes of history, more than this machine's "
                f"{have:,} bytes of memory; keep fewer steps alive"
            )
        try:
            self.ring = np.empty((self.rows, *arr.shape), arr.dtype)
        except MemoryError:
            raise InvalidArgumentError(
                f"field {name!r}: cannot allocate the history of {self.rows:,} steps "
                f"({need:,} bytes); keep fewer steps alive (num_keep_alive_refs)"
            ) from None
        self.born = step  # steps before this one have no value for this field
        self.complete_since = step  # every step from here on has a value, as far as closed
        self.missing: deque[int] = deque()  # closed steps without a value (recent ones)
        self.history = ColumnHistory(self)

    def coerce(self, value: Any, step: int) -> Any:
        """``value`` checked against the field's dtype and shape (set by its first value)."""
        if isinstance(value, (np.ndarray, np.generic)):
            arr = np.asarray(value)
            if arr.dtype != self.dtype and not np.can_cast(arr.dtype, self.dtype, "safe"):
                raise InvalidArgumentError(
                    f"field {self.name!r} at step {step}: dtype {arr.dtype} does not cast "
                    f"without loss to {self.dtype}, the dtype of the field's first value"
                )
        else:
            try:
                arr = np.asarray(value)
            except (TypeError, ValueError) as exc:
                raise InvalidArgumentError(
                    f"field {self.name!r} at step {step}: cannot read {value!r}: {exc}"
                ) from None
            if arr.dtype.kind not in "biufc" or not python_values_fit(arr, self.dtype):
                raise InvalidArgumentError(
                    f"field {self.name!r} at step {step}: {value!r} does not fit {self.dtype}, "
                    "the dtype of the field's first value, without loss"
                )
        if arr.shape != self.shape:
            raise InvalidArgumentError(
                f"field {self.name!r} at step {step}: shape {arr.shape} differs from "
                f"{self.shape}, the shape of the field's first value"
            )
        return arr

    def unset_steps(self, steps: np.ndarray) -> np.ndarray:
        """Those of ``steps`` that have no value for this field."""
        w = self.writer
        if len(steps) <= 16:  # the usual few steps: np.isin costs ~100 µs, a set ~1 µs
            missing = set(self.missing)
            if w._step_open and self.name not in w._open_fields:
                missing.add(w._total - 1)
            born = self.born
            unset = [s for s in steps.tolist() if s < born or s in missing]
            return np.array(unset, dtype=np.int64)
        bad = steps < self.born
        if self.missing:
            bad |= np.isin(steps, np.fromiter(self.missing, np.int64, len(self.missing)))
        if w._step_open and self.name not in w._open_fields:
            bad |= steps == w._total - 1
        return steps[bad]


class TrajectoryColumn(_native.TrajSel):
    """A selection of steps of one field of a writer's history: what ``create_item`` takes.

    Made by indexing ``writer.history[field]``. It holds no data, only the steps it refers to
    (``len()`` of them); the values are copied when the item is written, or by :meth:`numpy`.
    ``squeezed`` selections (an integer index) have no time axis.
    """

    # The fields are the C base's (read-only): _col, _start (the first, lowest, step referenced),
    # _length, _indices (None: the steps _start .. _start + _length - 1, in order) and _kind
    # (the layout: 0 consecutive steps, 1 one step without time axis, 2 steps by index), set by
    # TrajectoryColumn(col, start, length, indices=None, squeezed=False) or made in C by
    # ColumnHistory's indexing.
    __slots__ = ()

    @property
    def squeezed(self) -> bool:
        """Whether this is a single step without time axis (made by an integer index)."""
        return self._kind == 1

    @property
    def field(self) -> str:
        """The history field this selection is taken from."""
        return self._col.name

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the selected data: ``[T, *step_shape]``, or the step shape if squeezed."""
        return self._col.shape if self.squeezed else (self._length, *self._col.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._col.dtype

    def __len__(self) -> int:
        return self._length

    @property
    def _last(self) -> int:
        if self._indices is None:
            return self._start + self._length - 1
        return int(self._indices.max()) if self._length else self._start

    def steps(self) -> np.ndarray:
        """The writer's step numbers this selection refers to, in order (int64)."""
        if self._indices is None:
            return np.arange(self._start, self._start + self._length, dtype=np.int64)
        return self._indices.copy()

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray) -> TrajectoryColumn:
        """A sub-selection, indexed like the steps of this selection."""
        if self.squeezed:
            raise InvalidArgumentError("a single-step selection cannot be indexed further")
        return _select(self._col, key, self._length, steps=self.steps())

    def numpy(self) -> np.ndarray:
        """A copy of the selected values (``shape``, ``dtype``); the steps must still be kept."""
        w = self._col.writer
        what = f"history[{self._col.name!r}] selection"
        w._check_alive(self, what)
        w._check_set(self, what)
        out = np.empty(self.shape, self._col.dtype)
        self._copy_into(out)
        return out

    def _copy_into(self, out: np.ndarray) -> None:
        """Copy the values into ``out`` (which has ``shape``): one or two slice copies."""
        col = self._col
        ring, rows = col.ring, col.rows
        if self._indices is not None:
            rix = self._indices % rows
            out[...] = ring[rix[0]] if self.squeezed else ring[rix]
            return
        r0 = self._start % rows
        if self.squeezed:
            out[...] = ring[r0]
            return
        n = self._length
        if r0 + n <= rows:
            out[...] = ring[r0 : r0 + n]
        else:  # the selection wraps round the ring
            k = rows - r0
            out[:k] = ring[r0:]
            out[k:] = ring[: n - k]

    def __repr__(self) -> str:
        what = (
            f"step {self._start}"
            if self.squeezed
            else (
                f"steps {self._start}..{self._start + self._length - 1}"
                if self._indices is None
                else f"steps {self._indices.tolist()}"
            )
        )
        return f"<TrajectoryColumn {self._col.name!r} {what}: {self.dtype}{list(self.shape)}>"


def _select(
    col: _Column, key: Any, n: int, base: int = 0, steps: np.ndarray | None = None
) -> TrajectoryColumn:
    """Select by ``key`` among ``n`` steps, indexed like a list: index i is step ``base + i``
    (a field's history), or ``steps[i]`` (a selection's steps). Costs O(selected), not O(n)."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        i = int(key)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"history[{col.name!r}]: index {i} is out of range for {n} steps")
        return TrajectoryColumn(col, base + j if steps is None else int(steps[j]), 1, None, True)
    if isinstance(key, slice):
        idx = np.arange(*key.indices(n), dtype=np.int64)
    else:
        idx = np.asarray(key)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise InvalidArgumentError(
                f"history[{col.name!r}]: index with an int, a slice or a list of ints, got {key!r}"
            )
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"history[{col.name!r}]: indices {key!r} out of range for {n} steps")
        idx[idx < 0] += n
    return _from_steps(col, idx + base if steps is None else steps[idx])


def _from_steps(col: _Column, chosen: np.ndarray) -> TrajectoryColumn:
    k = len(chosen)
    if k == 0:
        return TrajectoryColumn(col, 0, 0)
    first = int(chosen[0])
    if int(chosen[-1]) - first == k - 1 and (k < 3 or bool((np.diff(chosen) == 1).all())):
        return TrajectoryColumn(col, first, k)  # consecutive: slice copies, no fancy indexing
    return TrajectoryColumn(col, int(chosen.min()), k, np.ascontiguousarray(chosen, np.int64))


class ColumnHistory(_native.TrajHistory):
    """One field's history, indexed like a list (see the module docstring): ``h[-1]``,
    ``h[a:b]``, ``h[[0, 2, 5]]``. Positive indices count from the first step since the history
    was last cleared, negative ones from the newest step."""

    __slots__ = ()

    def __init__(self, col: _Column) -> None:
        # h[-T:] and h[i] are answered by the C base; other keys come to _select_slow.
        super().__init__(col, col.writer, TrajectoryColumn)

    def __len__(self) -> int:
        w = self._col.writer
        return w._total - w._history_start

    if TYPE_CHECKING:

        def __getitem__(
            self, key: int | slice | Sequence[int] | np.ndarray
        ) -> TrajectoryColumn: ...

    def _select_slow(self, key: Any) -> TrajectoryColumn:
        col = self._col
        w = col.writer
        total = w._total
        if type(key) is slice and key.step is None:  # the common case, without arrays
            first = key.start
            if type(first) is int and first < 0 and key.stop is None:  # h[-T:], the commonest
                first += total
                if first < w._history_start:
                    first = w._history_start
                return TrajectoryColumn(col, first, total - first)
            base = w._history_start
            first, stop, _ = key.indices(total - base)
            return TrajectoryColumn(col, base + first, stop - first if stop > first else 0)
        base = w._history_start
        n = total - base
        if type(key) is int:
            j = key + n if key < 0 else key
            if not 0 <= j < n:
                raise IndexError(
                    f"history[{col.name!r}]: index {key} is out of range for {n} steps"
                )
            return TrajectoryColumn(col, base + j, 1, None, True)
        return _select(col, key, n, base)

    def __repr__(self) -> str:
        c = self._col
        return f"<ColumnHistory {c.name!r}: {len(self)} steps of {c.dtype}{list(c.shape)}>"


class History(dict):
    """``writer.history``: field name → :class:`ColumnHistory`, in order of first appearance.

    A read-only dict (a lookup is a C-level dict lookup: it runs once per field per item); an
    unknown field raises :class:`~shmreplay.InvalidArgumentError` naming the known ones.
    """

    __slots__ = ()

    def __missing__(self, field: str) -> ColumnHistory:
        known = ", ".join(repr(f) for f in self) or "none yet"
        raise InvalidArgumentError(
            f"the writer's history has no field {field!r}; fields appended so far: {known}"
        )

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("writer.history is read-only: append steps with writer.append()")

    __setitem__ = __delitem__ = _read_only  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = __ior__ = _read_only  # type: ignore[assignment]


class _TableState:
    """What the writer keeps per table: the handle, the signature, the pending batch."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.name = table.name
        self.fields: tuple[FieldSpec, ...] = tuple(table.spec.signature)
        self.names = tuple(f.name for f in self.fields)
        self.name_set = set(self.names)
        self.max_priority = table.core.max_priority  # fixed for the table's life
        row_bytes = table.spec.row_bytes
        self.direct = row_bytes >= DIRECT_MIN_BYTES
        self.cap = max(1, min(MAX_BATCH_ITEMS, STAGING_BYTES // max(1, row_bytes)))
        # The layout (column, length, kind) last accepted for each field: items made the same
        # way as the previous one skip validation. Older layouts stay in ``accepted``. A batch
        # whose items differ in a field's layout is ``mixed`` there, and gathered item by item.
        n = len(self.fields)
        self.vcol: list[_Column | None] = [None] * n
        self.vlen = [-1] * n
        self.vkind = [-1] * n
        self.mixed = [False] * n
        self.vrange = [False] * n  # Python ints into a narrower int field: check each item
        self.any_range = False
        self.accepted: dict[tuple, bool] = {}
        # Pending items: each a tuple of start steps, one per field (compact: the item was made
        # with the accepted layout of every field, which holds for as long as it is pending:
        # accept() expands them first), or a list of selections, one per field.
        self.items: list[tuple[int, ...] | list[TrajectoryColumn]] = []
        self.priorities: list[float] = []
        self.episodes: list[tuple[int, int, int]] = []  # (episode id, first step, last step)
        self.staging: list[np.ndarray] | None = None
        self.meta: tuple[np.ndarray, np.ndarray] | None = None  # a batch's priorities, episodes
        self.unconfirmed = 0  # items sent since the table was last flushed

    def accept(self, j: int, sel: TrajectoryColumn, validate: bool) -> None:
        """Make ``sel``'s layout the accepted one of field ``j``, after checking it against the
        signature (SignatureError naming the field, the expected and the got)."""
        key = (j, sel._col, sel._length, sel._kind)
        range_check = self.accepted.get(key)
        if range_check is None:
            range_check = self._check(self.fields[j], sel) if validate else False
            self.accepted[key] = range_check
        if self.items:
            self.items = [self.selections(item) for item in self.items]  # in the old layouts
        self.vcol[j], self.vlen[j], self.vkind[j] = sel._col, sel._length, sel._kind
        if self.items or sel._kind == 2:
            self.mixed[j] = True
        self.vrange[j] = range_check
        self.any_range = any(self.vrange)

    def selections(self, item: tuple[int, ...] | list[TrajectoryColumn]) -> list[TrajectoryColumn]:
        """A pending item's selections (a compact item's, in the accepted layouts)."""
        if type(item) is not tuple:
            return item
        return [
            TrajectoryColumn(col, start, length, None, kind == 1)
            for col, start, length, kind in zip(self.vcol, item, self.vlen, self.vkind, strict=True)
        ]

    def _check(self, f: FieldSpec, sel: TrajectoryColumn) -> bool:
        col = sel._col
        got_shape = sel.shape
        dtype = f.np_dtype
        range_check = False
        if col.dtype == dtype:
            ok = True
        elif col.python:
            # Python numbers are accepted as the client accepts them: by kind, ints by range.
            k = col.dtype.kind
            ok = (
                k == "b"
                or (k == "i" and dtype.kind in "iufc")
                or (k == "f" and dtype.kind in "fc")
                or (k == "c" and dtype.kind == "c")
            )
            range_check = k == "i" and dtype.kind in "iu"
        else:
            ok = bool(np.can_cast(col.dtype, dtype, "safe"))
        if got_shape != f.shape or not ok:
            what = (
                f"history[{col.name!r}] at one step (no time axis)"
                if sel.squeezed
                else f"{sel._length} step(s) of history[{col.name!r}]"
            )
            raise SignatureError(
                f"table {self.name!r}, field {f.name!r}: expected shape {f.shape} dtype "
                f"{f.dtype}, got shape {got_shape} dtype {col.dtype} ({what}"
                + ("" if ok else "; the dtype does not cast to the field's without loss")
                + ")"
            )
        return range_check

    def range_check(self, sels: list[TrajectoryColumn]) -> None:
        for f, sel, check in zip(self.fields, sels, self.vrange, strict=True):
            if not check:
                continue
            values = sel.numpy()
            if not python_values_fit(values, f.np_dtype):
                raise SignatureError(
                    f"table {self.name!r}, field {f.name!r}: expected {f.dtype} values, got "
                    f"integers from {values.min()} to {values.max()} in history[{sel.field!r}]"
                )


class TrajectoryWriter:
    """Appends steps to a per-writer history and makes items out of selections of it.

    ``num_keep_alive_refs`` (K) is how many of the newest steps items may reference: the
    longest item's length, plus the offset of its first step if it does not end at the newest
    step. ``validate=False`` skips the check of each item against the table's signature
    (cached per selection shape, so it costs little): a mismatch then shows as a numpy error
    when the item is written, possibly at a later call, or is broadcast by numpy.
    ``max_latency`` bounds how long a small item waits to be sent with others (seconds).

    Writing follows the module docstring: small items are batched, large ones written in place.
    A writer belongs to the client's process and is not thread-safe. Use it as a context
    manager: a clean exit flushes; an exception drops the items not yet sent and waits for
    nothing. ``client.trajectory_writer(K, **kw)`` makes one, as ``TrajectoryWriter(client, K,
    **kw)`` does.
    """

    _closed = False

    def __init__(
        self,
        client: Client,
        num_keep_alive_refs: int,
        *,
        validate: bool = True,
        max_latency: float = DEFAULT_MAX_LATENCY,
    ) -> None:
        if (
            isinstance(num_keep_alive_refs, bool)
            or not isinstance(num_keep_alive_refs, (int, np.integer))
            or num_keep_alive_refs < 1
        ):
            raise InvalidArgumentError(
                f"num_keep_alive_refs must be an integer >= 1, got {num_keep_alive_refs!r}"
            )
        if not (isinstance(max_latency, (int, float)) and 0 <= max_latency < math.inf):
            raise InvalidArgumentError(f"max_latency must be seconds >= 0, got {max_latency!r}")
        self.client = client
        self.num_keep_alive_refs = int(num_keep_alive_refs)
        self.validate = bool(validate)
        self.max_latency = float(max_latency)
        self._columns: dict[str, _Column] = {}
        self._history = History()
        self._rings: dict[str, Any] = {}  # field -> _native.TrajRing over its column's ring
        self._window_tables: dict[tuple[int, int], np.ndarray] = {}
        self._min_rows = 1 << 62  # the fewest rows of any field's ring
        self._tables: dict[str, _TableState] = {}
        self._total = 0  # steps appended over the writer's life (an open step included)
        self._history_start = 0  # the step that is history index 0
        self._episode_start = 0
        self._step_open = False  # the newest step was appended with partial_step=True
        self._open_fields: set[str] = set()  # fields given so far to the newest step
        self._pending_n = 0
        self._first_pending_step = 0  # the writer's step count when the oldest pending came
        self._first_pending_time = 0.0
        self._last_item_time = 0.0
        self.episode_id = _new_episode_id()

    def _windows(self, rows: int, length: int) -> np.ndarray:
        """``[rows, length]`` table of the ring rows of ``length`` consecutive steps from each
        row (wrapping round), shared by the rings of one size: a batch's row indices are then
        one lookup, not an outer sum and a modulo over every index (most of a batch's cost)."""
        table = self._window_tables.get((rows, length))
        if table is None:
            table = (np.arange(rows)[:, None] + np.arange(length)) % rows
            self._window_tables[(rows, length)] = table
        return table

    # -- steps ---------------------------------------------------------------------------------

    @property
    def history(self) -> History:
        """Field → :class:`ColumnHistory` of the steps since the history was last cleared."""
        return self._history

    @property
    def episode_steps(self) -> int:
        """Steps appended in the current episode, a step still open (partial) included."""
        return self._total - self._episode_start

    def append(self, step: Mapping[str, Any], partial_step: bool = False) -> None:
        """Add a step (field → value) to the history; copies the values into the history.

        With ``partial_step=True`` the step stays open and later calls add fields to it; the
        first call without it closes the step. Giving a field twice in one step is an
        :class:`~shmreplay.InvalidArgumentError`. A field's dtype and shape are those of its
        first value; later values must have that shape and cast to that dtype without loss.
        Fields may appear after the first step (they have no value in the steps before) and
        may be left out of a step. May send pending items (and so block, as ``Table.insert``
        does, while the rate limiter holds inserts back). Nothing is recorded if it raises.
        """
        if self._closed:
            self._raise_closed()
        if type(step) is not dict and not isinstance(step, Mapping):  # ABC checks are slow
            raise InvalidArgumentError(f"a step must be a mapping of field to value, got {step!r}")
        open_fields = self._open_fields
        if self._step_open:
            i = self._total - 1
            if not open_fields.isdisjoint(step):
                dup = sorted(open_fields.intersection(step))
                raise InvalidArgumentError(
                    f"field(s) {dup} already set in step {i - self._history_start} by an earlier "
                    "append(..., partial_step=True); a field is given once per step"
                )
        else:
            i = self._total
            # Pending items refer to steps >= (first pending step - K); the first of those
            # steps that row i would overwrite is that plus the shortest ring's rows.
            if self._pending_n and (
                i >= self._first_pending_step - self.num_keep_alive_refs + self._min_rows
                or time.monotonic() - self._first_pending_time >= self.max_latency
            ):
                self._send_all()  # before row i overwrites a step a pending item refers to
            # The common step (known fields, values of their own dtype and shape, or Python
            # numbers the field holds as they are) is copied by one C call; it writes nothing
            # when a value needs the checks below. A closed step's fields are only needed to
            # note the missing ones (_open_fields matters while a step is open).
            if not partial_step and _native.traj_append(step, self._rings, i):
                self._total = i + 1
                if len(step) != len(self._columns):
                    open_fields.clear()
                    open_fields.update(step)
                    self._close_missing(i)
                return
            open_fields.clear()
        cols = self._columns
        for name, value in step.items():
            col = cols.get(name)
            if col is None:
                if not isinstance(name, str):
                    raise InvalidArgumentError(f"field names must be str, got {name!r}")
                col = cols[name] = _Column(self, name, value, i)
                dict.__setitem__(self._history, name, col.history)
                self._rings[name] = _native.TrajRing(
                    col.ring, col.dtype.type if col.shape == () else None
                )
                self._min_rows = min(self._min_rows, col.rows)
            t = type(value)
            if t in col.fast or (
                t is np.ndarray and value.dtype == col.dtype and value.shape == col.shape
            ):
                col.ring[i % col.rows] = value
            else:
                col.ring[i % col.rows] = col.coerce(value, i - self._history_start)
        if not self._step_open:
            self._total = i + 1
        open_fields.update(step)
        self._step_open = bool(partial_step)
        if not partial_step and len(open_fields) != len(cols):
            self._close_missing(i)

    def _close_missing(self, i: int) -> None:
        """Step ``i`` closed without some fields: remember that they have no value there."""
        for name, col in self._columns.items():
            if name not in self._open_fields:
                col.complete_since = i + 1
                col.missing.append(i)
                while col.missing[0] <= i - col.rows:  # no longer in the ring anyway
                    col.missing.popleft()

    def end_episode(
        self, clear_buffers: bool = True, timeout: float | None = None, *, flush: bool = True
    ) -> None:
        """End the episode: close an open step, send every pending item and wait until the
        daemon has committed them (as :meth:`flush`), start a new ``episode_id``.

        ``clear_buffers=True`` empties the history (index 0 becomes the next step); keep the
        buffers only for items that span episodes. The episode ends even if the flush times
        out (:class:`~shmreplay.RateLimiterTimeout`; the items not yet sent stay pending).
        ``flush=False`` skips the flush: pending items go with the next batch, as in the middle
        of an episode (an actor with short episodes saves a commit round trip, ~2 ms, each).
        """
        if self._closed:
            self._raise_closed()
        if self._step_open:
            self._step_open = False
            if len(self._open_fields) != len(self._columns):
                self._close_missing(self._total - 1)
        self._episode_start = self._total
        if clear_buffers:
            self._history_start = self._total
        self.episode_id = _new_episode_id()
        if flush:
            self.flush(timeout=timeout)

    # -- items ---------------------------------------------------------------------------------

    def create_item(
        self, table: str, priority: float, trajectory: Mapping[str, TrajectoryColumn]
    ) -> None:
        """Make an item of ``table`` out of history selections, one per signature field.

        A selection of T steps fills a field of shape ``[T, *step_shape]``; a single-step
        selection (``history[f][-1]``) a field of the step's shape. Raises
        :class:`~shmreplay.SignatureError` naming the field, the expected and the got shape and
        dtype when a selection does not match the signature (dtypes must cast without loss), and
        :class:`~shmreplay.InvalidArgumentError` when it references a step no longer kept
        (older than ``num_keep_alive_refs`` steps or cleared by ``end_episode``) or one where
        the field has no value. Large items are copied into the table now (blocking while the
        rate limiter holds inserts back); small ones are sent in batches (module docstring).
        """
        if self._closed:
            self._raise_closed()
        ts = self._tables.get(table)
        if ts is None:
            ts = self._tables[table] = _TableState(self.client.table(table))
        if type(priority) is not float or not 0.0 <= priority <= ts.max_priority:
            priority = check_priority(priority, ts.max_priority, table)
        if type(trajectory) is not dict and not isinstance(trajectory, Mapping):
            raise InvalidArgumentError(
                "trajectory must be a mapping of table field to history selection, e.g. "
                '{"obs": writer.history["obs"][-8:]}'
            )
        if len(trajectory) != len(ts.names):
            self._field_mismatch(ts, trajectory)
        oldest = self._total - self.num_keep_alive_refs
        if oldest < self._history_start:
            oldest = self._history_start
        open_step = self._step_open
        newest = self._total - 1
        # The common item (laid out like the previous one, its steps kept and set, no step
        # open) is checked in C; anything else by the loop below, which raises what it finds.
        fast = (
            None
            if open_step
            else _native.traj_fields(
                trajectory, ts.names, ts.vcol, ts.vlen, ts.vkind, oldest, TrajectoryColumn
            )
        )
        if fast is not None:
            item, lo, hi = fast  # the start steps: pending, the item is kept as them
            if ts.any_range or ts.direct:
                item = sels = [trajectory[name] for name in ts.names]
        else:
            vcol, vlen, vkind = ts.vcol, ts.vlen, ts.vkind
            sels = []
            lo, hi = newest + 1, -1  # the item's first and last steps
            for j, name in enumerate(ts.names):
                sel = trajectory.get(name)
                if type(sel) is not TrajectoryColumn:
                    self._not_a_selection(ts, trajectory, name, sel)
                col = sel._col
                if col is not vcol[j] or sel._length != vlen[j] or sel._kind != vkind[j]:
                    if col.writer is not self:
                        raise InvalidArgumentError(
                            f"trajectory[{name!r}] was selected from another writer's history"
                        )
                    if sel._length == 0:
                        raise InvalidArgumentError(f"trajectory[{name!r}] selects no steps")
                    ts.accept(j, sel, self.validate)
                start = sel._start
                last = sel._last if sel._kind == 2 else start + sel._length - 1
                if (
                    start < oldest
                    or start < col.complete_since
                    or (open_step and col.name not in self._open_fields and last >= newest)
                ):
                    self._check_reference(sel, f"trajectory[{name!r}]")
                if start < lo:
                    lo = start
                if last > hi:
                    hi = last
                sels.append(sel)
            item = sels
        if ts.any_range:
            ts.range_check(sels)
        start = self._episode_start  # steps are counted from the episode's first
        episode = (self.episode_id, lo - start, hi - start)
        if ts.direct:
            self._write_direct(ts, sels, priority, None, episode)
            ts.unconfirmed += 1
            return
        now = time.monotonic()
        if not self._pending_n:
            self._first_pending_time = now
            self._first_pending_step = self._total
        ts.items.append(item)
        ts.priorities.append(priority)
        ts.episodes.append(episode)
        self._pending_n += 1
        if (
            now - self._last_item_time > self.max_latency
            or now - self._first_pending_time >= self.max_latency
        ):
            self._send_all()  # the writer was idle before this item, or the batch is old
        elif len(ts.priorities) >= ts.cap:
            self._send_table(ts)
        self._last_item_time = now

    def _not_a_selection(
        self, ts: _TableState, trajectory: Mapping[str, Any], name: str, sel: Any
    ) -> None:
        if name not in trajectory:
            self._field_mismatch(ts, trajectory)
        raise InvalidArgumentError(
            f"trajectory[{name!r}] must be a selection of the writer's history, e.g. "
            f"writer.history[{name!r}][-4:], got {type(sel).__name__}"
        )

    def _check_reference(self, sel: TrajectoryColumn, what: str) -> None:
        """Raise unless every step ``sel`` refers to is kept and has a value for its field."""
        self._check_alive(sel, what)
        self._check_set(sel, what)

    def _check_alive(self, sel: TrajectoryColumn, what: str) -> None:
        """Raise if ``sel`` is empty or refers to steps no longer kept."""
        if sel._length == 0:
            raise InvalidArgumentError(f"{what} selects no steps")
        if (
            sel._start >= self._history_start
            and sel._start >= self._total - self.num_keep_alive_refs
        ):
            return
        if sel._start < self._history_start:
            raise InvalidArgumentError(
                f"{what} refers to a step of an earlier episode that end_episode() cleared "
                "from the history; pass clear_buffers=False to make items span episodes"
            )
        oldest = self._total - self.num_keep_alive_refs - self._history_start
        raise InvalidArgumentError(
            f"{what} refers to history step {sel._start - self._history_start}, but the writer "
            f"keeps only the newest num_keep_alive_refs={self.num_keep_alive_refs} steps "
            f"(steps {oldest}..{self._total - 1 - self._history_start} of "
            f"{self._total - self._history_start}); make the writer with a larger "
            "num_keep_alive_refs"
        )

    def _check_set(self, sel: TrajectoryColumn, what: str) -> None:
        """Raise if the field has no value at one of the steps ``sel`` refers to."""
        unset = sel._col.unset_steps(sel.steps())
        if len(unset):
            s = int(unset[0])
            why = (
                "the step is still open and the field was not appended to it yet"
                if self._step_open and s == self._total - 1
                else "the field was not given in that step"
            )
            raise InvalidArgumentError(
                f"{what}: field {sel.field!r} has no value at history step "
                f"{s - self._history_start} ({why})"
            )

    def _field_mismatch(self, ts: _TableState, trajectory: Mapping[str, Any]) -> None:
        missing = sorted(ts.name_set - set(trajectory))
        extra = sorted(set(trajectory) - ts.name_set, key=str)
        raise SignatureError(
            f"table {ts.name!r}: trajectory fields do not match the signature "
            f"(missing {missing}, unknown {extra}); expected "
            + ", ".join(f"{f.name}: {f.dtype}{list(f.shape)}" for f in ts.fields)
        )

    def _write_direct(
        self,
        ts: _TableState,
        sels: list[TrajectoryColumn],
        priority: float,
        timeout: float | None,
        episode: tuple[int, int, int],
    ) -> None:
        """Copy one item's selections straight into a reserved slot of the table."""
        with ts.table.reserve(priority, timeout, episode=episode) as slot:
            for f, sel in zip(ts.fields, sels, strict=True):
                sel._copy_into(slot[f.name])

    def _send_all(self) -> None:
        for ts in self._tables.values():
            if ts.priorities:
                self._send_table(ts)

    def _send_table(self, ts: _TableState) -> None:
        """Send a table's pending items with one insert_batch: a gather per field."""
        n = len(ts.priorities)
        try:
            if ts.staging is None:
                ts.staging = [np.empty((ts.cap, *f.shape), f.np_dtype) for f in ts.fields]
            if ts.meta is None:
                ts.meta = (np.empty(ts.cap, np.float64), np.empty((ts.cap, 3), np.int64))
            data = {}
            # The items' entries (start steps, selections), field by field. A field's entries
            # share its accepted layout unless it is mixed (then start steps are expanded).
            by_field = zip(*ts.items, strict=True)
            for j, entries in enumerate(by_field):
                out = ts.staging[j][:n]
                if ts.mixed[j]:
                    for i, sel in enumerate(entries):
                        if type(sel) is int:
                            sel = ts.selections(ts.items[i])[j]
                        sel._copy_into(out[i, ...])  # a view, also of a scalar field
                else:
                    _gather(ts.vcol[j], ts.vlen[j], ts.vkind[j], entries, out)
                data[ts.names[j]] = out
            # As arrays: the table's compiled batch insert takes them (a list goes through
            # the checked Python path).
            priorities, episodes = ts.meta[0][:n], ts.meta[1][:n]
            _native.traj_batch_meta(ts.priorities, ts.episodes, priorities, episodes)
            ts.table.insert_batch(data, priorities, episodes=episodes)
            ts.unconfirmed += n
        finally:
            # Also on an error: the items cannot be sent twice. With no timeout a send fails
            # only when the daemon or the client is gone, and then they are lost anyway.
            self._forget(ts, n)
            ts.mixed = [k == 2 for k in ts.vkind]

    def _forget(self, ts: _TableState, n: int) -> None:
        """Drop the first ``n`` pending items of ``ts``."""
        del ts.items[:n]
        del ts.priorities[:n]
        del ts.episodes[:n]
        self._pending_n -= n

    def flush(self, block_until_num_items: int = 0, timeout: float | None = None) -> None:
        """Send the pending items and wait until the daemon has committed them (sampleable).

        Returns at once when at most ``block_until_num_items`` of this writer's items are
        pending or not yet known to be committed. Waits at most ``timeout`` seconds (None:
        without limit) in all, then raises :class:`~shmreplay.RateLimiterTimeout`; the items
        not sent by then stay pending and are sent by the next call.
        """
        if self._closed:
            self._raise_closed()
        if (
            isinstance(block_until_num_items, bool)
            or not isinstance(block_until_num_items, (int, np.integer))
            or block_until_num_items < 0
        ):
            raise InvalidArgumentError(
                f"block_until_num_items must be an integer >= 0, got {block_until_num_items!r}"
            )
        unconfirmed = self._pending_n + sum(ts.unconfirmed for ts in self._tables.values())
        if unconfirmed <= block_until_num_items:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        if timeout is None:
            self._send_all()
        else:
            for ts in self._tables.values():
                self._send_one_by_one(ts, deadline)
        for ts in self._tables.values():
            if ts.unconfirmed:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                ts.table.flush(timeout=remaining)
                ts.unconfirmed = 0

    def _send_one_by_one(self, ts: _TableState, deadline: float) -> None:
        """Send pending items one at a time under a deadline: a reservation that times out has
        written nothing, so the items left are exactly those still pending."""
        while ts.priorities:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                item = ts.selections(ts.items[0])
                self._write_direct(ts, item, ts.priorities[0], remaining, ts.episodes[0])
            except RateLimiterTimeout as exc:
                raise RateLimiterTimeout(
                    f"{exc}; {len(ts.priorities)} item(s) of this writer are still pending "
                    "and are sent by the next call"
                ) from None
            ts.unconfirmed += 1
            self._forget(ts, 1)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Flush and close the writer (idempotent); later calls raise ClientClosedError. The
        writer is closed even if the flush fails; its items not sent by then are dropped."""
        if self._closed:
            return
        try:
            self.flush(timeout=timeout)
        finally:
            self._discard()

    def _discard(self) -> None:
        self._closed = True
        self._drop_pending()

    def _drop_pending(self) -> None:
        for ts in self._tables.values():
            ts.items.clear()
            ts.priorities.clear()
            ts.episodes.clear()
        self._pending_n = 0

    def _raise_closed(self) -> None:
        raise ClientClosedError("this trajectory writer is closed; make a new one")

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.flush()
        else:
            self._drop_pending()  # no waiting on a failing path: the daemon may be what failed

    def __repr__(self) -> str:
        return (
            f"<TrajectoryWriter K={self.num_keep_alive_refs} episode {self.episode_id:#x}: "
            f"{self.episode_steps} steps, {self._pending_n} items pending>"
        )


def _gather(
    col: _Column, length: int, kind: int, entries: Sequence[int | TrajectoryColumn], out: np.ndarray
) -> None:
    """Copy items of one layout (``col``, ``length``, ``kind``; one entry per item, its start
    step or its selection) into ``out[i]``: one compiled call (``_native.traj_gather``: ring
    row = step % rows, at most two slice copies per item)."""
    if col.ring.dtype == out.dtype:
        _native.traj_gather(col.ring, col.rows, tuple(entries), length, out)
        return
    # A dtype that casts to the field's: numpy gathers and converts.
    starts = [e if type(e) is int else e._start for e in entries]
    r0 = np.fromiter(starts, np.int64, len(starts)) % col.rows
    if kind == 1:
        out[...] = col.ring[r0]
    else:
        # windows[r] = the ring rows of the steps r, r + 1, ..., wrapping round the ring
        out[...] = col.ring[np.take(col.writer._windows(col.rows, length), r0, axis=0)]
