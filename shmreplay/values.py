"""The rules for values users hand in: priorities, and Python numbers stored in typed fields.

Shared by the client's insert paths and the trajectory writer, so both accept and refuse the
same things with the same words.
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
