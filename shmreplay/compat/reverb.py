"""The public path of :mod:`shmreplay.integrations.reverb` (this name is that module)."""

import sys

from ..integrations import reverb as _implementation

sys.modules[__name__] = _implementation
