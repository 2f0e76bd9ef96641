"""Selectors: how a table picks items to sample and to evict. One family per module."""

from __future__ import annotations

from .base import Selector
from .fifo import Fifo
from .heap import MaxHeap, MinHeap
from .lifo import Lifo
from .prioritized import Prioritized
from .uniform import Uniform

_SELECTORS: dict[str, type[Selector]] = {
    cls.kind: cls for cls in (Uniform, Prioritized, Fifo, Lifo, MinHeap, MaxHeap)
}


def selector_class(kind: str) -> type[Selector]:
    """The selector implementing ``kind``; raises ConfigError for a kind not built yet."""
    try:
        return _SELECTORS[kind]
    except KeyError:
        from ...errors import ConfigError

        raise ConfigError(
            f"selector kind {kind!r} is not implemented yet; available: {', '.join(_SELECTORS)}"
        ) from None


__all__ = [
    "Selector",
    "selector_class",
    "Uniform",
    "Prioritized",
    "Fifo",
    "Lifo",
    "MinHeap",
    "MaxHeap",
]
