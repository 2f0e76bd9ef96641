"""DeepMind Reverb's Python API over shmreplay, for programs that run on one host.

Change ``import reverb`` to ``from shmreplay.compat import reverb`` and give every table a
``signature`` (shmreplay preallocates every item in shared memory, so it must know each
field's shape and dtype)::

    server = reverb.Server(tables=[
        reverb.Table(
            name="my_table",
            sampler=reverb.selectors.Uniform(),
            remover=reverb.selectors.Fifo(),
            max_size=100,
            rate_limiter=reverb.rate_limiters.MinSize(1),
            signature={"a": reverb.TensorSpec([3], np.int64),   # tf.TensorSpec works too
                       "b": reverb.TensorSpec([3], np.int64)}),
    ])
    client = reverb.Client(f"localhost:{server.port}")

How it maps: ``reverb.Server`` starts a shmreplay daemon (:class:`shmreplay.Server`) named
``reverb-<port>`` (``$SHMREPLAY_REVERB_PREFIX`` replaces ``reverb-``); no TCP port is opened,
the number only names the instance, so ``reverb.Client("localhost:<port>")`` in any process of
the host attaches to it. Selectors and rate limiters become :class:`~shmreplay.SelectorSpec`
and :class:`~shmreplay.RateLimiterSpec` with Reverb's numbers and constructor errors.

Signatures are a flat dict of field name → spec (any object with ``.shape`` and ``.dtype``:
:class:`TensorSpec`, ``tf.TensorSpec``, a numpy array), a list or tuple of specs, or one spec.
Data is flattened as Reverb flattens it: dict values in sorted key order, list items in order.

Not supported (each raises :class:`~shmreplay.NotSupportedError` saying what to do):
gRPC across hosts, TensorFlow datasets and ops, the legacy and structured writers, table
extensions, signature-less tables, nested signatures, dimensions of unknown size.
``docs/compat-reverb.md`` lists the differences.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import tomllib
import warnings
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np

from ..client.client import Client as _ShmClient
from ..client.client import attach as _attach
from ..client.trajectory import TrajectoryColumn
from ..client.trajectory import TrajectoryWriter as _ShmTrajectoryWriter
from ..config import (
    DTYPES,
    FieldSpec,
    RateLimiterSpec,
    SelectorSpec,
    ServerSpec,
    TableSpec,
    parse_config,
    to_toml,
)
from ..daemon import server as _server_lib
from ..engine.instance import InstanceRecord
from ..errors import (
    ConfigError,
    InvalidArgumentError,
    NotSupportedError,
    RateLimiterTimeout,
    ShmReplayError,
    SignatureError,
)

__all__ = [
    "Client",
    "Server",
    "Table",
    "TensorSpec",
    "TrajectoryWriter",
    "TrajectoryColumn",
    "ReplaySample",
    "SampleInfo",
    "TableInfo",
    "ReverbError",
    "DeadlineExceededError",
    "selectors",
    "item_selectors",
    "rate_limiters",
    "checkpointers",
    "errors",
    # present so that programs import, but raise NotSupportedError when used:
    "Writer",
    "TFClient",
    "ReplayDataset",
    "TrajectoryDataset",
    "TimestepDataset",
    "PatternDataset",
    "structured",
]

# Seconds a Client waits for the daemon of its address to come up (Reverb's gRPC channel waits
# for a server too); a server started in the same script is already up.
ATTACH_TIMEOUT_S = 30.0
# The compat writer's max_latency once it writes to a table whose rate limiter can hold inserts
# back: it then sends items itself, without waiting (see TrajectoryWriter), as the shmreplay
# writer's own latency-driven sends would wait for the limiter.
_WRITER_SENDS_ITSELF = 1e9
# The field of a table whose signature is one spec, and of the i-th spec of a list signature.
_LEAF_FIELD = "reverb_data"
_LIST_FIELD = "reverb_{}"
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "ip6-localhost")

# -- errors ----------------------------------------------------------------------------------------

#: Reverb's root error: every error shmreplay raises on purpose.
ReverbError = ShmReplayError
#: Reverb raises it when a call runs out of time; shmreplay's RateLimiterTimeout (a TimeoutError).
DeadlineExceededError = RateLimiterTimeout

errors = SimpleNamespace(ReverbError=ReverbError, DeadlineExceededError=DeadlineExceededError)


# -- specs -----------------------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class TensorSpec:
    """A stand-in for ``tf.TensorSpec`` (which works as well): a fixed ``shape`` and a numpy
    ``dtype``; ``name`` is kept but not used."""

    shape: tuple[int, ...]
    dtype: np.dtype
    name: str | None = None

    def __init__(self, shape: Iterable[int], dtype: Any = np.float32, name: str | None = None):
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "dtype", np.dtype(dtype))
        object.__setattr__(self, "name", name)


def _field(name: str, spec: Any, table: str) -> FieldSpec:
    """A signature leaf (``.shape`` and ``.dtype``, numpy- or TensorFlow-style) → FieldSpec."""
    where = f"reverb.Table({table!r}), signature field {name!r}"
    if not (hasattr(spec, "shape") and hasattr(spec, "dtype")):
        if isinstance(spec, (Mapping, list, tuple)):
            raise NotSupportedError(
                f"{where}: nested signatures are not supported; use a flat dict of field name → "
                "spec (join the path into one name, e.g. 'obs_pixels')"
            )
        raise NotSupportedError(
            f"{where}: {spec!r} is not a spec; give an object with .shape and .dtype, e.g. "
            "reverb.TensorSpec([84, 84, 4], np.uint8) or tf.TensorSpec"
        )
    shape = spec.shape
    try:
        dims = shape.as_list() if hasattr(shape, "as_list") else list(shape)  # tf.TensorShape
    except (TypeError, ValueError):
        dims = None  # a TensorShape of unknown rank
    if dims is not None:
        dims = [getattr(d, "value", d) for d in dims]  # TF1 Dimension objects
    if dims is None or any(
        isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in dims
    ):
        shown = "of unknown rank" if dims is None else str(dims)
        raise NotSupportedError(
            f"{where}: shape {shown} is not fully defined; shmreplay preallocates every item, "
            "so give every dimension a size ≥ 1 (a sequence length too)"
        )
    dtype = getattr(spec.dtype, "as_numpy_dtype", spec.dtype)  # tf.DType → numpy type
    try:
        dname = np.dtype(dtype).name
    except TypeError:
        dname = str(dtype)
    if dname not in DTYPES:
        raise NotSupportedError(
            f"{where}: dtype {dname} is not a fixed-size numeric dtype; allowed: "
            + ", ".join(DTYPES)
        )
    return FieldSpec(name, tuple(int(d) for d in dims), dname)


def _signature_fields(signature: Any, table: str) -> tuple[FieldSpec, ...]:
    if isinstance(signature, Mapping):
        if not signature:
            raise ConfigError(f"reverb.Table({table!r}): the signature dict is empty")
        fields = []
        for name in sorted(signature):  # Reverb flattens dicts in sorted key order
            if not isinstance(name, str) or not name.isidentifier():
                raise NotSupportedError(
                    f"reverb.Table({table!r}): signature key {name!r} must be a Python "
                    "identifier (it names a field of the table)"
                )
            fields.append(_field(name, signature[name], table))
        return tuple(fields)
    if isinstance(signature, (list, tuple)) and not hasattr(signature, "_fields"):
        if not signature:
            raise ConfigError(f"reverb.Table({table!r}): the signature list is empty")
        return tuple(_field(_LIST_FIELD.format(i), s, table) for i, s in enumerate(signature))
    if isinstance(signature, tuple):  # a namedtuple: not flattened by name here
        raise NotSupportedError(
            f"reverb.Table({table!r}): namedtuple signatures are not supported; use a dict"
        )
    return (_field(_LEAF_FIELD, signature, table),)


def _layout(fields: Sequence[FieldSpec]) -> str:
    """How a table's fields map to Reverb's structure: "leaf", "list" or "dict"."""
    names = [f.name for f in fields]
    if names == [_LEAF_FIELD]:
        return "leaf"
    if names == [_LIST_FIELD.format(i) for i in range(len(names))]:
        return "list"
    return "dict"


def _structure(fields: Sequence[FieldSpec], values: Sequence[Any]) -> Any:
    """Values in field order, unflattened into the table's structure."""
    layout = _layout(fields)
    if layout == "leaf":
        return values[0]
    if layout == "list":
        return list(values)
    return {f.name: v for f, v in zip(fields, values, strict=True)}


