"""The client side: what actors and learners run in their own processes.

- :mod:`.client`: :func:`attach` and :class:`Client` (the control connection, the table handles),
  :class:`Table` (insert, reserve, sample, update priorities), :class:`ReservedSlot`.
- :mod:`.trajectory`: :class:`TrajectoryWriter`, Reverb's trajectory writer over a table.
- :mod:`.adders`: the n-step transition adder.
- :mod:`.loader`: the prefetching iterator behind ``Table.as_iterator`` and the integrations.

The client side maps the tables' segments (``shmreplay.engine``) and never imports the daemon.
"""

from .client import Client, ReservedSlot, Table, attach

__all__ = ["Client", "ReservedSlot", "Table", "attach"]
