"""The shared-memory engine: the compiled core every process runs on a table segment.

``shmreplay.engine._native`` is a C11 extension built by ``pip install .`` from ``csrc/``:
plain C files hold the logic (sum-tree, selectors, ring publication, the sample copy), one
``bind_*.c`` per concern holds its thin CPython binding, and ``module.c`` puts them in one
module. There is no pure-Python fallback: one implementation runs, and the numpy code it
replaced lives on in ``tests/reference`` as the model the differential tests hold it to.

Every cross-process publication in the C code is a C11 store-release matched by a load-acquire
(``csrc/shm_atomics.h``); the protocol, who writes what in which order, is written down in
docs/memory-ordering.md.
"""

from __future__ import annotations

try:
    from . import _native
except ImportError as exc:  # an install without its compiled part
    raise ImportError(
        "shmreplay's compiled engine (shmreplay.engine._native) is missing or does not load "
        f"({exc}); install shmreplay with pip from its source tree (`python3 -m pip install .`, "
        "or `-e .` for a checkout), which compiles it and needs a C compiler (gcc or clang) and "
        "the Python headers (e.g. apt install build-essential python3-dev)"
    ) from exc

__all__ = ["_native"]