def _flatten(data: Any, fields: Sequence[FieldSpec], table: str) -> dict[str, Any]:
    """Data shaped like the table's signature → field → value (as Reverb's tree.flatten)."""
    layout = _layout(fields)
    if layout == "dict":
        if not isinstance(data, Mapping):
            raise SignatureError(
                f"table {table!r} has the signature {{{', '.join(f.name for f in fields)}}}; "
                f"insert a dict with those keys, got {type(data).__name__}"
            )
        for k, v in data.items():
            if isinstance(v, Mapping):
                raise NotSupportedError(
                    f"table {table!r}: nested data under {k!r} is not supported; use a flat dict"
                )
        return dict(data)
    if layout == "list":
        if not isinstance(data, (list, tuple)) or len(data) != len(fields):
            raise SignatureError(
                f"table {table!r} has a signature of {len(fields)} specs; insert a list of "
                f"{len(fields)} values, got {data!r}"
            )
        return {f.name: v for f, v in zip(fields, data, strict=True)}
    if isinstance(data, (list, tuple)):  # tree.flatten([x]) == [x]: one leaf
        if len(data) != 1:
            raise SignatureError(
                f"table {table!r} has a signature of one spec, {fields[0].dtype}"
                f"{list(fields[0].shape)}; Reverb flattens a list of {len(data)} values into "
                f"{len(data)} leaves: insert one value (a numpy array for a shaped field)"
            )
        data = data[0]
    if isinstance(data, Mapping):
        raise SignatureError(f"table {table!r} has a signature of one spec; got a dict")
    return {_LEAF_FIELD: data}


