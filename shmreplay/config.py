"""tables.toml → frozen, validated specs.

Every mistake is reported as one :class:`ConfigError` naming the file, the table, the key and what
is allowed, before any memory is allocated. Unknown keys are mistakes too: a misspelt
``max_times_sampeld`` silently ignored would be worse than a refusal.
"""

from __future__ import annotations

import json
import math
import tomllib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

SELECTOR_KINDS = ("uniform", "prioritized", "fifo", "lifo", "min_heap", "max_heap")
RATE_LIMITER_KINDS = ("min_size", "sample_to_insert_ratio", "queue", "stack", "custom")
# Fixed-size numeric dtypes only: a row is a fixed number of bytes in shared memory.
DTYPES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
MAX_TABLE_NAME = 64
# An instance's longest object name is its semaphores' "sem.shmreplay.<instance>.<table>.sample"
# (see shmreplay.engine.instance), and a file name holds at most NAME_MAX (255) bytes on
# Linux. Names have no '.', so the '.' after the instance name ends it: no instance's objects
# start with another's prefix ("exp" and "exp.v2" cannot both exist).
NAME_MAX = 255
MAX_INSTANCE_NAME = NAME_MAX - len("sem.shmreplay.") - len(".") - MAX_TABLE_NAME - len(".sample")


@dataclass(frozen=True)
class FieldSpec:
    """One field of a table's signature: a numpy dtype name and a fixed shape (``()`` = scalar)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        # Python ints: np.prod in int64 wraps ([2**32, 2**32] gave 0 bytes)
        return math.prod(self.shape) * self.np_dtype.itemsize


@dataclass(frozen=True)
class SelectorSpec:
    """A sampler or remover: ``kind`` ∈ SELECTOR_KINDS; ``priority_exponent`` for prioritized."""

    kind: str
    priority_exponent: float = 1.0

    @classmethod
    def uniform(cls) -> SelectorSpec:
        return cls("uniform")

    @classmethod
    def prioritized(cls, priority_exponent: float) -> SelectorSpec:
        return cls("prioritized", float(priority_exponent))

    @classmethod
    def fifo(cls) -> SelectorSpec:
        return cls("fifo")

    @classmethod
    def lifo(cls) -> SelectorSpec:
        return cls("lifo")

    @classmethod
    def min_heap(cls) -> SelectorSpec:
        return cls("min_heap")

    @classmethod
    def max_heap(cls) -> SelectorSpec:
        return cls("max_heap")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.kind == "prioritized":
            d["priority_exponent"] = self.priority_exponent
        return d


@dataclass(frozen=True)
class RateLimiterSpec:
    """Reverb's rate limiter in its general form; build it with one of the presets."""

    kind: str
    samples_per_insert: float
    min_size_to_sample: int
    min_diff: float
    max_diff: float

    @classmethod
    def min_size(cls, min_size: int) -> RateLimiterSpec:
        """Sampling waits until the table holds ``min_size`` items; inserts never block."""
        _check_min_size("min_size", min_size)
        return cls("min_size", 1.0, int(min_size), -math.inf, math.inf)

    @classmethod
    def sample_to_insert_ratio(
        cls,
        samples_per_insert: float,
        min_size_to_sample: int,
        error_buffer: float | tuple[float, float],
    ) -> RateLimiterSpec:
        """Keep samples ≈ ``samples_per_insert`` × inserts, within ``error_buffer``."""
        spi = _float_arg("samples_per_insert", samples_per_insert)
        if not spi > 0 or not math.isfinite(spi):
            raise ConfigError(
                f"samples_per_insert must be a positive number, got {samples_per_insert!r}"
            )
        _check_min_size("min_size_to_sample", min_size_to_sample)
        target = spi * min_size_to_sample
        if isinstance(error_buffer, (tuple, list)):
            if len(error_buffer) != 2:
                raise ConfigError(
                    f"error_buffer must be a number or [min_diff, max_diff], got {error_buffer!r}"
                )
            lo = _float_arg("error_buffer[0]", error_buffer[0])
            hi = _float_arg("error_buffer[1]", error_buffer[1])
        else:
            e = _float_arg("error_buffer", error_buffer)
            if not e >= 0:
                raise ConfigError(f"error_buffer must be ≥ 0, got {error_buffer!r}")
            lo, hi = target - e, target + e
        if not hi - lo >= 2 * max(1.0, spi):  # also refuses NaN bounds and [-inf, -inf]
            raise ConfigError(
                f"error_buffer too small: max_diff − min_diff = {hi - lo:g} must be at least "
                f"2·max(1, samples_per_insert) = {2 * max(1.0, spi):g}, or the limiter can deadlock"
            )
        if lo > target:
            raise ConfigError(
                f"min_diff {lo:g} exceeds samples_per_insert·min_size_to_sample = {target:g}: "
                "sampling could never start"
            )
        if hi < target:
            warnings.warn(
                f"max_diff {hi:g} is below samples_per_insert·min_size_to_sample = {target:g}: "
                "inserts may block before sampling can start",
                stacklevel=2,
            )
        return cls("sample_to_insert_ratio", spi, int(min_size_to_sample), lo, hi)

    @classmethod
    def queue(cls, size: int) -> RateLimiterSpec:
        """Every item is sampled once; at most ``size`` items wait (with a Fifo sampler)."""
        _check_min_size("size", size)
        return cls("queue", 1.0, 1, 0.0, float(size))

    @classmethod
    def stack(cls, size: int) -> RateLimiterSpec:
        """The Queue limiter's numbers, meant for a Lifo sampler."""
        _check_min_size("size", size)
        return cls("stack", 1.0, 1, 0.0, float(size))

    @classmethod
    def custom(
        cls, samples_per_insert: float, min_size_to_sample: int, min_diff: float, max_diff: float
    ) -> RateLimiterSpec:
        """The general form, with no further checks than Reverb's constructor makes."""
        spi = _float_arg("samples_per_insert", samples_per_insert)
        if not spi > 0 or not math.isfinite(spi):
            raise ConfigError(f"samples_per_insert must be positive, got {samples_per_insert!r}")
        _check_min_size("min_size_to_sample", min_size_to_sample)
        lo, hi = _float_arg("min_diff", min_diff), _float_arg("max_diff", max_diff)
        if not lo <= hi or lo == math.inf or hi == -math.inf:  # NaN fails the first test
            raise ConfigError(
                f"need min_diff ≤ max_diff, min_diff < +inf and max_diff > -inf; "
                f"got min_diff {min_diff!r}, max_diff {max_diff!r}"
            )
        return cls("custom", spi, int(min_size_to_sample), float(min_diff), float(max_diff))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "samples_per_insert": self.samples_per_insert,
            "min_size_to_sample": self.min_size_to_sample,
            "min_diff": self.min_diff,
            "max_diff": self.max_diff,
        }


