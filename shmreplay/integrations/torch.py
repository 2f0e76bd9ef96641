"""PyTorch loaders: a prefetching iterator of tensors, and an ``IterableDataset`` for DataLoader.

:func:`iterate` is the learner's fast path. Its prefetch thread samples straight from shared
memory into preallocated tensors (through their ``tensor.numpy()`` views, which share the
tensors' memory): the tensors it yields are those buffers, with no copy in between. The
buffers are pinned when CUDA is available, so ``device="cuda"`` copies them with
``non_blocking=True``::

    import shmreplay, shmreplay.torch

    table = shmreplay.attach("default").table("replay")
    with shmreplay.torch.iterate(table, 256, device="cuda", timeout=60) as batches:
        for batch in batches:                       # a TensorSample
            q = net(batch.data["obs"])              # [256, *obs.shape], on the GPU
            td = ...                                # per-item, a tensor (grad or not)
            table.update_priorities(batch.info.key, td.abs())   # tensors are accepted as is

:class:`ReplayDataset` is for ``torch.utils.data.DataLoader`` (``batch_size=None``: each item it
yields is a whole batch); it attaches in ``__iter__``, so each worker process has its own client.

Dtypes: every field keeps its dtype (``bool`` -> ``torch.bool``, ``uint8`` -> ``torch.uint8``...;
``uint16/32/64`` fields become torch's uint dtypes, which support few operations: convert them).
Keys are uint64 in shmreplay and torch has no full uint64 support, so ``info.key`` is int64: the
same bits (keys stay far below 2**63), and :meth:`Table.update_priorities` takes int64 keys back.

Without PyTorch, ``import shmreplay.torch`` raises :class:`MissingDependencyError` naming
``pip install 'shmreplay[torch]'``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..client.loader import Batch, Prefetcher, PrefetcherStats
from ..errors import InvalidArgumentError, MissingDependencyError

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:
    raise MissingDependencyError(
        f"shmreplay.torch needs PyTorch, which cannot be imported ({exc}); install it with: "
        "pip install 'shmreplay[torch]'"
    ) from exc

if TYPE_CHECKING:
    from ..client import Table
    from ..config import FieldSpec
    from ..engine.table import Sample as SampleBatch
    from ..engine.table import SampleInfo

__all__ = ["iterate", "TensorIterator", "ReplayDataset", "TensorSample", "TensorInfo"]


class TensorInfo(NamedTuple):
    """Per-item information of a batch, as tensors (see :class:`shmreplay.SampleInfo`)."""

    key: torch.Tensor  # int64: the uint64 keys' bits; give them back to update_priorities
    probability: torch.Tensor  # float64
    priority: torch.Tensor  # float64
    times_sampled: torch.Tensor  # int32
    table_size: torch.Tensor  # int64


class TensorSample(NamedTuple):
    """A batch as tensors: ``data[field]`` is ``[B, *shape]``. A NamedTuple, so DataLoader's
    collation and pinning pass it through."""

    data: dict[str, torch.Tensor]
    info: TensorInfo


def info_tensors(info: SampleInfo) -> TensorInfo:
    """A sample's info arrays as tensors, sharing their memory (they are never reused)."""
    return TensorInfo(
        torch.from_numpy(info.key.view(np.int64)),
        torch.from_numpy(info.probability),
        torch.from_numpy(info.priority),
        torch.from_numpy(info.times_sampled),
        torch.from_numpy(info.table_size),
    )


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a field's numpy dtype (torch's own mapping, so both always agree)."""
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _tensor_buffers(pin: bool):
    def allocate(fields: Sequence[FieldSpec], batch_size: int):
        try:
            tensors = {
                f.name: torch.empty(
                    (batch_size, *f.shape), dtype=torch_dtype(f.np_dtype), pin_memory=pin
                )
                for f in fields
            }
        except RuntimeError as exc:
            if not pin:
                raise
            raise InvalidArgumentError(
                f"pin_memory=True, but this PyTorch cannot pin memory ({exc}); pass "
                "pin_memory=None to pin only when CUDA is available"
            ) from exc
        # numpy views of the tensors' memory: sample(out=...) writes the batch into the tensors
        return {name: t.numpy() for name, t in tensors.items()}, tensors

    return allocate


def _as_tensors(sample: SampleBatch, tensors: dict[str, torch.Tensor]) -> TensorSample:
    """A batch sampled into tensor buffers, as a TensorSample (run in the prefetch thread)."""
    return TensorSample(dict(tensors), info_tensors(sample.info))


class TensorIterator(Iterator[TensorSample]):
    """What :func:`iterate` returns: batches as :class:`TensorSample`, sampled ahead.

    Without ``device`` (or a CPU one), the yielded data tensors are the preallocated buffers
    themselves (``buffers``): valid until ``keep`` more batches are taken, as for
    :meth:`Table.as_iterator`. With a CUDA ``device``, the yielded tensors are the device
    copies, which are the caller's; a host buffer is handed back to the thread once its copy
    has completed (a CUDA event says so). ``info`` tensors are never reused.
    Close with ``close()``, a ``with`` block, or by dropping it.
    """

    def __init__(
        self,
        table: Table,
        batch_size: int,
        prefetch: int = 2,
        timeout: float | None = None,
        *,
        device: torch.device | str | None = None,
        pin_memory: bool | None = None,
        keep: int = 1,
        seed: int | None = None,
    ) -> None:
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type == "cpu":
            self.device = None  # .to("cpu") would be the same tensor: nothing to copy
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self.pin_memory = bool(pin_memory)
        self.keep = keep
        # A CUDA copy in flight holds its host buffer a little after the batch is handed out.
        self._in_flight = 1 if self._cuda else 0
        self._prefetcher = Prefetcher(
            table,
            batch_size,
            prefetch=prefetch,
            timeout=timeout,
            keep=keep,
            seed=seed,
            allocate=_tensor_buffers(self.pin_memory),
            prepare=_as_tensors,
            extra_buffers=self._in_flight,
        )
        self._held: collections.deque[tuple[Batch, Any]] = collections.deque()

    @property
    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    @property
    def buffers(self) -> list[dict[str, torch.Tensor]]:
        """The preallocated (pinned, if ``pin_memory``) tensors the thread samples into."""
        return self._prefetcher.buffers

    def __next__(self) -> TensorSample:
        """The next batch; waits up to the iterator's ``timeout`` (then RateLimiterTimeout)."""
        self._hand_back()
        batch = self._prefetcher.take()
        tensors: TensorSample = batch.prepared  # made by the thread: see _as_tensors
        if self.device is None:
            self._held.append((batch, None))
            return tensors
        # Asynchronous only for CUDA, where an event tells when the host buffer is free again;
        # other devices copy synchronously.
        cuda = self._cuda
        data = {k: t.to(self.device, non_blocking=cuda) for k, t in tensors.data.items()}
        info = TensorInfo(*(t.to(self.device, non_blocking=cuda) for t in tensors.info))
        if cuda:
            done = torch.cuda.Event()
            done.record()  # on the current stream, after the copies
            self._held.append((batch, done))
        else:
            batch.release()
        return TensorSample(data, info)

    def _hand_back(self) -> None:
        """Release host buffers no longer needed: beyond ``keep`` without a device; once their
        copy is done with one (waiting for the oldest if too many copies are in flight)."""
        held = self._held
        if self.device is None:
            while len(held) >= self.keep:
                held.popleft()[0].release()
            return
        while held and (len(held) > self._in_flight or held[0][1].query()):
            batch, done = held.popleft()
            done.synchronize()
            batch.release()

    def __iter__(self) -> TensorIterator:
        return self

    def stats(self) -> PrefetcherStats:
        """The prefetch thread's counters (cheap; see
        :class:`shmreplay.client.loader.PrefetcherStats`)."""
        return self._prefetcher.stats()

    def close(self) -> None:
        """Stop the prefetch thread and close its client; idempotent."""
        for _, done in self._held:
            if done is not None:
                done.synchronize()  # a copy in flight still reads its host buffer
        self._held.clear()
        self._prefetcher.close()

    def __enter__(self) -> TensorIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iterate(
    table: Table,
    batch_size: int,
    prefetch: int = 2,
    timeout: float | None = None,
    *,
    device: torch.device | str | None = None,
    pin_memory: bool | None = None,
    keep: int = 1,
    seed: int | None = None,
) -> TensorIterator:
    """Batches of ``table`` as tensors, sampled ``prefetch`` batches ahead by a thread.

    ``pin_memory=None`` pins the buffers when ``torch.cuda.is_available()``; ``True`` on a build
    that cannot pin (a CPU-only one) raises :class:`InvalidArgumentError`. ``device`` moves each
    batch there (data and info), with ``non_blocking=True`` to a CUDA device. ``timeout``,
    ``keep`` and ``seed`` as for :meth:`Table.as_iterator`. See :class:`TensorIterator` for what
    is reused.
    """
    return TensorIterator(
        table,
        batch_size,
        prefetch,
        timeout,
        device=device,
        pin_memory=pin_memory,
        keep=keep,
        seed=seed,
    )