def _spec_structure(fields: Sequence[FieldSpec]) -> Any:
    return _structure(fields, [TensorSpec(f.shape, f.dtype, f.name) for f in fields])


# -- selectors and rate limiters ---------------------------------------------------------------


class _Selector:
    """A Reverb item selector; ``spec`` is the :class:`~shmreplay.SelectorSpec` it maps to."""

    spec: SelectorSpec

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


class Uniform(_Selector):
    """Every item equally likely."""

    def __init__(self) -> None:
        self.spec = SelectorSpec.uniform()


class Prioritized(_Selector):
    """Item i with probability ∝ priority_i ** priority_exponent."""

    def __init__(self, priority_exponent: float) -> None:
        alpha = float(priority_exponent)
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ConfigError(f"priority_exponent must be a finite number ≥ 0, got {alpha!r}")
        self.spec = SelectorSpec.prioritized(alpha)


class Fifo(_Selector):
    """The oldest item."""

    def __init__(self) -> None:
        self.spec = SelectorSpec.fifo()


class Lifo(_Selector):
    """The newest item."""

    def __init__(self) -> None:
        self.spec = SelectorSpec.lifo()


class MinHeap(_Selector):
    """The item of lowest priority."""

    def __init__(self) -> None:
        self.spec = SelectorSpec.min_heap()


class MaxHeap(_Selector):
    """The item of highest priority."""

    def __init__(self) -> None:
        self.spec = SelectorSpec.max_heap()


selectors = SimpleNamespace(
    Uniform=Uniform,
    Prioritized=Prioritized,
    Fifo=Fifo,
    Lifo=Lifo,
    MinHeap=MinHeap,
    MaxHeap=MaxHeap,
)
item_selectors = selectors  # Reverb's module name; ``reverb.selectors`` is its alias


class RateLimiter:
    """Reverb's general rate limiter; ``spec`` is the :class:`~shmreplay.RateLimiterSpec`.

    Constructor errors are Reverb's, raised as :class:`~shmreplay.ConfigError` (a ValueError).
    """

    spec: RateLimiterSpec

    def __init__(
        self, samples_per_insert: float, min_size_to_sample: int, min_diff: float, max_diff: float
    ) -> None:
        self._set(
            RateLimiterSpec.custom(samples_per_insert, min_size_to_sample, min_diff, max_diff)
        )

    def _set(self, spec: RateLimiterSpec) -> None:
        self.spec = spec
        self._samples_per_insert = spec.samples_per_insert
        self._min_size_to_sample = spec.min_size_to_sample
        self._min_diff = spec.min_diff
        self._max_diff = spec.max_diff

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec})"


class MinSize(RateLimiter):
    """Sampling waits until the table holds ``min_size_to_sample`` items; inserts never block."""

    def __init__(self, min_size_to_sample: int) -> None:
        self._set(RateLimiterSpec.min_size(min_size_to_sample))


class SampleToInsertRatio(RateLimiter):
    """Keep samples ≈ ``samples_per_insert`` × inserts, within ``error_buffer``."""

    def __init__(
        self,
        samples_per_insert: float,
        min_size_to_sample: int,
        error_buffer: float | tuple[float, float],
    ) -> None:
        self._set(
            RateLimiterSpec.sample_to_insert_ratio(
                samples_per_insert, min_size_to_sample, error_buffer
            )
        )


class Queue(RateLimiter):
    """Every item sampled once, at most ``size`` waiting (use ``Table.queue``)."""

    def __init__(self, size: int) -> None:
        self._set(RateLimiterSpec.queue(size))


class Stack(RateLimiter):
    """The Queue limiter's numbers, for a Lifo table (use ``Table.stack``)."""

    def __init__(self, size: int) -> None:
        self._set(RateLimiterSpec.stack(size))


rate_limiters = SimpleNamespace(
    RateLimiter=RateLimiter,
    MinSize=MinSize,
    SampleToInsertRatio=SampleToInsertRatio,
    Queue=Queue,
    Stack=Stack,
)


class DefaultCheckpointer:
    """Checkpoints go to directory ``path`` (shmreplay's ``[server] checkpoint_dir``): the
    server restores the latest complete one at start and writes one at ``stop()``."""

    def __init__(self, path: str, group: str = "", fallback_checkpoint_path: str | None = None):
        if group or fallback_checkpoint_path:
            raise NotSupportedError(
                "DefaultCheckpointer: group and fallback_checkpoint_path are not supported; "
                "give only path (restore another checkpoint with shmreplay serve --restore)"
            )
        self.path = os.fspath(path)


checkpointers = SimpleNamespace(DefaultCheckpointer=DefaultCheckpointer)


# -- tables and server -------------------------------------------------------------------------