# Item counts of the rate limiter live in float64 parameter lines: beyond 2**53 they are no
# longer exact (and no table holds more than MAX_SLOTS items anyway).
MAX_COUNT = 2**53


def _check_min_size(key: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or not 1 <= value <= MAX_COUNT
    ):
        raise ConfigError(f"{key} must be an integer ≥ 1 and ≤ 2**53, got {value!r}")


def _float_arg(key: str, value: Any) -> float:
    """A rate limiter's number as a float; ConfigError for what is not a number."""
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key} must be a number (within ±1.8e308), got {value!r}") from None


# Keys are ``tag << 32 | slot``: a table has at most 2**32 slots.
MAX_SLOTS = 2**32
# The most a 64-bit Linux process can map (57-bit addresses with 5-level page tables).
MAX_TABLE_BYTES = 2**56
MAX_TIMES_SAMPLED = 2**31 - 1  # meta.times_sampled is an int32


@dataclass(frozen=True)
class TableSpec:
    """A table: its signature sizes the shared memory; ``max_size`` items are kept at most.

    ``headroom`` extra slots are allocated for items being written (leased to writers) or still
    being copied by a sampler after deletion, so that a full table keeps accepting writes.
    """

    name: str
    max_size: int
    signature: tuple[FieldSpec, ...]
    sampler: SelectorSpec = field(default_factory=SelectorSpec.uniform)
    remover: SelectorSpec = field(default_factory=SelectorSpec.fifo)
    rate_limiter: RateLimiterSpec = field(default_factory=lambda: RateLimiterSpec.min_size(1))
    max_times_sampled: int = 0
    headroom: int = 0

    def __post_init__(self) -> None:
        if self.headroom <= 0:
            object.__setattr__(self, "headroom", max(64, min(self.max_size, 8192)))
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Refuse a table that cannot exist: sizes are Python ints here, so nothing wraps."""
        if self.num_slots > MAX_SLOTS:
            raise ConfigError(
                f"table {self.name!r}: max_size + headroom = {self.num_slots:,} slots, above "
                f"{MAX_SLOTS:,} (a key holds its slot in 32 bits); reduce max_size"
            )
        if self.max_times_sampled > MAX_TIMES_SAMPLED:
            raise ConfigError(
                f"table {self.name!r}: max_times_sampled {self.max_times_sampled:,} is above "
                f"{MAX_TIMES_SAMPLED:,} (times_sampled is an int32); use 0 for unlimited"
            )
        data = self.num_slots * self.row_bytes
        if data > MAX_TABLE_BYTES:
            raise ConfigError(
                f"table {self.name!r}: {self.num_slots:,} slots × {self.row_bytes:,} B/row = "
                f"{data:,} bytes, more than a 64-bit process can map ({MAX_TABLE_BYTES:,}); "
                "reduce max_size or the signature's shapes"
            )

    @property
    def num_slots(self) -> int:
        return self.max_size + self.headroom

    @property
    def row_bytes(self) -> int:
        return sum(f.nbytes for f in self.signature)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_size": self.max_size,
            "signature": [[f.name, list(f.shape), f.dtype] for f in self.signature],
            "sampler": self.sampler.to_dict(),
            "remover": self.remover.to_dict(),
            "rate_limiter": self.rate_limiter.to_dict(),
            "max_times_sampled": self.max_times_sampled,
            "headroom": self.headroom,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableSpec:
        return cls(
            name=d["name"],
            max_size=int(d["max_size"]),
            signature=tuple(
                FieldSpec(n, tuple(int(x) for x in s), t) for n, s, t in d["signature"]
            ),
            sampler=SelectorSpec(**d["sampler"]),
            remover=SelectorSpec(**d["remover"]),
            rate_limiter=RateLimiterSpec(**d["rate_limiter"]),
            max_times_sampled=int(d["max_times_sampled"]),
            headroom=int(d["headroom"]),
        )


@dataclass(frozen=True)
class ServerSpec:
    """The ``[server]`` section: instance name and service-wide settings."""

    name: str = "default"
    checkpoint_dir: str | None = None
    checkpoint_interval_s: float | None = None
    checkpoint_keep: int = 3
    group: str | None = None
    metrics_port: int | None = None
    max_clients: int = 64


@dataclass(frozen=True)
class Config:
    server: ServerSpec
    tables: tuple[TableSpec, ...]

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)


# -- parsing ---------------------------------------------------------------------------------------


class _Where:
    """Builds error messages that say where in which file the mistake is."""

    def __init__(self, source: str, table: str | None = None) -> None:
        self.source, self.table = source, table

    def error(self, key: str, problem: str) -> ConfigError:
        where = f"table {self.table!r}, " if self.table else ""
        return ConfigError(f"{self.source}: {where}key {key!r}: {problem}")


def _check_keys(where: _Where, section: str, d: dict, allowed: tuple[str, ...]) -> None:
    for k in d:
        if k not in allowed:
            raise where.error(f"{section}{k}", f"unknown key; allowed: {', '.join(allowed)}")


def _int(where: _Where, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise where.error(key, f"must be an integer ≥ {minimum}, got {value!r}")
    return value


def _number(where: _Where, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(key, f"must be a number, got {value!r}")
    try:
        number = float(value)  # an int beyond ±1.8e308 has no float
    except OverflowError:
        raise where.error(key, f"must be a number within ±1.8e308, got {value!r}") from None
    if math.isnan(number):
        raise where.error(key, f"must be a number, got {value!r}")
    return number


def _name(where: _Where, key: str, value: Any) -> str:
    if (
        not isinstance(value, str)
        or not value
        or not set(value) <= _NAME_CHARS
        or len(value) > MAX_TABLE_NAME
    ):
        raise where.error(
            key,
            f"must be 1–{MAX_TABLE_NAME} characters of letters, digits, '_' or '-', got {value!r}",
        )
    return value


def check_instance_name(
    name: object, where: str = "instance name", error: type[ValueError] = ConfigError
) -> str:
    """Return ``name`` if it is a valid instance name, else raise :class:`ConfigError`.

    The one check for every way a name arrives: ``--name`` of every command, ``[server] name``
    in tables.toml, ``Server(name=)``, ``attach(name)``. 1–MAX_INSTANCE_NAME letters, digits,
    '_' or '-': the name becomes part of file names in /dev/shm and the runtime directory,
    so '/', '.' (which would let instance "exp" claim the objects of "exp.v2") and the empty
    name are refused."""
    if (
        not isinstance(name, str)
        or not name
        or not set(name) <= _NAME_CHARS
        or len(name) > MAX_INSTANCE_NAME
    ):
        shown = name if not isinstance(name, str) or len(name) <= 80 else name[:80] + "..."
        length = f" ({len(name)} characters)" if isinstance(name, str) else ""
        raise error(
            f"{where}: {shown!r}{length} is not a valid instance name; use 1–"
            f"{MAX_INSTANCE_NAME} characters of letters, digits, '_' or '-' (no '.' or '/')"
        )
    return name


def _selector(where: _Where, key: str, value: Any) -> SelectorSpec:
    if not isinstance(value, dict) or "kind" not in value:
        raise where.error(
            key, f'must be a table like {{ kind = "fifo" }}; kinds: {", ".join(SELECTOR_KINDS)}'
        )
    kind = value["kind"]
    if kind not in SELECTOR_KINDS:
        raise where.error(
            f"{key}.kind", f"unknown selector {kind!r}; allowed: {', '.join(SELECTOR_KINDS)}"
        )
    if kind == "prioritized":
        _check_keys(where, f"{key}.", value, ("kind", "priority_exponent"))
        if "priority_exponent" not in value:
            raise where.error(
                f"{key}.priority_exponent", "required for a prioritized selector, e.g. 0.6"
            )
        alpha = _number(where, f"{key}.priority_exponent", value["priority_exponent"])
        if alpha < 0 or not math.isfinite(alpha):
            raise where.error(
                f"{key}.priority_exponent", f"must be a finite number ≥ 0, got {alpha!r}"
            )
        return SelectorSpec.prioritized(alpha)
    _check_keys(where, f"{key}.", value, ("kind",))
    return SelectorSpec(kind)


_LIMITER_KEYS = {
    "min_size": ("min_size",),
    "sample_to_insert_ratio": ("samples_per_insert", "min_size_to_sample", "error_buffer"),
    "queue": ("size",),
    "stack": ("size",),
    "custom": ("samples_per_insert", "min_size_to_sample", "min_diff", "max_diff"),
}


def _rate_limiter(where: _Where, value: Any) -> RateLimiterSpec:
    key = "rate_limiter"
    if not isinstance(value, dict) or "kind" not in value:
        raise where.error(
            key, f"must be a table with a kind; kinds: {', '.join(RATE_LIMITER_KINDS)}"
        )
    kind = value["kind"]
    if kind not in RATE_LIMITER_KINDS:
        raise where.error(
            f"{key}.kind",
            f"unknown rate limiter {kind!r}; allowed: {', '.join(RATE_LIMITER_KINDS)}",
        )
    needed = _LIMITER_KEYS[kind]
    _check_keys(where, f"{key}.", value, ("kind", *needed))
    for k in needed:
        if k not in value:
            raise where.error(
                f"{key}.{k}", f"required for a {kind} rate limiter (needs {', '.join(needed)})"
            )
    args = {}
    for k in needed:
        v = value[k]
        if k in ("min_size", "size", "min_size_to_sample"):
            args[k] = _int(where, f"{key}.{k}", v, 1)
        elif k == "error_buffer" and isinstance(v, list):
            if len(v) != 2:
                raise where.error(
                    f"{key}.{k}", f"must be a number or [min_diff, max_diff], got {v!r}"
                )
            args[k] = tuple(_number(where, f"{key}.{k}", x) for x in v)
        else:
            args[k] = _number(where, f"{key}.{k}", v)
    try:
        return getattr(RateLimiterSpec, kind)(**args)
    except ConfigError as e:
        raise where.error(key, str(e)) from None


def parse_rate_limiter(
    value: dict[str, Any], source: str = "rate limiter", table: str | None = None
) -> RateLimiterSpec:
    """A ``rate_limiter = {...}`` value as in tables.toml (kind and its keys) → a spec."""
    return _rate_limiter(_Where(source, table), value)


def _signature(where: _Where, value: Any) -> tuple[FieldSpec, ...]:
    if not isinstance(value, dict) or not value:
        raise where.error(
            "signature",
            "required: at least one field, e.g. [table.signature] "
            'obs = { shape = [8], dtype = "float32" }',
        )
    fields = []
    for fname, fdef in value.items():
        key = f"signature.{fname}"
        if not fname.isidentifier():
            raise where.error(key, "field names must be Python identifiers")
        if not isinstance(fdef, dict):
            raise where.error(key, 'must be a table like { shape = [8], dtype = "float32" }')
        _check_keys(where, f"{key}.", fdef, ("shape", "dtype"))
        dtype = fdef.get("dtype")
        if dtype not in DTYPES:
            raise where.error(f"{key}.dtype", f"got {dtype!r}; allowed: {', '.join(DTYPES)}")
        shape = fdef.get("shape", [])
        if not isinstance(shape, list) or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape
        ):
            raise where.error(
                f"{key}.shape", f"must be a list of integers ≥ 1 ([] for a scalar), got {shape!r}"
            )
        fields.append(FieldSpec(fname, tuple(shape), dtype))
    return tuple(fields)


_TABLE_KEYS = (
    "name",
    "kind",
    "max_size",
    "signature",
    "sampler",
    "remover",
    "rate_limiter",
    "max_times_sampled",
    "headroom",
)


def _table(source: str, index: int, d: Any) -> TableSpec:
    where = _Where(
        source, d.get("name") if isinstance(d, dict) and isinstance(d.get("name"), str) else None
    )
    if not isinstance(d, dict):
        raise where.error(f"table[{index}]", "must be a [[table]] section")
    if "name" not in d:
        raise ConfigError(f"{source}: table #{index + 1}: key 'name' is required")
    _check_keys(where, "", d, _TABLE_KEYS)
    name = _name(where, "name", d["name"])
    if "max_size" not in d:
        raise where.error("max_size", "required: the most items the table holds, e.g. 1_000_000")
    max_size = _int(where, "max_size", d["max_size"], 1)
    headroom = _int(where, "headroom", d.get("headroom", 0), 0)
    signature = _signature(where, d.get("signature"))
    kind = d.get("kind", "table")
    if kind in ("queue", "stack"):
        for k in ("sampler", "remover", "rate_limiter", "max_times_sampled"):
            if k in d:
                raise where.error(
                    k, f"a {kind} table sets it itself; remove the key or drop kind = {kind!r}"
                )
        order = "fifo" if kind == "queue" else "lifo"
        return TableSpec(
            name,
            max_size,
            signature,
            SelectorSpec(order),
            SelectorSpec(order),
            getattr(RateLimiterSpec, kind)(max_size),
            1,
            headroom,
        )
    if kind != "table":
        raise where.error("kind", f"got {kind!r}; allowed: 'queue', 'stack' (or leave it out)")
    sampler = _selector(where, "sampler", d.get("sampler", {"kind": "uniform"}))
    remover = _selector(where, "remover", d.get("remover", {"kind": "fifo"}))
    limiter = _rate_limiter(where, d.get("rate_limiter", {"kind": "min_size", "min_size": 1}))
    mts = d.get("max_times_sampled", 0)
    if isinstance(mts, bool) or not isinstance(mts, int):
        raise where.error(
            "max_times_sampled", f"must be an integer (0 or less = unlimited), got {mts!r}"
        )
    return TableSpec(name, max_size, signature, sampler, remover, limiter, max(0, mts), headroom)


_SERVER_KEYS = (
    "name",
    "checkpoint_dir",
    "checkpoint_interval_s",
    "checkpoint_keep",
    "group",
    "metrics_port",
    "max_clients",
)


def _server(source: str, d: Any) -> ServerSpec:
    where = _Where(source)
    if not isinstance(d, dict):
        raise where.error("server", "must be a [server] section")
    _check_keys(where, "server.", d, _SERVER_KEYS)
    kw: dict[str, Any] = {}
    if "name" in d:
        kw["name"] = check_instance_name(d["name"], f"{source}: key 'server.name'")
    if "checkpoint_dir" in d:
        if not isinstance(d["checkpoint_dir"], str) or not d["checkpoint_dir"]:
            raise where.error("server.checkpoint_dir", "must be a directory path")
        kw["checkpoint_dir"] = d["checkpoint_dir"]
    if "checkpoint_interval_s" in d:
        v = _number(where, "server.checkpoint_interval_s", d["checkpoint_interval_s"])
        if v <= 0:
            raise where.error("server.checkpoint_interval_s", f"must be > 0 seconds, got {v!r}")
        kw["checkpoint_interval_s"] = v
    if "checkpoint_keep" in d:
        kw["checkpoint_keep"] = _int(where, "server.checkpoint_keep", d["checkpoint_keep"], 1)
    if "group" in d:
        if not isinstance(d["group"], str) or not d["group"]:
            raise where.error("server.group", "must be a Unix group name")
        kw["group"] = d["group"]
    if "metrics_port" in d:
        port = _int(where, "server.metrics_port", d["metrics_port"], 1)
        if port > 65535:
            raise where.error("server.metrics_port", f"must be a TCP port 1–65535, got {port}")
        kw["metrics_port"] = port
    if "max_clients" in d:
        n = _int(where, "server.max_clients", d["max_clients"], 1)
        if n > 4096:
            raise where.error("server.max_clients", f"must be at most 4096, got {n}")
        kw["max_clients"] = n
    return ServerSpec(**kw)


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate parsed TOML (a dict) into a :class:`Config`; raise :class:`ConfigError`."""
    for k in data:
        if k not in ("server", "table"):
            raise ConfigError(f"{source}: unknown section {k!r}; allowed: [server], [[table]]")
    server = _server(source, data.get("server", {}))
    raw_tables = data.get("table")
    if not isinstance(raw_tables, list) or not raw_tables:
        raise ConfigError(f"{source}: no tables: add at least one [[table]] section")
    tables = tuple(_table(source, i, t) for i, t in enumerate(raw_tables))
    seen: set[str] = set()
    for t in tables:
        if t.name in seen:
            raise ConfigError(
                f"{source}: table {t.name!r} is defined twice; table names must be unique"
            )
        seen.add(t.name)
    return Config(server, tables)


