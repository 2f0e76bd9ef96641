"""The daemon: one process per instance, owner of the tables' shared memory.

- :mod:`.lifecycle`: :class:`Daemon`: start-up (allocation or adoption, restore), the main
  loop, shutdown and cleanup; ``serve``.
- :mod:`.adoption`: the instance lock, and what a dead daemon of the instance left in /dev/shm.
- :mod:`.commit_loop`: the commit loop over every table: drain, commit, lease, wake, nap;
  quarantine of a table that cannot go on.
- :mod:`.clients`: attached clients: channels, liveness, reclaim of a dead client's slots,
  cut-off of a client that wrote nonsense, who may connect.
- :mod:`.control_server`: the control socket's thread (hello, bye, info, checkpoint, stop...).
- :mod:`.checkpoint`: writing, reading and restoring checkpoints.
- :mod:`.metrics`: the Prometheus endpoint. :mod:`.notify`: systemd's notify protocol.
- :mod:`.server`: :class:`Server`, which starts and stops a daemon process from Python.

The daemon works on the segments through ``shmreplay.engine`` and never imports the client side.
"""