class Table:
    """A table for :class:`Server`, with Reverb's arguments; ``signature`` is required.

    Raises :class:`~shmreplay.NotSupportedError` without a signature or with ``extensions``,
    and :class:`~shmreplay.ConfigError` (a ValueError) for what Reverb refuses too.
    """

    def __init__(
        self,
        name: str,
        sampler: _Selector,
        remover: _Selector,
        max_size: int,
        rate_limiter: RateLimiter,
        max_times_sampled: int = 0,
        extensions: Sequence[Any] = (),
        signature: Any = None,
    ) -> None:
        if not name:
            raise ConfigError("name must be nonempty")
        if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)):
            raise ConfigError(f"max_size must be an integer, got {max_size!r}")
        if max_size <= 0:
            raise ConfigError(f"max_size ({max_size}) must be a positive integer")
        if extensions:
            raise NotSupportedError(
                f"reverb.Table({name!r}): table extensions are not supported by shmreplay; "
                "remove extensions="
            )
        if signature is None:
            raise NotSupportedError(
                f"reverb.Table({name!r}): a table without signature cannot be served: shmreplay "
                "preallocates every item in shared memory and must know each field's shape and "
                "dtype. Pass signature=, e.g. {'obs': reverb.TensorSpec([84, 84, 4], np.uint8), "
                "'action': reverb.TensorSpec([], np.int64)} (tf.TensorSpec works too)"
            )
        for role, sel in (("sampler", sampler), ("remover", remover)):
            if not isinstance(sel, _Selector):
                raise ConfigError(
                    f"reverb.Table({name!r}): {role} must be one of reverb.selectors "
                    f"(Uniform(), Prioritized(0.6), Fifo(), ...), got {sel!r}"
                )
        if not isinstance(rate_limiter, RateLimiter):
            raise ConfigError(
                f"reverb.Table({name!r}): rate_limiter must be one of reverb.rate_limiters "
                f"(MinSize(1), SampleToInsertRatio(...), ...), got {rate_limiter!r}"
            )
        spec = TableSpec(
            name=str(name),
            max_size=int(max_size),
            signature=_signature_fields(signature, name),
            sampler=sampler.spec,
            remover=remover.spec,
            rate_limiter=rate_limiter.spec,
            max_times_sampled=max(0, int(max_times_sampled)),
        )
        # Refuse now what the daemon would refuse at start (a name with '/', ...).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parse_config(tomllib.loads(to_toml([spec])), f"reverb.Table({name!r})")
        self.spec = spec
        self.signature = signature

    @classmethod
    def queue(
        cls,
        name: str,
        max_size: int,
        extensions: Sequence[Any] = (),
        signature: Any = None,
    ) -> Table:
        """A queue: Fifo sampler and remover, each item sampled once, inserts block when full."""
        return cls._once(name, max_size, Fifo, Queue, extensions, signature)

    @classmethod
    def stack(
        cls,
        name: str,
        max_size: int,
        extensions: Sequence[Any] = (),
        signature: Any = None,
    ) -> Table:
        """A stack: as :meth:`queue` with Lifo."""
        return cls._once(name, max_size, Lifo, Stack, extensions, signature)

    @classmethod
    def _once(
        cls,
        name: str,
        max_size: int,
        selector: type[_Selector],
        limiter: type[RateLimiter],
        extensions: Sequence[Any],
        signature: Any,
    ) -> Table:
        """Every item sampled once, in ``selector``'s order (Reverb's queue and stack)."""
        return cls(
            name=name,
            sampler=selector(),
            remover=selector(),
            max_size=max_size,
            max_times_sampled=1,
            rate_limiter=limiter(max_size),
            extensions=extensions,
            signature=signature,
        )

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"reverb.Table({self.spec})"


def _prefix() -> str:
    return os.environ.get("SHMREPLAY_REVERB_PREFIX", "reverb-")


def _instance_name(port: int) -> str:
    return f"{_prefix()}{port}"