def load_config(path: str | Path) -> Config:
    """Read and validate a tables.toml file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; pass the tables.toml that defines your tables"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse_config(data, str(path))


# -- writing ---------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    """A TOML literal for a number, string, bool or list of them (inf as TOML's ``inf``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            raise ConfigError("NaN cannot be written to tables.toml")
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # the shortest text that reads back as the same float
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to tables.toml")


def _inline(d: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in d.items()) + " }"


def _limiter_toml(spec: RateLimiterSpec) -> dict[str, Any]:
    """The preset's own keys when the spec is exactly what that preset makes, else ``custom``
    (so that ``parse_config`` gives back an equal spec either way)."""
    preset: dict[str, Any] | None = None
    if spec.kind == "min_size":
        preset = {"min_size": spec.min_size_to_sample}
    elif spec.kind in ("queue", "stack") and float(spec.max_diff).is_integer():
        preset = {"size": int(spec.max_diff)}
    elif spec.kind == "sample_to_insert_ratio":
        preset = {
            "samples_per_insert": spec.samples_per_insert,
            "min_size_to_sample": spec.min_size_to_sample,
            "error_buffer": [spec.min_diff, spec.max_diff],
        }
    if preset is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                again = parse_rate_limiter({"kind": spec.kind, **preset})
        except ConfigError:
            again = None
        if again == spec:
            return {"kind": spec.kind, **preset}
    return {
        "kind": "custom",
        "samples_per_insert": spec.samples_per_insert,
        "min_size_to_sample": spec.min_size_to_sample,
        "min_diff": spec.min_diff,
        "max_diff": spec.max_diff,
    }


def to_toml(tables: Sequence[TableSpec], server: ServerSpec | None = None) -> str:
    """A tables.toml text for ``tables`` (and ``server``); ``parse_config`` reads it back to
    equal specs, so ``shmreplay serve`` can be started on specs built in Python."""
    lines: list[str] = []
    if server is not None:
        lines.append("[server]")
        for k in _SERVER_KEYS:
            v = getattr(server, k)
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    for t in tables:
        lines += [
            "[[table]]",
            f"name = {_toml_value(t.name)}",
            f"max_size = {t.max_size}",
            f"sampler = {_inline(t.sampler.to_dict())}",
            f"remover = {_inline(t.remover.to_dict())}",
            f"rate_limiter = {_inline(_limiter_toml(t.rate_limiter))}",
            f"max_times_sampled = {t.max_times_sampled}",
            f"headroom = {t.headroom}",
            "[table.signature]",
        ]
        lines += [
            f"{f.name} = {_inline({'shape': list(f.shape), 'dtype': f.dtype})}" for f in t.signature
        ]
        lines.append("")
    return "\n".join(lines)
