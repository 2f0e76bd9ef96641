"""The rules for values users hand in: priorities, keys, and Python numbers in typed fields.

Shared by the client's insert paths and the trajectory writer, so both accept and refuse the
same things with the same words. Tensors of learning frameworks (torch, JAX) are read by duck
typing, so that this module, and the client, import neither.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InvalidArgumentError

# The largest finite float64: the priority limit of a table without a prioritized selector.
DBL_MAX = float(np.finfo(np.float64).max)

_PRIORITY_KINDS = "biuf"  # numpy kinds a priority may have: bool, integers, floats


def _where(table: str | None) -> str:
    return f" for table {table!r}" if table is not None else ""


def priority_range_error(value: float, max_priority: float, table: str | None) -> str:
    """What is wrong with a priority that is a number but not accepted, and what to do."""
    if not 0.0 <= value < math.inf:  # NaN, inf, negative
        limit = f" (at most {max_priority!r}{_where(table)})" if max_priority < DBL_MAX else ""
        return f"priority must be a finite number >= 0{limit}, got {value!r}"
    return (
        f"priority {value!r} is too large{_where(table)}: the largest accepted is "
        f"{max_priority!r} (a prioritized sampler or remover weighs an item "
        "priority**priority_exponent, and the weights of a full table must add up to a finite "
        "float64: the limit is lower for a larger priority_exponent or max_size); clip "
        f"priorities to it, e.g. np.minimum(priorities, {max_priority!r})"
    )


def check_priority(
    priority: object, max_priority: float = DBL_MAX, table: str | None = None
) -> float:
    """A priority as a float; InvalidArgumentError unless it is a real number (int, float,
    bool, a numpy scalar, a 0-d tensor or array) with ``0 <= priority <= max_priority``.

    ``max_priority`` is the table's limit (``TableCore.max_priority``: a prioritized selector's
    weights must not overflow); ``table`` names the table in the message.
    """
    value = priority if type(priority) is float else _as_float(priority, max_priority, table)
    if not 0.0 <= value <= max_priority:  # also refuses NaN
        raise InvalidArgumentError(priority_range_error(value, max_priority, table))
    return value


def _as_float(priority: object, max_priority: float, table: str | None) -> float:
    """A priority that is not a float, converted; InvalidArgumentError if it is not a real
    number."""
    if isinstance(priority, (str, bytes, bytearray, complex)) or (
        isinstance(priority, (np.generic, np.ndarray))
        and priority.dtype.kind not in _PRIORITY_KINDS
    ):  # float("1") would accept text, float(np.complex64(1j)) drop the imaginary part
        raise InvalidArgumentError(
            f"priority must be a real number (int or float), got {type(priority).__name__} "
            f"{priority!r}"
        )
    try:
        return float(priority)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond the float range: 10**400
        raise InvalidArgumentError(
            f"priority must be a finite number >= 0{_where(table)}, at most {max_priority!r}; "
            f"got an integer too large for a float ({str(priority)[:20]}...)"
        ) from None
    except (TypeError, ValueError):
        raise InvalidArgumentError(
            f"priority must be a real number (int or float), got {type(priority).__name__} "
            f"{priority!r}"
        ) from None


def check_priorities(
    priorities: object, n: int, max_priority: float = DBL_MAX, table: str | None = None
) -> np.ndarray:
    """``priorities`` (one number, or one per item: a list, numpy array, torch tensor or JAX
    array) as a float64 array of ``n``; InvalidArgumentError unless each is a real number with
    ``0 <= p <= max_priority``."""
    if (
        type(priorities) is np.ndarray
        and priorities.dtype == np.float64
        and priorities.shape == (n,)
        and priorities.min(initial=0.0) >= 0.0  # NaN fails one of the two: the slow path
        and priorities.max(initial=0.0) <= max_priority
    ):
        return priorities  # the learner's common case, in two numpy calls
    p = host_array(priorities)  # a torch tensor (detached, to the host) or a JAX array
    if isinstance(p, (float, int, str, bytes, bytearray, complex)):
        return np.full(n, check_priority(p, max_priority, table))
    try:
        arr = np.asarray(p)
        if arr.dtype.kind == "O":  # Python objects: ints too large for a float, None, ...
            arr = arr.astype(np.float64)
    except OverflowError:  # an int beyond the float range: 10**400
        raise InvalidArgumentError(
            f"priorities must be finite numbers >= 0{_where(table)}, at most {max_priority!r}; "
            f"got an integer too large for a float in {_short(priorities)}"
        ) from None
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            "priorities must be real numbers (one number, or one per item as a list, numpy "
            f"array or tensor of ints or floats); got {_short(priorities)}: {exc}"
        ) from None
    if arr.dtype.kind not in _PRIORITY_KINDS:
        raise InvalidArgumentError(
            f"priorities must be real numbers (one number, or one per item as a list, numpy "
            f"array or tensor of ints or floats), got an array of {arr.dtype}"
        )
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise InvalidArgumentError(f"priorities must have shape ({n},), got {arr.shape}")
    ok = (arr >= 0.0) & (arr <= max_priority)  # NaN fails both
    if not ok.all():
        bad = float(arr[~ok][0])
        raise InvalidArgumentError(priority_range_error(bad, max_priority, table))
    return arr


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def python_values_fit(value: np.ndarray, dtype: np.dtype) -> bool:
    """Whether ``value``, read from Python numbers, fits ``dtype`` without loss: bools
    anywhere, ints in a float field or within an int field's range, floats in float fields,
    complex in complex fields."""
    k = value.dtype.kind
    if k == "b":
        return True
    if k in "iu":
        if dtype.kind in "fc":
            return True
        if dtype.kind in "iu":
            if value.size == 0:
                return True
            info = np.iinfo(dtype)
            return bool(info.min <= value.min() and value.max() <= info.max)
        return False
    if k == "f":
        return dtype.kind in "fc"
    if k == "c":
        return dtype.kind == "c"
    return False


def host_array(value: object) -> object:
    """``value`` as a numpy array if it is a torch tensor or a JAX array; otherwise unchanged.

    A torch tensor may require grad or live on a GPU: it is detached and copied to the host
    (``.detach().cpu()``); a bfloat16 one, which numpy cannot hold, is widened to float32. A JAX
    array (anything with ``__array__`` that is not a list) goes through ``np.asarray``, which
    waits for it and copies it to the host. Python lists and numbers are left to the caller's
    own rules.
    """
    if isinstance(value, (np.ndarray, np.generic, list, tuple, int, float)):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):  # torch
        t = value.detach().cpu()
        try:
            return t.numpy()
        except TypeError:  # bfloat16 and other dtypes numpy lacks; a priority fits in float32
            return t.float().numpy()
    if hasattr(value, "__array__"):  # JAX, and any other array library
        return np.asarray(value)
    return value


def check_keys(keys: object, what: str = "keys") -> np.ndarray:
    """Item keys as a flat uint64 array; InvalidArgumentError for what cannot be a key.

    Accepts uint64 arrays (as ``sample`` returns), arrays of signed integers ≥ 0 (torch has no
    full uint64 support, so ``shmreplay.torch`` hands keys out as int64), torch tensors, JAX
    arrays, lists and single keys.
    """
    keys = host_array(keys)
    if isinstance(keys, (np.ndarray, np.generic)):
        arr = np.asarray(keys)
        kind = arr.dtype.kind
        if kind == "i":
            if arr.size and arr.min() < 0:
                raise InvalidArgumentError(
                    f"{what} must be >= 0, got {int(arr.min())}: a key is a uint64 (or an int64 "
                    "view of one, as shmreplay.torch yields); pass the keys a sample returned"
                )
            arr = arr.astype(np.uint64)
        elif kind == "u":
            arr = arr.astype(np.uint64, copy=False)
        elif arr.size == 0:
            arr = np.empty(0, np.uint64)
        else:
            raise InvalidArgumentError(
                f"{what} must be integers (uint64, or int64 >= 0), got an array of {arr.dtype}; "
                "pass the keys a sample returned"
            )
        return arr.reshape(-1)
    if any(isinstance(k, float) for k in (keys if isinstance(keys, (list, tuple)) else [keys])):
        # uint64 conversion would truncate 1.5 to the key 1 (an unrelated item)
        raise InvalidArgumentError(
            f"{what} must be non-negative integers (uint64 keys), got {keys!r}; "
            "pass the keys a sample returned"
        )
    try:
        return np.asarray(keys, dtype=np.uint64).reshape(-1)
    except (OverflowError, TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"{what} must be non-negative integers (uint64 keys), got {keys!r}: {exc}"
        ) from None