def _pick_port() -> int:
    """A port number free on this host whose instance name no live daemon uses (as Reverb's
    portpicker; the port stays closed: it only names the instance)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        rec = InstanceRecord.read(_instance_name(port))
        if rec is None or not rec.alive():
            return port
    raise ShmReplayError("no free port number found for a reverb.Server; pass port=")


# Signatures as given to reverb.Table (tf.TensorSpec objects, ...), for server_info() in the
# process that started the server: instance → table → signature.
_signatures: dict[str, dict[str, Any]] = {}


class Server:
    """Reverb's server: a shmreplay daemon serving ``tables``, reachable as ``localhost:port``.

    Starts the daemon (a child process) and returns once it serves. ``port`` (default: a
    free one) only names the instance; no socket is opened. ``checkpointer`` may be a
    :class:`DefaultCheckpointer`. The daemon stops with :meth:`stop`, when this object is
    deleted, or when the program exits.
    """

    _server: _server_lib.Server | None = None
    _stopped = False

    def __init__(
        self,
        tables: Sequence[Table] | None = None,
        port: int | None = None,
        checkpointer: DefaultCheckpointer | None = None,
    ) -> None:
        if not tables:
            raise ConfigError("At least one table must be provided")
        for t in tables:
            if not isinstance(t, Table):
                raise ConfigError(f"tables must be reverb.Table objects, got {t!r}")
        names = [t.name for t in tables]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"Multiple items in tables have the same name: {', '.join(dupes)}")
        if checkpointer is not None and not isinstance(checkpointer, DefaultCheckpointer):
            raise NotSupportedError(
                f"checkpointer {checkpointer!r} is not supported; use "
                "reverb.checkpointers.DefaultCheckpointer(path=...)"
            )
        if port is None:
            port = _pick_port()
        if (
            isinstance(port, bool)
            or not isinstance(port, (int, np.integer))
            or not (0 < port < 65536)
        ):
            raise ConfigError(f"port must be an integer in 1..65535, got {port!r}")
        self._port = int(port)
        name = _instance_name(self._port)
        server = ServerSpec(
            name=name, checkpoint_dir=None if checkpointer is None else checkpointer.path
        )
        text = to_toml([t.spec for t in tables], server)
        self._server = _server_lib.Server(text, name)
        _signatures[name] = {t.name: t.signature for t in tables}

    @property
    def port(self) -> int:
        """The port number of the address ``localhost:<port>`` that reaches this server."""
        return self._port

    @property
    def instance_name(self) -> str:
        """The shmreplay instance name: ``shmreplay.attach(server.instance_name)`` works."""
        return _instance_name(self._port)

    def stop(self) -> None:
        """Stop the daemon and wait for it; its tables are gone. Idempotent."""
        if self._server is None or self._stopped:
            return
        self._stopped = True
        name = self._server.name
        _drop_attachment(name)
        _signatures.pop(name, None)
        self._server.stop()

    def wait(self) -> None:
        """Block until the daemon exits (``stop()`` from another thread, a signal)."""
        if self._server is not None and self._server.running():
            self._server.wait()

    def localhost_client(self) -> Client:
        """A :class:`Client` of this server."""
        return Client(f"localhost:{self._port}")

    def __del__(self) -> None:
        try:
            self.stop()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"reverb.Server(port={getattr(self, '_port', None)}, {self._server!r})"


# -- client ----------------------------------------------------------------------------------------

# One attachment per instance and process, shared by every Client of that address (Reverb
# programs make clients freely, e.g. server.localhost_client() per call).
_attachments: dict[tuple[str, int], _ShmClient] = {}
# Re-entrant: a Server collected (__del__ → stop) while this thread attaches drops its own
# attachment under the lock.
_attach_lock = threading.RLock()


def _attached(instance: str) -> _ShmClient:
    key = (instance, os.getpid())
    with _attach_lock:
        client = _attachments.get(key)
        if client is None or client._closed:
            client = _attachments[key] = _attach(instance, timeout=ATTACH_TIMEOUT_S)
        return client


def _drop_attachment(instance: str) -> None:
    with _attach_lock:
        client = _attachments.pop((instance, os.getpid()), None)
    if client is not None:
        client.close(timeout=5.0)


def _instance_for(address: str) -> str:
    """``localhost:PORT`` (or 127.0.0.1, [::1], this host's name) → the instance name."""
    if not isinstance(address, str):
        raise InvalidArgumentError(f"server_address must be 'host:port', got {address!r}")
    addr = address.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]").lower()
    if not sep or not port.isdigit():
        raise InvalidArgumentError(
            f"server_address {address!r} is not 'host:port'; use f'localhost:{{server.port}}'"
        )
    if host not in _LOCAL_HOSTS and host != socket.gethostname().lower():
        raise NotSupportedError(
            f"server_address {address!r}: shmreplay serves the processes of one host over "
            "shared memory; Reverb's gRPC across hosts is not supported. Run the client on "
            f"the server's host and connect to 'localhost:{port}'"
        )
    return _instance_name(int(port))


class SampleInfo(NamedTuple):
    """Reverb's per-item sample information (Python numbers)."""

    key: int
    probability: float
    table_size: int
    priority: float
    times_sampled: int


class ReplaySample(NamedTuple):
    """One sampled item (or one timestep of it): ``info`` and ``data``."""

    info: SampleInfo
    data: Any


@dataclass(frozen=True)
class PrioritizedOptions:
    priority_exponent: float = 0.0


@dataclass(frozen=True)
class HeapOptions:
    min_heap: bool = False


@dataclass(frozen=True)
class KeyDistributionOptions:
    """Reverb's selector description (``info.sampler_options.prioritized.priority_exponent``,
    ``info.remover_options.fifo``, ...): the field of the selector's kind is set."""

    fifo: bool = False
    uniform: bool = False
    prioritized: PrioritizedOptions = field(default_factory=PrioritizedOptions)
    heap: HeapOptions = field(default_factory=HeapOptions)
    lifo: bool = False
    is_deterministic: bool = False
    kind: str = "uniform"

    def WhichOneof(self, group: str = "distribution") -> str:  # noqa: N802 (protobuf's name)
        """The kind, as the protobuf message says it: fifo, uniform, prioritized, heap, lifo."""
        return self.kind

    @classmethod
    def from_selector(cls, d: Mapping[str, Any]) -> KeyDistributionOptions:
        kind = d["kind"]
        if kind == "prioritized":
            return cls(prioritized=PrioritizedOptions(float(d["priority_exponent"])), kind=kind)
        if kind in ("min_heap", "max_heap"):
            return cls(heap=HeapOptions(kind == "min_heap"), is_deterministic=True, kind="heap")
        return cls(**{kind: True}, is_deterministic=kind != "uniform", kind=kind)


