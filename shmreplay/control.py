"""The control socket protocol: length-prefixed msgpack requests and responses over a unix socket.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. A request is a map
with an ``op`` key (``hello``, ``info``, ``set_rate_limiter``, ``shutdown``, ``bye``); a response
is a map with ``ok`` and, when ``ok`` is false, ``error`` (the message) and ``type`` (the
exception class name).
"""

from __future__ import annotations

import socket
import struct

import msgpack

from . import errors
from .errors import DaemonNotRunning, ShmReplayError

MAX_FRAME = 1 << 20  # requests are small; a bigger length is a broken or hostile peer
_LEN = struct.Struct(">I")
PROTOCOL_VERSION = 1


def encode(obj: dict) -> bytes:
    body = msgpack.packb(obj)
    return _LEN.pack(len(body)) + body


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket) -> dict:
    (n,) = _LEN.unpack(_recv_exact(sock, 4))
    if n > MAX_FRAME:
        raise ConnectionError(f"frame of {n} bytes exceeds the {MAX_FRAME} byte limit")
    return msgpack.unpackb(_recv_exact(sock, n))


class ControlClient:
    """A connection to a daemon's control socket. Not thread-safe."""

    sock: socket.socket | None = None

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        from .instance import access_denied, is_out_of_descriptors, out_of_descriptors

        self.path = path
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
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def request(self, op: str, **args) -> dict:
        if self.sock is None:
            raise DaemonNotRunning("the control connection is closed")
        try:
            try:
                self.sock.sendall(encode({"op": op, **args}))
            except OSError:
                # The daemon may have refused the connection with a reply (not allowed, out of
                # descriptors) and closed it before our request went out: read that reply.
                pass
            reply = recv(self.sock)
        except (OSError, ConnectionError) as exc:
            raise DaemonNotRunning(f"lost the control connection to the daemon: {exc}") from exc
        if not reply.get("ok"):
            cls = getattr(errors, str(reply.get("type")), None)
            if not (isinstance(cls, type) and issubclass(cls, ShmReplayError)):
                cls = ShmReplayError
            raise cls(reply.get("error", "the daemon refused the request"))
        return reply

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
