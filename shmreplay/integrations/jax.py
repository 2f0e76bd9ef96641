"""JAX loader: batches sampled ahead by a thread, then put on a device ``prefetch`` batches ahead.

A thread samples into reused host buffers (as :meth:`Table.as_iterator`); the iterator keeps
``prefetch`` batches in flight to the device with ``jax.device_put`` (asynchronous), so that
both the sampling and the host-to-device transfer overlap the training step::

    import shmreplay, shmreplay.jax

    table = shmreplay.attach("default").table("replay")
    with shmreplay.jax.iterate(table, 256, prefetch=2, timeout=60) as batches:
        for batch in batches:                    # a JaxSample
            state, td = train_step(state, batch.data)      # batch.data[field]: a jax.Array
            table.update_priorities(batch.info.key, td)    # a jax array is accepted as is

``data`` arrays are the caller's (device copies: no buffer-reuse rule). ``info`` stays a numpy
:class:`shmreplay.SampleInfo` on the host: keys are uint64, which JAX truncates to 32 bits
unless ``jax_enable_x64`` is on, and they are only needed on the host, for
``update_priorities``. Likewise int64/float64 fields arrive as 32-bit arrays unless
``jax_enable_x64`` is on (JAX's own rule; it warns).

Without JAX, ``import shmreplay.jax`` raises :class:`MissingDependencyError` naming
``pip install 'shmreplay[jax]'``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from ..client.loader import Batch, Prefetcher, PrefetcherStats
from ..engine.table import SampleInfo
from ..errors import MissingDependencyError

try:
    import jax
except ImportError as exc:
    raise MissingDependencyError(
        f"shmreplay.jax needs JAX, which cannot be imported ({exc}); install it with: "
        "pip install 'shmreplay[jax]'"
    ) from exc

if TYPE_CHECKING:
    from ..client import Table

__all__ = ["iterate", "JaxIterator", "JaxSample"]


def _platform(device: Any) -> str:
    """The platform ("cpu", "gpu", "tpu") that ``device`` (a Device, a Sharding, or None: the
    default device) puts arrays on."""
    if device is None:
        device = jax.config.jax_default_device or jax.devices()[0]
    if isinstance(device, str):  # jax_default_device may name a platform
        return device
    if hasattr(device, "device_set"):  # a Sharding
        device = next(iter(device.device_set))
    return device.platform


class JaxSample(NamedTuple):
    """A batch on the device: ``data[field]`` is a ``[B, *shape]`` jax.Array; ``info`` is the
    host-side :class:`shmreplay.SampleInfo` (numpy; uint64 keys)."""

    data: dict[str, jax.Array]
    info: SampleInfo


class JaxIterator(Iterator[JaxSample]):
    """What :func:`iterate` returns. ``close()``, a ``with`` block or dropping it stops the
    prefetch thread and closes its client."""

    def __init__(
        self,
        table: Table,
        batch_size: int,
        prefetch: int = 2,
        timeout: float | None = None,
        *,
        device: Any = None,
        seed: int | None = None,
    ) -> None:
        self.prefetch = prefetch
        self.device = device
        # On the CPU platform, device_put may alias a 64-byte-aligned numpy array instead of
        # copying it (measured with jax 0.10, even with may_alias=False): a reused buffer would
        # change arrays already handed out. There the thread samples into fresh arrays, which
        # the device arrays may then alias at no cost. Elsewhere the transfer copies, and a host
        # buffer is reused once its transfer is complete.
        self.copy = _platform(device) == "cpu"
        # Host buffers: `prefetch` queued by the thread, 1 being filled, and `prefetch` whose
        # transfer may still read them.
        self._prefetcher = Prefetcher(
            table,
            batch_size,
            prefetch=prefetch,
            timeout=timeout,
            keep=1,
            copy=self.copy,
            seed=seed,
            extra_buffers=prefetch,
        )
        self._ahead: collections.deque[tuple[JaxSample, Batch]] = collections.deque()

    def _put(self, batch: Batch) -> tuple[JaxSample, Batch]:
        data = {k: jax.device_put(v, self.device) for k, v in batch.sample.data.items()}
        return JaxSample(data, batch.sample.info), batch

    def __next__(self) -> JaxSample:
        """The next batch: tops the device queue up to ``prefetch`` batches (waiting up to the
        iterator's ``timeout`` for each, then :class:`RateLimiterTimeout`) and hands out the
        oldest once its transfer is complete (so that its host buffer can be reused)."""
        while len(self._ahead) < self.prefetch:
            self._ahead.append(self._put(self._prefetcher.take()))
        sample, batch = self._ahead.popleft()
        jax.block_until_ready(sample.data)  # put `prefetch` steps ago: normally done already
        batch.release()
        return sample

    def __iter__(self) -> JaxIterator:
        return self

    def stats(self) -> PrefetcherStats:
        """The prefetch thread's counters (cheap; see
        :class:`shmreplay.client.loader.PrefetcherStats`)."""
        return self._prefetcher.stats()

    def close(self) -> None:
        """Stop the prefetch thread and close its client; idempotent."""
        for sample, _ in self._ahead:
            jax.block_until_ready(sample.data)  # let transfers finish reading host buffers
        self._ahead.clear()
        self._prefetcher.close()

    def __enter__(self) -> JaxIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iterate(
    table: Table,
    batch_size: int,
    prefetch: int = 2,
    timeout: float | None = None,
    *,
    device: Any = None,
    seed: int | None = None,
) -> JaxIterator:
    """Batches of ``table`` on a JAX device, sampled by a thread and transferred ``prefetch``
    batches ahead. ``device``: a ``jax.Device`` or ``Sharding`` (None: the default device).
    ``timeout`` and ``seed`` as for :meth:`Table.as_iterator`."""
    return JaxIterator(table, batch_size, prefetch, timeout, device=device, seed=seed)
