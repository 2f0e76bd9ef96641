"""The public path of :mod:`shmreplay.integrations.jax` (this name is that module)."""

import sys

from .integrations import jax as _implementation

sys.modules[__name__] = _implementation