@dataclass(frozen=True)
class RateLimiterCallStats:
    """Calls of one side of the limiter: ``completed`` (inserts or samples counted so far)."""

    completed: int = 0
    pending: int = 0
    limited: int = 0


@dataclass(frozen=True)
class RateLimiterInfo:
    samples_per_insert: float
    min_diff: float
    max_diff: float
    min_size_to_sample: int
    insert_stats: RateLimiterCallStats
    sample_stats: RateLimiterCallStats


@dataclass
class TableInfo:
    """Reverb's table information, with its field names."""

    name: str
    sampler_options: KeyDistributionOptions
    remover_options: KeyDistributionOptions
    max_size: int
    max_times_sampled: int
    rate_limiter_info: RateLimiterInfo
    signature: Any
    current_size: int
    num_episodes: int
    num_deleted_episodes: int
    num_unique_samples: int
    table_worker_time: Any = None


class Client:
    """Reverb's client for the server at ``server_address`` (``localhost:<port>``).

    Attaches to the daemon on first use, once per process (a Client pickles by address, so
    it can be sent to other processes). Calls block as Reverb's do: an insert while the rate
    limiter holds inserts back, a sample until an item may be sampled.
    """

    def __init__(self, server_address: str, client: Any = None) -> None:
        self._server_address = server_address
        self._instance = _instance_for(server_address)

    def __reduce__(self) -> tuple:
        return self.__class__, (self._server_address,)

    def __repr__(self) -> str:
        return f"Client, server_address={self._server_address}"

    @property
    def server_address(self) -> str:
        return self._server_address

    def _client(self) -> _ShmClient:
        return _attached(self._instance)

    def insert(self, data: Any, priorities: Mapping[str, float]) -> None:
        """Insert ``data`` (the tables' signature structure) as one item into each table of
        ``priorities`` (table → priority); returns when the items are in the tables."""
        if not priorities:
            raise InvalidArgumentError("priorities must contain at least one item")
        client = self._client()
        rows = []
        for name, priority in priorities.items():
            table = client.table(name)
            rows.append((table, _flatten(data, table.spec.signature, name), priority))
        for table, row, priority in rows:
            table.insert(row, priority)
        for table, _, _ in rows:
            table.flush()  # Reverb's insert returns once the server confirmed the item

    def sample(
        self,
        table: str,
        num_samples: int = 1,
        *,
        emit_timesteps: bool = True,
        unpack_as_table_signature: bool = False,
    ) -> Generator[list[ReplaySample] | ReplaySample, None, None]:
        """Yield ``num_samples`` items of ``table``, each sampled when it is requested.

        ``emit_timesteps=True``: each item is a list of ``ReplaySample``, one per timestep,
        when every field has a leading time axis of the same length; otherwise a list of one
        ``ReplaySample`` holding the whole item. ``emit_timesteps=False``: one
        ``ReplaySample`` per item. ``data`` is a flat list (fields in sorted name order), or
        the signature's structure with ``unpack_as_table_signature=True``.
        """
        t = self._client().table(table)
        fields = t.spec.signature
        order = sorted(range(len(fields)), key=lambda i: fields[i].name)
        if _layout(fields) == "list":
            order = list(range(len(fields)))
        flat_fields = [fields[i] for i in order]

        def pack(values: list[Any]) -> Any:
            return _structure(flat_fields, values) if unpack_as_table_signature else values

        for _ in range(num_samples):
            s = t.sample(1)
            info = SampleInfo(
                key=int(s.info.key[0]),
                probability=float(s.info.probability[0]),
                table_size=int(s.info.table_size[0]),
                priority=float(s.info.priority[0]),
                times_sampled=int(s.info.times_sampled[0]),
            )
            cols = [s.data[f.name][0] for f in flat_fields]
            if not emit_timesteps:
                yield ReplaySample(info, pack(cols))
                continue
            lengths = {c.shape[0] if c.ndim else None for c in cols}
            if len(lengths) == 1 and None not in lengths:
                (steps,) = lengths
                yield [ReplaySample(info, pack([c[i] for c in cols])) for i in range(steps)]
            else:
                yield [ReplaySample(info, pack(cols))]

    def mutate_priorities(
        self,
        table: str,
        updates: Mapping[int, float] | None = None,
        deletes: Sequence[int] | None = None,
    ) -> None:
        """Set priorities (key → priority) and delete keys; absent keys are ignored."""
        t = self._client().table(table)
        updates = updates or {}
        deletes = list(deletes or [])
        if updates:
            keys = np.fromiter(updates.keys(), np.uint64, len(updates))
            prios = np.fromiter(updates.values(), np.float64, len(updates))
            t.update_priorities(keys, prios, deletes=deletes or None)
        elif deletes:
            t.delete(deletes)

    def reset(self, table: str) -> None:
        """Remove every item of ``table`` and reset its rate limiter."""
        self._client().table(table).reset()

    def server_info(self, timeout: int | None = None) -> dict[str, TableInfo]:
        """Table name → :class:`TableInfo` (read from shared memory: ``timeout`` is unused)."""
        client = self._client()
        given = _signatures.get(self._instance, {})
        out = {}
        for name in client.tables:
            i = client.table(name).info()
            lim = i.rate_limiter
            out[name] = TableInfo(
                name=name,
                sampler_options=KeyDistributionOptions.from_selector(i.sampler),
                remover_options=KeyDistributionOptions.from_selector(i.remover),
                max_size=i.max_size,
                max_times_sampled=i.max_times_sampled,
                rate_limiter_info=RateLimiterInfo(
                    samples_per_insert=lim.samples_per_insert,
                    min_diff=lim.min_diff,
                    max_diff=lim.max_diff,
                    min_size_to_sample=lim.min_size_to_sample,
                    insert_stats=RateLimiterCallStats(completed=lim.inserts),
                    sample_stats=RateLimiterCallStats(completed=lim.samples),
                ),
                signature=given.get(name, _spec_structure(i.signature)),
                current_size=i.current_size,
                num_episodes=i.num_episodes,
                num_deleted_episodes=i.num_deleted_episodes,
                num_unique_samples=i.num_unique_samples,
            )
        return out

    def checkpoint(self) -> str:
        """Write a checkpoint of every table now; returns its directory once it is complete.

        Needs ``checkpointer=reverb.checkpointers.DefaultCheckpointer(path)`` on the server.
        """
        try:
            return str(self._client().checkpoint()["path"])
        except ConfigError as exc:
            if "checkpoint_dir" not in str(exc):
                raise
            raise NotSupportedError(
                "this server has no checkpoint directory: pass checkpointer="
                "reverb.checkpointers.DefaultCheckpointer(path=...) to reverb.Server (Reverb's "
                "default temporary checkpointer is not emulated)"
            ) from None

    def trajectory_writer(
        self, num_keep_alive_refs: int, *, get_signature_timeout_ms: int | None = 3000
    ) -> TrajectoryWriter:
        """A trajectory writer (see :class:`TrajectoryWriter`); items are validated against
        the tables' signatures (``get_signature_timeout_ms`` is unused)."""
        if num_keep_alive_refs < 1:
            raise InvalidArgumentError(
                f"num_keep_alive_refs ({num_keep_alive_refs}) must be a positive integer"
            )
        return TrajectoryWriter(_ShmTrajectoryWriter(self._client(), num_keep_alive_refs))

    def writer(self, max_sequence_length: int, *args: Any, **kwargs: Any) -> Writer:
        """Reverb's legacy writer: not supported."""
        raise NotSupportedError(
            "Client.writer (Reverb's legacy writer) is not supported; use "
            "client.trajectory_writer(num_keep_alive_refs) and create_item with "
            "writer.history selections (client.insert for single steps)"
        )

    def structured_writer(self, configs: Sequence[Any]) -> Any:
        """Reverb's structured writer: not supported."""
        raise NotSupportedError(
            "Client.structured_writer is not supported; use "
            "client.trajectory_writer(num_keep_alive_refs) and create_item"
        )


