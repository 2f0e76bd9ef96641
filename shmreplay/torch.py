"""The public path of :mod:`shmreplay.integrations.torch` (this name is that module)."""

import sys

from .integrations import torch as _implementation

sys.modules[__name__] = _implementation