class ReplayDataset(IterableDataset):
    """An endless (or ``num_batches`` long) stream of batches for ``torch.utils.data.DataLoader``.

    Each item is a whole :class:`TensorSample` of ``batch_size`` items, so give the DataLoader
    ``batch_size=None``. The dataset holds only names: ``__iter__`` attaches to instance
    ``instance`` in the process that iterates (each DataLoader worker, with ``fork`` or
    ``spawn``) and closes that client when the iteration ends. Tensors are fresh per batch
    (DataLoader moves them between processes). The DataLoader's workers and ``prefetch_factor``
    do the prefetching; in the learner's own process, :func:`iterate` is faster. ``timeout`` is
    per batch (then :class:`RateLimiterTimeout`): give one, or a DataLoader shut down while a
    worker waits on the rate limiter waits for its worker timeout. ``seed`` with worker ``i``
    seeds that worker's client with (seed, i)::

        loader = DataLoader(ReplayDataset("default", "replay", 256, timeout=60),
                            batch_size=None, num_workers=2)
    """

    def __init__(
        self,
        instance: str,
        table: str,
        batch_size: int,
        *,
        timeout: float | None = None,
        num_batches: int | None = None,
        seed: int | None = None,
        attach_timeout: float = 5.0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.instance, self.table, self.batch_size = instance, table, batch_size
        self.timeout, self.num_batches, self.seed = timeout, num_batches, seed
        self.attach_timeout = attach_timeout

    def __iter__(self) -> Iterator[TensorSample]:
        from ..client import attach

        worker = get_worker_info()
        seed = self.seed
        if seed is not None:
            seq = np.random.SeedSequence([seed, 0 if worker is None else worker.id])
            seed = int(seq.generate_state(1)[0])
        client = attach(self.instance, timeout=self.attach_timeout, seed=seed)
        try:
            table = client.table(self.table)
            n = 0
            while self.num_batches is None or n < self.num_batches:
                s = table.sample(self.batch_size, timeout=self.timeout)
                data = {k: torch.from_numpy(v) for k, v in s.data.items()}  # fresh arrays
                yield TensorSample(data, info_tensors(s.info))
                n += 1
        finally:
            client.close()