class TrajectoryWriter:
    """Reverb's trajectory writer over :class:`shmreplay.TrajectoryWriter`.

    Steps are flat dicts of field → value. ``create_item`` takes a dict of field →
    ``writer.history[field][...]`` selection (or one selection, or a list, for tables with such
    signatures). ``append`` returns None (Reverb returns data references).

    As in Reverb, ``create_item`` does not wait for the rate limiter. Into tables whose limiter
    never holds inserts back (``MinSize``) items are sent in batches as shmreplay's writer
    sends them. Once the writer writes to a table whose limiter can (``Queue``, ``Stack``,
    ``SampleToInsertRatio``), it sends items one by one after each ``create_item`` without
    waiting (~100 µs per item instead of ~20 µs per step); an item the limiter holds back stays
    pending, is retried by the next ``append``/``create_item`` and is sent by
    ``flush``/``end_episode``, which wait (``timeout_ms`` runs out with
    :class:`DeadlineExceededError`). Backpressure: once a table has a full batch pending (up to
    128 items), or pending items reference steps the history is about to overwrite,
    ``create_item``/``append`` wait too; items of 64 KiB or more are written by
    ``create_item`` itself, which then waits.
    """

    _writer: _ShmTrajectoryWriter | None = None

    def __init__(self, writer: _ShmTrajectoryWriter) -> None:
        self._writer = writer
        self._open = False  # the newest step was appended with partial_step=True
        self._unsent = False  # items may be pending or not yet confirmed committed
        self._nowait = False  # sending items itself (a table's limiter can block inserts)
        self._free_flowing: set[str] = set()  # tables whose limiter never blocks inserts

    def _send_nowait(self) -> None:
        """Send pending items while that needs no waiting; leave the rest pending."""
        try:
            self._writer.flush(timeout=0.0)
        except RateLimiterTimeout:
            self._unsent = True  # held back by the limiter, or not committed yet: retry later
        else:
            self._unsent = False

    @property
    def history(self) -> Any:
        """Field → the field's history, indexed like a list (``[-1]``, ``[-3:]``, ``[[0, 2]]``)."""
        if not self._writer.history:
            raise RuntimeError(
                "history cannot be accessed before `append` is called at least once."
            )
        return self._writer.history

    @property
    def episode_steps(self) -> int:
        """Steps appended since the last ``end_episode``, an open partial step not counted."""
        return self._writer.episode_steps - (1 if self._open else 0)

    def configure(
        self, path: Any, *, num_keep_alive_refs: int, max_chunk_length: int | None
    ) -> None:
        """Accepted and ignored: shmreplay keeps no chunks (each field's history is a ring of
        the writer's ``num_keep_alive_refs`` steps)."""
        if num_keep_alive_refs < 1:
            raise InvalidArgumentError(
                f"num_keep_alive_refs ({num_keep_alive_refs}) must be a positive integer"
            )

    def append(self, data: Mapping[str, Any], *, partial_step: bool = False) -> None:
        """Add a step (a flat dict of field → value); ``partial_step`` keeps it open."""
        if not isinstance(data, Mapping):
            raise NotSupportedError(
                f"TrajectoryWriter.append: only a flat dict of field → value is supported, got "
                f"{type(data).__name__}"
            )
        for k, v in data.items():
            if isinstance(v, Mapping):
                raise NotSupportedError(
                    f"TrajectoryWriter.append: nested data under {k!r} is not supported; "
                    "use a flat dict"
                )
        self._writer.append(
            {k: v for k, v in data.items() if v is not None}, partial_step=partial_step
        )
        self._open = bool(partial_step)
        if self._unsent:
            self._send_nowait()

    def create_item(self, table: str, priority: float, trajectory: Any) -> None:
        """Make an item of ``table`` from history selections (shaped as its signature)."""
        if isinstance(trajectory, TrajectoryColumn):
            trajectory = {_LEAF_FIELD: trajectory}
        elif isinstance(trajectory, (list, tuple)):
            trajectory = {_LIST_FIELD.format(i): c for i, c in enumerate(trajectory)}
        if not self._nowait and table not in self._free_flowing:
            if self._writer.client.table(table).core.limiter.blocks_inserts:
                self._nowait = True
                self._writer.max_latency = _WRITER_SENDS_ITSELF
            else:
                self._free_flowing.add(table)
        self._writer.create_item(table, priority, trajectory)
        if self._nowait:
            self._send_nowait()

    def flush(self, block_until_num_items: int = 0, timeout_ms: int | None = None) -> None:
        """Send pending items; wait until at most ``block_until_num_items`` are unconfirmed."""
        timeout = None if timeout_ms is None else timeout_ms / 1000.0
        self._writer.flush(block_until_num_items, timeout=timeout)
        self._unsent = block_until_num_items > 0

    def end_episode(self, clear_buffers: bool = True, timeout_ms: int | None = None) -> None:
        """Flush, and start a new episode (clearing the history unless told not to)."""
        timeout = None if timeout_ms is None else timeout_ms / 1000.0
        self._open = False
        self._writer.end_episode(clear_buffers=clear_buffers, timeout=timeout)
        self._unsent = False

    def close(self) -> None:
        """Flush and close (idempotent)."""
        self._writer.close()

    def __enter__(self) -> TrajectoryWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # As Reverb: flush unless the error is the replay system's own.
        if exc_type is not None and issubclass(exc_type, ShmReplayError):
            self._writer.__exit__(exc_type, exc, tb)
        else:
            self._writer.__exit__(None, None, None)

    def __del__(self) -> None:
        # As Reverb's writer: a writer dropped without close() still sends what it holds.
        try:
            self._writer.close(timeout=1.0)
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"reverb.TrajectoryWriter({self._writer!r})"


