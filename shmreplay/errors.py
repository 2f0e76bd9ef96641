"""The exception tree of shmreplay.

Every error raised on purpose by this package derives from :class:`ShmReplayError`, and, where a
built-in exception means the same thing, from that built-in too, so ``except KeyError`` keeps
working for code that does not know about shmreplay::

    ShmReplayError
    ├── ConfigError              (ValueError)       tables.toml or a spec is invalid
    ├── SignatureError           (ValueError)       data does not match a table's signature
    ├── InvalidArgumentError     (ValueError)       a bad argument: NaN priority, batch size 0, ...
    ├── TableNotFoundError       (KeyError)         no table of that name in this instance
    ├── RateLimiterTimeout       (TimeoutError)     a blocked insert or sample ran out of time
    ├── LockTimeout              (TimeoutError)     a table lock stayed held past its timeout
    ├── DaemonNotRunning         (ConnectionError)  no daemon serves the instance, or it went away
    │   └── ClientCutOff                            ... for this client: it wrote a bad value
    ├── DaemonBusy               (TimeoutError)     the daemon is alive but did not answer in time
    ├── TableQuarantined         (RuntimeError)     the daemon stopped serving writes to a table
    ├── DaemonAlreadyRunning     (RuntimeError)     ``serve`` found a live daemon with that name
    ├── ClientClosedError        (RuntimeError)     a handle was used after ``close()``
    ├── SegmentError             (RuntimeError)     corrupt header or other format
    │   └── FormatVersionError                      ... written by another format version
    ├── InsufficientSharedMemory (MemoryError)      the tables do not fit in /dev/shm
    ├── MissingDependencyError   (ImportError)      an optional framework (torch, jax) is absent
    ├── CheckpointError          (RuntimeError)     a checkpoint cannot be written, read, restored
    ├── NotSupportedError        (NotImplementedError)  a feature shmreplay does not have (a
    │                                               Reverb feature in shmreplay.compat, ...)
    ├── PermissionDenied         (PermissionError)  an instance's file belongs to another user,
    │                                               or another user's object is in its way
    └── TooManyOpenFiles         (OSError)          a process ran out of file descriptors
"""

from __future__ import annotations

__all__ = [
    "ShmReplayError",
    "ConfigError",
    "SignatureError",
    "InvalidArgumentError",
    "TableNotFoundError",
    "RateLimiterTimeout",
    "LockTimeout",
    "DaemonNotRunning",
    "DaemonBusy",
    "DaemonAlreadyRunning",
    "ClientCutOff",
    "TableQuarantined",
    "ClientClosedError",
    "SegmentError",
    "FormatVersionError",
    "InsufficientSharedMemory",
    "MissingDependencyError",
    "CheckpointError",
    "NotSupportedError",
    "PermissionDenied",
    "TooManyOpenFiles",
]


class ShmReplayError(Exception):
    """Root of every error shmreplay raises on purpose."""


class ConfigError(ShmReplayError, ValueError):
    """A ``tables.toml`` file or a table spec is invalid.

    The message names the table, the key and what is allowed. Raised before any memory is
    allocated.
    """


class SignatureError(ShmReplayError, ValueError):
    """Data given to ``insert``/``reserve`` does not match the table's signature.

    The message names the field, what the table expects and what was given.
    """


class InvalidArgumentError(ShmReplayError, ValueError):
    """An argument is out of its domain: a NaN or negative priority, a batch size ≤ 0, ..."""


class TableNotFoundError(ShmReplayError, KeyError):
    """The instance has no table of that name; the message lists the tables it has."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the sentence as is.
        return str(self.args[0]) if self.args else ""


class RateLimiterTimeout(ShmReplayError, TimeoutError):
    """A blocked insert or sample did not become possible before its timeout.

    The message names the table and the side (insert or sample) that was blocked.

    ``keys`` (a uint64 array) holds the keys of the items a timed-out ``insert_batch`` had
    written before it gave up: the first ``len(keys)`` items of the batch, committed like any
    other insert, so that a retry sends only the rest (for ``Client.insert`` into several
    tables: the keys in the tables written before the one that timed out). It is empty when
    nothing was written and for every other call.
    """

    def __init__(self, *args: object, keys=None) -> None:
        super().__init__(*args)
        import numpy as np  # here, so that importing the error tree needs no numpy

        self.keys = np.empty(0, np.uint64) if keys is None else np.asarray(keys, np.uint64)


class LockTimeout(ShmReplayError, TimeoutError):
    """A table's lock stayed held by another live process for longer than allowed.

    The message names the pid that holds it (a stopped process, a debugger, ...).
    """


class DaemonNotRunning(ShmReplayError, ConnectionError):
    """No daemon serves the instance, or the daemon shut down while the call waited."""


class DaemonBusy(ShmReplayError, TimeoutError):
    """The daemon is alive but did not answer within the timeout: it is restoring a checkpoint
    (the message gives its progress), it is stopped (SIGSTOP, a debugger) or overloaded. Not
    :class:`DaemonNotRunning`: waiting longer, or looking at the daemon, is what helps."""


class ClientCutOff(DaemonNotRunning):
    """The daemon cut this client off: it wrote a value into the table's shared memory that
    makes no sense (a slot it does not hold, a ring position out of range, a priority that is
    not finite...). The daemon's log names its pid, channel and the value. Attach again."""


class TableQuarantined(ShmReplayError, RuntimeError):
    """The daemon stopped serving writes to a table that cannot go on (its lock is corrupt, or
    committing to it failed); the daemon's log says why. Samplers may still read it; it stays
    in /dev/shm, and restarting the daemon adopts it and repairs it."""


class DaemonAlreadyRunning(ShmReplayError, RuntimeError):
    """``shmreplay serve`` found a live daemon already serving the instance name."""


class ClientClosedError(ShmReplayError, RuntimeError):
    """A client or table handle was used after ``close()``."""


class SegmentError(ShmReplayError, RuntimeError):
    """A shared-memory segment is not a valid shmreplay table (bad magic, crc or layout)."""


class FormatVersionError(SegmentError):
    """A segment was written by a different shmreplay format version than this client's."""


class InsufficientSharedMemory(ShmReplayError, MemoryError):
    """The tables need more bytes than /dev/shm has free; the message gives both sizes."""


class MissingDependencyError(ShmReplayError, ImportError):
    """An optional framework is not installed: ``import shmreplay.torch`` without PyTorch, or
    ``shmreplay.jax`` without JAX. The message gives the command that installs it, e.g.
    ``pip install 'shmreplay[torch]'``."""


class CheckpointError(ShmReplayError, RuntimeError):
    """A checkpoint cannot be written, read or restored; the message says what to do."""


class NotSupportedError(ShmReplayError, NotImplementedError):
    """A feature shmreplay does not have, such as a Reverb feature that the compatibility layer
    (:mod:`shmreplay.compat.reverb`) cannot map: the message names it and what to do instead."""


class PermissionDenied(ShmReplayError, PermissionError):
    """This process may not open one of an instance's objects (its record, control socket,
    segments or semaphores): they belong to the daemon's user and, with ``[server] group``, to
    that group. The message names the object, its owner and mode, and who we are; run as the
    daemon's user, or set ``group`` in ``[server]`` and add this user to that group. Also
    raised by the daemon to a peer whose uid is not allowed (SO_PEERCRED)."""


class TooManyOpenFiles(ShmReplayError, OSError):
    """A process reached its limit of open file descriptors (``RLIMIT_NOFILE``): the client
    while attaching, or the daemon, which then refuses new connections until some close. The
    message gives the limit and what to do (``ulimit -n``, ``LimitNOFILE=``)."""
