"""The control socket protocol: length-prefixed msgpack requests and responses over a unix socket.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. A request is a map
with an ``op`` key (``hello``, ``bye``, ``info``, ``set_rate_limiter``, ``reset``,
``checkpoint``, ``shutdown``) and an integer ``id``; a response is a map with ``ok``, the ``id``
of the request it answers and, when ``ok`` is false, ``error`` (the message) and ``type`` (the
exception class name). A long operation (``checkpoint``; ``shutdown`` with ``follow``) sends
progress frames ``{"id": ..., "progress": {"line": ..., "done": ..., "total": ...}}`` before
(or, for ``shutdown``, after) its response. The ids let a client that gave up waiting for one
reply recognise it when it comes late, and discard it instead of taking it for the next one.
A response without ``id`` is the daemon refusing the whole connection (not allowed, out of
descriptors).

Version 2 added the ids and progress frames.
"""

from __future__ import annotations

import itertools
import socket
import struct
import time
from collections.abc import Callable

import msgpack

from . import errors
from .errors import DaemonBusy, DaemonNotRunning, ShmReplayError

# Requests are small (the largest is a rate-limiter spec): the daemon closes a connection that
# announces a bigger frame. Replies (an info record of many tables) may be larger.
MAX_REQUEST = 64 << 10
MAX_FRAME = 16 << 20  # a reply bigger than this is a broken peer
_LEN = struct.Struct(">I")
PROTOCOL_VERSION = 2
DEFAULT_TIMEOUT_S = 10.0
# During a long operation the daemon sends a progress frame every second or so: this long
# without one means it stopped answering (stopped, stuck), whatever the overall timeout.
NO_NEWS_S = 15.0


def encode(obj: dict) -> bytes:
    body = msgpack.packb(obj)
    return _LEN.pack(len(body)) + body


def recv(sock: socket.socket) -> dict:
    """One frame from a blocking socket (for tests and simple tools)."""
    buf = bytearray()
    while True:
        frame = _take_frame(buf)
        if frame is not None:
            return frame
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk


def _take_frame(buf: bytearray) -> dict | None:
    if len(buf) < 4:
        return None
    (n,) = _LEN.unpack_from(buf)
    if n > MAX_FRAME:
        raise ConnectionError(f"frame of {n} bytes exceeds the {MAX_FRAME} byte limit")
    if len(buf) < 4 + n:
        return None
    body = bytes(buf[4 : 4 + n])
    del buf[: 4 + n]
    return msgpack.unpackb(body)


class ControlClient:
    """A connection to a daemon's control socket. Not thread-safe.

    ``timeout`` bounds connecting and, by default, each :meth:`request`. A request that times
    out raises :class:`DaemonBusy` and leaves the connection usable: its late reply is
    discarded when it comes."""

    sock: socket.socket | None = None

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        from .engine.ownership import access_denied, is_out_of_descriptors, out_of_descriptors

        self.path = path
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._buf = bytearray()
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            if is_out_of_descriptors(exc):
                raise out_of_descriptors(f"connecting to the daemon's socket {path}") from None
            raise
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except PermissionError:
            sock.close()
            raise access_denied(path, "the daemon's control socket") from None
        except TimeoutError:
            sock.close()
            raise DaemonBusy(
                f"the daemon's control socket {path} did not accept a connection within "
                f"{timeout} s: the daemon is alive but not answering (stopped, or overloaded)"
            ) from None
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def request(
        self,
        op: str,
        *,
        timeout: float | None | type[Ellipsis] = ...,
        progress: Callable[[dict], None] | None = None,
        **args,
    ) -> dict:
        """Send one request and wait for its reply: at most ``timeout`` seconds (default: the
        connection's; None: as long as the daemon keeps answering, see NO_NEWS_S). Progress
        frames of this request go to ``progress``. Raises the error class the daemon names,
        :class:`DaemonBusy` on a timeout, :class:`DaemonNotRunning` if the connection is lost."""
        if self.sock is None:
            raise DaemonNotRunning("the control connection is closed")
        if timeout is ...:
            timeout = self.timeout
        rid = next(self._ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(encode({"op": op, "id": rid, **args}))
        except TimeoutError:
            raise self._busy(op, timeout) from None
        except OSError:
            # The daemon may have refused the connection with a reply (not allowed, out of
            # descriptors) and closed it before our request went out: read that reply.
            pass
        # A long operation (or no time limit) relies on the daemon's news every second or so.
        heartbeats = progress is not None or timeout is None
        while True:
            frame = self._next_frame(op, deadline, timeout, heartbeats)
            if "ok" not in frame:
                if frame.get("id") == rid and progress is not None and "progress" in frame:
                    progress(frame["progress"])
                continue
            if frame.get("id", rid) != rid:
                continue  # the late reply of a request we gave up on
            break
        if not frame.get("ok"):
            cls = getattr(errors, str(frame.get("type")), None)
            if not (isinstance(cls, type) and issubclass(cls, ShmReplayError)):
                cls = ShmReplayError
            exc = cls(frame.get("error", "the daemon refused the request"))
            exc.reply = frame  # type: ignore[attr-defined]  # e.g. a restoring daemon's progress
            raise exc
        return frame

    def follow(self, progress: Callable[[dict], None] | None, timeout: float | None) -> None:
        """After ``shutdown`` with ``follow=True``: pass progress frames to ``progress`` until
        the daemon closes the connection (it is exiting), at most ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                frame = self._next_frame("shutdown", deadline, timeout, True)
            except DaemonNotRunning:
                return  # EOF: the daemon is gone, or about to be
            if "progress" in frame and progress is not None:
                progress(frame["progress"])

    def _next_frame(
        self, op: str, deadline: float | None, timeout: float | None, heartbeats: bool
    ) -> dict:
        assert self.sock is not None
        while True:
            try:
                frame = _take_frame(self._buf)
            except ConnectionError as exc:
                raise DaemonNotRunning(f"lost the control connection to the daemon: {exc}") from exc
            if frame is not None:
                return frame
            wait = None if deadline is None else deadline - time.monotonic()
            if heartbeats:  # a long operation: the daemon sends news every second or so
                wait = NO_NEWS_S if wait is None else min(wait, NO_NEWS_S)
            if wait is not None and wait <= 0:
                raise self._busy(op, timeout)
            try:
                self.sock.settimeout(wait)
                chunk = self.sock.recv(65536)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._busy(op, timeout) from None
                raise DaemonBusy(
                    f"the daemon sent no news of {op!r} for {NO_NEWS_S:.0f} s: it is alive "
                    "but not answering (stopped, or stuck)"
                ) from None
            except OSError as exc:
                raise DaemonNotRunning(f"lost the control connection to the daemon: {exc}") from exc
            if not chunk:
                raise DaemonNotRunning(
                    "lost the control connection to the daemon: connection closed"
                )
            self._buf += chunk

    def _busy(self, op: str, timeout: float | None) -> DaemonBusy:
        return DaemonBusy(
            f"the daemon did not answer {op!r} within {timeout} s: it is alive but busy or "
            "not answering (a long checkpoint or restore, a stopped process) and may still carry "
            "the request out; try again, or pass a longer timeout"
        )

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
