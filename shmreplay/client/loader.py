"""Prefetching: a background thread samples into preallocated buffers while the learner trains.

:class:`Prefetcher` is what :meth:`Table.as_iterator <shmreplay.Table.as_iterator>` returns, and
the machinery under :mod:`shmreplay.torch` and :mod:`shmreplay.jax`::

    with table.as_iterator(256, prefetch=2, timeout=60) as batches:
        for batch in batches:                  # a Sample; its arrays are reused, see below
            loss, td = train_step(batch.data)  # meanwhile the thread samples the next batches
            table.update_priorities(batch.info.key, td)

**Threads.** A :class:`Table` handle must not sample or write from two threads at once: its
client keeps per-handle state without a lock (the items a timed-out ``sample`` carries over to the
next call, the cursors of its channel's single-producer lease and publish rings, its channel's
"sampler waiting" flag). The table lock is a process-shared pthread mutex and orders threads as
well as processes, and a process may attach several clients. So the prefetch thread attaches a
client of its own (its own channel, random generator and carry-over) and owns it: the thread
closes it when it stops. The learner's handle stays the learner's: it may call
``update_priorities``, ``delete``, ``insert`` or ``sample`` while the thread samples.

**Buffers.** Batches are sampled into ``prefetch + keep`` preallocated buffer sets, used in turn.
A yielded batch's data arrays stay valid until ``keep`` more batches are taken; then the thread
writes a later batch into them. With ``keep=1`` (the default), a batch is valid until the next
``next()``. Its ``info`` arrays are never reused. Timeline for ``prefetch=2, keep=1``
(3 buffer sets A B C; ``|x|`` = being filled by the thread)::

    thread:   |A| |B| (waits)  |C|          |A| ...
    learner:          next()->A  next()->B    next()->C
                      A valid -> |           B valid ->|  (A handed back to the thread)

``copy=True`` yields fresh arrays instead (one allocation per batch, nothing reused).

**Sampled ahead means sampled.** A batch counts as sampled when the thread takes it, as in
Reverb's prefetching datasets: for the rate limiter, ``times_sampled`` and ``max_times_sampled``
(an item may be deleted before the learner sees it). Batches still queued when the iterator is
closed are dropped.

**Timeouts and stopping.** The thread's sample calls block for at most :data:`SLICE_S` at a time,
so ``close()`` stops it within about that long even while the rate limiter blocks sampling. The
iterator's ``timeout`` bounds how long one ``next()`` waits for a batch (then
:class:`RateLimiterTimeout`; the iterator stays usable). An error in the thread (the daemon went
away: :class:`DaemonNotRunning`, ...) is raised by the consumer's next ``next()``, and again by
every later one.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import EllipsisType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..engine.layout import Ctrl
from ..engine.table import Sample
from ..errors import (
    ClientClosedError,
    InvalidArgumentError,
    LockTimeout,
    RateLimiterTimeout,
    ShmReplayError,
)

if TYPE_CHECKING:
    from ..config import FieldSpec
    from .client import Client, Table

__all__ = ["Prefetcher", "Batch", "PrefetcherStats", "Allocate", "Prepare", "SLICE_S"]

# The longest one sample call of the thread blocks: how promptly close() stops a thread that
# waits on the rate limiter. A call that times out costs a lock round and a message, tens of
# microseconds, and loses nothing (items it had taken come first in the next call's batch):
# ten of them a second while blocked cost nothing measurable.
SLICE_S = 0.1
# How long close() waits for the thread: one slice plus one batch copy, with a wide margin for
# a loaded machine.
JOIN_TIMEOUT_S = 10.0

# Makes one buffer set: (numpy arrays to sample into, keyed by field, and a payload handed out
# with each batch sampled into them, e.g. the torch tensors that own the arrays' memory).
Allocate = Callable[[Sequence["FieldSpec"], int], tuple[dict[str, np.ndarray], Any]]
# Runs in the thread on each batch sampled (with its buffer set's payload, None for copies):
# what it returns is handed out as Batch.prepared. Per-batch work of a framework (wrapping
# arrays as tensors) done there is off the learner's path, and does not hand the GIL back and
# forth between the learner and the thread at every call.
Prepare = Callable[[Sample, Any], Any]


def numpy_buffers(
    fields: Sequence[FieldSpec], batch_size: int
) -> tuple[dict[str, np.ndarray], Any]:
    """The default :data:`Allocate`: plain numpy arrays, no payload."""
    return {f.name: np.empty((batch_size, *f.shape), f.np_dtype) for f in fields}, None


@dataclass(frozen=True)
class PrefetcherStats:
    """Counters of a :class:`Prefetcher`, read without locking (cheap, no side effects).

    ``consumer_wait_s`` large: replay is the bottleneck (sampling is slower than training).
    ``thread_idle_s`` large: the learner is (the thread waited for buffers to be handed back).
    """

    batches: int  # handed to the consumer
    ready: int  # sampled and waiting in the queue now
    consumer_wait_s: float  # total time next()/take() waited for a batch
    thread_idle_s: float  # total time the thread waited for a free buffer set
    thread_sample_s: float  # total time in the thread's sample calls: copies and blocking


@dataclass(eq=False)
class Batch:
    """A prefetched batch and the buffer set it lives in (for frameworks that hand batches out
    on their own terms). ``release()`` gives the buffers back to the thread; idempotent."""

    sample: Sample
    payload: Any  # what the Allocate callable returned with the arrays, None for copies
    prepared: Any  # what the Prepare callable returned for this batch, None without one
    _index: int
    _free: queue.SimpleQueue | None = field(repr=False, default=None)

    def release(self) -> None:
        if self._free is not None:
            free, self._free = self._free, None
            free.put(self._index)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Worker:
    """What the thread uses. It holds no reference to the Prefetcher, so a Prefetcher that is
    dropped without close() is collected, and its finalizer stops the thread."""

    def __init__(
        self,
        client: Client,
        table: Table,
        batch_size: int,
        buffers: list[tuple[dict[str, np.ndarray], Any] | None],
        prepare: Prepare | None,
    ) -> None:
        self.client, self.table, self.batch_size = client, table, batch_size
        self.prepare = prepare
        self.buffers = buffers  # None entries: copy mode, the index is only a token
        self.stop = threading.Event()
        self.free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(buffers)):
            self.free.put(i)
        self.ready: queue.SimpleQueue[tuple[Sample, int, Any] | _Failure] = queue.SimpleQueue()
        # Why the last slice of sampling timed out (None: it did not), for timeout messages.
        self.last_wait: BaseException | None = None
        self.idle_s = 0.0
        self.sample_s = 0.0

    def run(self) -> None:
        failure: BaseException | None = None
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    index = self.free.get(timeout=SLICE_S)
                except queue.Empty:
                    continue
                finally:
                    self.idle_s += time.monotonic() - t0
                buffers = self.buffers[index]
                sample = self._sample(None if buffers is None else buffers[0])
                if sample is None:
                    return  # stopping
                prepared = None
                if self.prepare is not None:
                    prepared = self.prepare(sample, None if buffers is None else buffers[1])
                self.ready.put((sample, index, prepared))
        except BaseException as exc:  # handed to the consumer, who raises it
            failure = exc
        finally:
            try:
                self.client.close(timeout=1.0)  # this thread's own client: nothing to flush
            finally:
                if failure is not None:  # after the close: once raised, nothing is left open
                    self.ready.put(_Failure(failure))

    def _sample(self, out: dict[str, np.ndarray] | None) -> Sample | None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                sample = self.table.sample(self.batch_size, timeout=SLICE_S, out=out)
            except (RateLimiterTimeout, LockTimeout) as exc:
                # Not an error yet: the consumer's own timeout decides. Items a timed-out call
                # had taken come first in the next call's batch.
                self.last_wait = exc
                continue
            finally:
                self.sample_s += time.monotonic() - t0
            self.last_wait = None
            return sample
        return None


def _shut_down(worker: _Worker, thread: threading.Thread, timeout: float) -> bool:
    """Stop the thread; True if it ended in time (it closes its client as it ends)."""
    worker.stop.set()
    if thread.ident is not None and thread is not threading.current_thread():
        thread.join(timeout)
    return not thread.is_alive()


class Prefetcher(Iterator[Sample]):
    """An iterator of batches sampled ahead by a background thread. See the module docstring
    for threads, buffer reuse and timeouts; make one with :meth:`Table.as_iterator`.

    Closing: ``close()``, a ``with`` block, or dropping the last reference stops the thread
    (within :data:`SLICE_S` plus one batch copy) and closes its client. ``next()`` after
    ``close()`` raises :class:`ClientClosedError`. The iterator belongs to the process that made
    it.
    """

    _closed = True  # class-level default: close() and __del__ are safe on a half-built object
    _thread: threading.Thread | None = None
    _worker: _Worker | None = None

    def __init__(
        self,
        table: Table,
        batch_size: int,
        *,
        prefetch: int = 2,
        timeout: float | None = None,
        keep: int = 1,
        copy: bool = False,
        seed: int | None = None,
        allocate: Allocate | None = None,
        prepare: Prepare | None = None,
        extra_buffers: int = 0,
    ) -> None:
        """Attach a client for the thread and start it.

        ``prefetch`` (≥ 1) batches are sampled ahead; ``keep`` (≥ 1) batches stay valid after
        they are taken; ``copy=True`` yields fresh arrays instead of reused ones. ``seed`` seeds
        the thread's sampling generator. ``allocate`` makes each buffer set (default: numpy
        arrays); ``prepare`` runs in the thread on each batch (see :data:`Prepare`);
        ``extra_buffers`` adds buffer sets for a caller that holds batches longer
        (e.g. while a device copy is in flight). Raises :class:`InvalidArgumentError` for
        impossible settings, :class:`DaemonNotRunning` if the daemon is gone.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise InvalidArgumentError(f"batch_size must be an int, got {batch_size!r}")
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
        for name, value in (("prefetch", prefetch), ("keep", keep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
        if timeout is not None and not timeout >= 0:
            raise InvalidArgumentError(f"timeout must be None or >= 0 seconds, got {timeout!r}")
        table._check()
        self._table = table  # the caller's handle: only read, for messages
        self.table_name = table.name
        self.batch_size = int(batch_size)
        self.prefetch, self.keep, self.copy, self.timeout = prefetch, keep, copy, timeout
        self._pid = os.getpid()
        self._held: collections.deque[Batch] = collections.deque()
        self._failure: BaseException | None = None
        self._batches = 0
        self._wait_s = 0.0
        count = prefetch + (0 if copy else keep + extra_buffers)
        fields = table.spec.signature
        # Refused before a single buffer is made: a count no memory can hold would hang here.
        try:
            table.core._check_batch_fits(self.batch_size * count)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(
                f"as_iterator(batch_size={batch_size}, prefetch={prefetch}, keep={keep}) keeps "
                f"{count:,} batches in memory at once: {exc}; lower prefetch or keep"
            ) from None
        make = allocate or numpy_buffers
        buffers = [None if copy else make(fields, self.batch_size) for _ in range(count)]
        # After the buffers: a failed allocation (pinned memory refused, ...) leaves no client.
        client = table.client.attach_another(timeout=5.0, seed=seed)
        try:
            worker = _Worker(client, client.table(table.name), self.batch_size, buffers, prepare)
            thread = threading.Thread(
                target=worker.run, name=f"shmreplay-prefetch-{table.name}", daemon=True
            )
            thread.start()
        except BaseException:
            client.close()
            raise
        self._worker, self._thread = worker, thread
        self._finalizer = weakref.finalize(self, _shut_down, worker, thread, JOIN_TIMEOUT_S)
        self._closed = False

    @property
    def buffers(self) -> list[Any]:
        """The buffer sets' payloads (the torch tensors of :mod:`shmreplay.torch`, None for
        numpy buffers): batches are delivered in these, for tests that check no copy is made."""
        return [] if self._worker is None else [b and b[1] for b in self._worker.buffers]

    def take(self, timeout: float | None | EllipsisType = ...) -> Batch:
        """The next batch, which the caller must ``release()`` when done with its arrays.

        Waits up to ``timeout`` seconds (default: the iterator's) for the thread to have one,
        then raises :class:`RateLimiterTimeout`; the iterator stays usable.
        """
        if self._closed:
            raise ClientClosedError(
                f"this iterator of table {self.table_name!r} is closed; make a new one"
            )
        if os.getpid() != self._pid:
            raise ShmReplayError(
                f"this iterator was made by process {self._pid}, not by this one "
                f"({os.getpid()}); make one in each process"
            )
        if self._failure is not None:
            raise self._failure
        if timeout is ...:
            timeout = self.timeout
        worker, thread = self._worker, self._thread
        assert worker is not None and thread is not None
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        while True:
            wait = SLICE_S if deadline is None else min(SLICE_S, deadline - time.monotonic())
            try:
                item = worker.ready.get(timeout=max(wait, 0.0))
                break
            except queue.Empty:
                pass
            if not thread.is_alive() and worker.ready.empty():
                raise ClientClosedError(  # the thread always reports why it ended; a safety net
                    f"the prefetch thread of table {self.table_name!r} ended; make a new iterator"
                )
            if deadline is not None and time.monotonic() >= deadline:
                self._wait_s += time.monotonic() - t0
                raise RateLimiterTimeout(
                    f"table {self.table_name!r}: no batch of {self.batch_size} within {timeout} s"
                    f": {self._why_waiting(worker.last_wait)}; pass a longer timeout"
                )
        self._wait_s += time.monotonic() - t0
        if isinstance(item, _Failure):
            self._failure = item.exc
            raise item.exc
        sample, index, prepared = item
        self._batches += 1
        buffers = worker.buffers[index]
        if buffers is None:  # copy mode: the arrays are the batch's own; the token goes back
            worker.free.put(index)
            return Batch(sample, None, prepared, index)
        return Batch(sample, buffers[1], prepared, index, worker.free)

    def _why_waiting(self, last_wait: BaseException | None) -> str:
        if isinstance(last_wait, LockTimeout):
            return str(last_wait)
        core = self._table.core
        if isinstance(last_wait, RateLimiterTimeout) and core is not None:
            lim = core.limiter.info()  # lock-free reads of shared counters: fine for a message
            return (
                f"the rate limiter blocks sampling (size {int(core.ctrl[Ctrl.SIZE])}, "
                f"min_size_to_sample {lim.min_size_to_sample}, inserts {lim.inserts}, "
                f"samples {lim.samples}, deletes {lim.deletes})"
            )
        return "the prefetch thread is still sampling (the machine is busy?)"

    def __next__(self) -> Sample:
        """The next batch; hands the batch taken ``keep`` calls ago back to the thread first."""
        while len(self._held) >= self.keep:
            self._held.popleft().release()
        batch = self.take()
        self._held.append(batch)
        return batch.sample

    def __iter__(self) -> Prefetcher:
        return self

    def stats(self) -> PrefetcherStats:
        """Counters, read without locking (see :class:`PrefetcherStats`)."""
        w = self._worker
        return PrefetcherStats(
            batches=self._batches,
            ready=0 if w is None else w.ready.qsize(),
            consumer_wait_s=self._wait_s,
            thread_idle_s=0.0 if w is None else w.idle_s,
            thread_sample_s=0.0 if w is None else w.sample_s,
        )

    def close(self) -> None:
        """Stop the thread and close its client. Idempotent; arrays already handed out remain
        readable (they are private memory, not shared memory)."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._pid:
            return  # a forked child has no thread to stop; the parent's is not ours
        if self._finalizer() is False:  # runs _shut_down once: False if the thread lives on
            warnings.warn(
                f"the prefetch thread of table {self.table_name!r} did not stop within "
                f"{JOIN_TIMEOUT_S} s; it closes its client when its sample call returns",
                RuntimeWarning,
                stacklevel=2,
            )
        self._held.clear()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"prefetch={self.prefetch}, keep={self.keep}"
        return f"<shmreplay.Prefetcher table {self.table_name!r}, {state}>"