# -- what is not supported -------------------------------------------------------------------------


def _unsupported(name: str, instead: str) -> type:
    message = f"reverb.{name} is not supported by shmreplay: {instead}"

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        raise NotSupportedError(message)

    def from_table_signature(cls: Any, *args: Any, **kwargs: Any) -> Any:
        raise NotSupportedError(message)

    return type(
        name,
        (),
        {
            "__init__": __init__,
            "from_table_signature": classmethod(from_table_signature),
            "__doc__": f"Not supported: {instead}",
        },
    )


_NO_TF = (
    "it has no TensorFlow ops; sample numpy batches with client.sample(...) or "
    "shmreplay.attach(server.instance_name).table(name).sample(batch_size)"
)
Writer = _unsupported("Writer", "use client.trajectory_writer(num_keep_alive_refs)")
TFClient = _unsupported("TFClient", _NO_TF)
ReplayDataset = _unsupported("ReplayDataset", _NO_TF)
TrajectoryDataset = _unsupported("TrajectoryDataset", _NO_TF)
TimestepDataset = _unsupported("TimestepDataset", _NO_TF)
PatternDataset = _unsupported("PatternDataset", _NO_TF)


class _UnsupportedModule:
    def __init__(self, name: str, instead: str) -> None:
        self._message = f"reverb.{name} is not supported by shmreplay: {instead}"

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise NotSupportedError(self._message)


structured = _UnsupportedModule(
    "structured (the structured writer)", "use client.trajectory_writer(num_keep_alive_refs)"
)
