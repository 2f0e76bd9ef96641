"""Compatibility layers: other replay systems' APIs over shmreplay.

- :mod:`shmreplay.compat.reverb`: DeepMind Reverb's Python API for single-host programs;
  change ``import reverb`` to ``from shmreplay.compat import reverb`` (see
  ``docs/compat-reverb.md`` for what is supported).
"""

__all__ = ["reverb"]
