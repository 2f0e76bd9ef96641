"""The rules for values users hand in: priorities, keys, and Python numbers in typed fields.

Shared by the client's insert paths and the trajectory writer, so both accept and refuse the
same things with the same words. Tensors of learning frameworks (torch, JAX) are read by duck
typing, so that this module, and the client, import neither.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InvalidArgumentError


def check_priority(priority: object) -> float:
    """A priority as a float; InvalidArgumentError unless it is a finite number ≥ 0."""
    try:
        value = float(priority)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"priority must be a number, got {priority!r}") from None
    if not 0.0 <= value < math.inf:  # also refuses NaN
        raise InvalidArgumentError(f"priority must be finite and >= 0, got {value}")
    return value


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
