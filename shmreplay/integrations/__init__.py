"""Integrations with other libraries, each importable on its own (none is imported here, so
that a missing optional dependency costs nothing until it is used):

- :mod:`.torch` (public path ``shmreplay.torch``): an IterableDataset and a pinned-memory iterator.
- :mod:`.jax` (``shmreplay.jax``): batches as device arrays.
- :mod:`.reverb` (``shmreplay.compat.reverb``): DeepMind Reverb's Python API over shmreplay.
"""
