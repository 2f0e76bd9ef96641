"""The daemon's control server: every control connection served at once, none able to stall it.

One I/O thread runs a selector over the listening socket and every connection, and does only
non-blocking I/O: each connection has its own input and output buffer, both capped, so a peer
that sends slowly or never reads costs only its own connection (and at most a few hundred KiB of
the daemon's memory). Requests answered from memory (``hello``, ``bye``, ``shutdown``) are
handled on that thread; requests that may wait (``info``, ``reset`` and ``set_rate_limiter``,
which take a table lock, bounded by CONTROL_LOCK_TIMEOUT_S) run on a small worker pool, and
``checkpoint`` on a thread of its own; their replies are queued back to the I/O thread.

Every request carries an ``id`` that its reply echoes (see :mod:`shmreplay.control`), so a
client that gave up on a request discards its late reply. A long operation (checkpoint, the
final checkpoint of a ``shutdown``) sends progress frames ``{"id", "progress": {...}}`` to the
connections waiting on it, at least every HEARTBEAT_S, until its reply.

What a connection may do, and what closes it::

    connected ──first frame within FIRST_FRAME_S──> requests <──> replies ... ──EOF──> closed
       │          a partial frame must complete within FRAME_S; a frame > MAX_REQUEST,
       │          or more than MAX_OUTPUT bytes of replies the peer does not read: closed
       └── not a client (no hello) and idle for IDLE_S: closed

An attached client's connection is idle for hours, legitimately: its EOF is how the daemon
learns that the client died, so it is never closed for being idle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from ..control import MAX_REQUEST, PROTOCOL_VERSION, encode
from ..engine.instance import TABLE_EVENTS, event_name, segment_name
from ..engine.layout import FORMAT_VERSION
from ..errors import DaemonBusy, InvalidArgumentError, ShmReplayError
from .clients import ACCEPT_PAUSE_S

if TYPE_CHECKING:
    from .lifecycle import Daemon

log = logging.getLogger("shmreplay")

# A connection must send its first complete frame this soon after connecting, and finish a
# frame it has begun this soon: a real client sends a request of a few hundred bytes at once.
FIRST_FRAME_S = 5.0
FRAME_S = 5.0
# A connection that never said hello (a CLI command, a monitoring script) and has nothing in
# flight is closed after this long without a request: it is holding a descriptor for nothing.
IDLE_S = 60.0
# Replies waiting for a peer to read them: past OUTPUT_PAUSE its further requests wait (unread,
# in its own socket buffer); past MAX_OUTPUT, or with nothing read for FRAME_S, the peer is
# broken or hostile and its connection is closed.
OUTPUT_PAUSE = 64 << 10
MAX_OUTPUT = 1 << 20
# Requests of one connection being served at once; further frames wait in its (capped) input.
MAX_IN_FLIGHT = 4
# A control request waits this long at most for a table lock (a client stopped while holding
# it cannot be told from a slow one): then it answers LockTimeout naming the holder's pid.
CONTROL_LOCK_TIMEOUT_S = 1.0
WORKERS = 4  # info/reset/set_rate_limiter run here, each waiting at most CONTROL_LOCK_TIMEOUT_S
HEARTBEAT_S = 1.0  # a waiting client hears at least this often that a long operation goes on
TICK_S = 0.2  # the I/O loop's longest sleep: timeouts and heartbeats are checked this often
_LEN = struct.Struct(">I")
RECV_BYTES = 65536


@dataclass(eq=False)
class Connection:
    """One peer of the control socket, as the I/O thread sees it."""

    sock: socket.socket
    opened: float
    pid: int = 0  # the peer's pid (SO_PEERCRED), for the log
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    partial_since: float | None = None  # when the frame now in inbuf began
    last_request: float | None = None
    in_flight: int = 0
    channel: int | None = None  # set once the peer said hello: an attached client
    watching: set[int] = field(default_factory=set)  # request ids waiting on a long operation
    last_sent: float = 0.0
    closed: bool = False
    events: int = 0  # what the selector watches now


class ControlServer:
    """Serves ``daemon``'s control socket from the thread that calls :meth:`serve` until the
    daemon's listener is closed (``Daemon.cleanup``). Thread-safe entry points for other
    threads: :meth:`progress` (a line of a long operation) and :meth:`reply`."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.sel = selectors.DefaultSelector()
        self.conns: dict[socket.socket, Connection] = {}
        self._replies: queue.SimpleQueue[tuple[Connection, dict, bool]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pool = _Workers(WORKERS, "control-worker")
        self._ckpt_pool = _Workers(1, "checkpoint")
        self._ckpt_lock = threading.Lock()
        self._ckpt_waiting: list[tuple[Connection, int | None]] = []
        self._progress: dict | None = None  # the latest progress of a long operation
        self._progress_lock = threading.Lock()
        self._listening = False
        self._paused_until = 0.0

    # -- thread-safe entry points ---------------------------------------------------------------

    def progress(self, update: dict) -> None:
        """Record the latest progress of a long operation (restore, checkpoint) and send it to
        every connection waiting on one. Never blocks."""
        with self._progress_lock:
            self._progress = update
        self._replies.put((None, {"progress": update}, False))  # type: ignore[arg-type]
        self._wake()

    def latest_progress(self) -> dict | None:
        with self._progress_lock:
            return self._progress

    def reply(self, conn: Connection, reply: dict, done: bool = True) -> None:
        """Queue ``reply`` for ``conn`` (sent by the I/O thread; dropped if it has closed)."""
        self._replies.put((conn, reply, done))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: the I/O thread is awake already
            self._wake_w.send(b"\0")

    # -- the I/O loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        """Run the I/O loop until the daemon's listener is closed."""
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listen()
        try:
            while self.daemon._listener is not None:
                try:
                    self._iterate()
                except Exception:
                    # A bug here must not end the control server: every attached client would
                    # look disconnected. Log it and serve on.
                    if self.daemon._listener is None:
                        break
                    log.exception("control server: unexpected error; serving on")
                    time.sleep(TICK_S)
        finally:
            for conn in list(self.conns.values()):
                self._close(conn, None)
            self._pool.shutdown()
            self._ckpt_pool.shutdown()
            self.sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _iterate(self) -> None:
        if self._paused_until and time.monotonic() >= self._paused_until:
            self._paused_until = 0.0
            self._listen()
        for key, mask in self.sel.select(timeout=TICK_S):
            if key.data == "wake":
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            elif key.data == "listener":
                self._accept()
            else:
                conn: Connection = key.data
                try:
                    if mask & selectors.EVENT_READ and not conn.closed:
                        self._read(conn)
                    if mask & selectors.EVENT_WRITE and not conn.closed:
                        self._flush(conn)
                        if not conn.closed and conn.inbuf:
                            self._parse(conn)  # requests that waited for the peer to read
                except Exception:
                    log.exception(
                        "control connection of pid %d: unexpected error; closing it", conn.pid
                    )
                    self._close(conn, "its control connection failed")
        self._deliver()
        self._check_timeouts()

    def _listen(self) -> None:
        listener = self.daemon._listener
        if listener is not None and not self._listening:
            self.sel.register(listener, selectors.EVENT_READ, "listener")
            self._listening = True

    def _accept(self) -> None:
        sock, starved = self.daemon.clients.accept(self.daemon._listener)
        if starved:
            # Not even a descriptor to refuse with: the connection waits in the backlog; do
            # not spin on a listener that stays readable.
            self.sel.unregister(self.daemon._listener)
            self._listening = False
            self._paused_until = time.monotonic() + ACCEPT_PAUSE_S
        if sock is None:
            return
        sock.setblocking(False)
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0]
        except OSError:
            pid = 0
        conn = Connection(sock, time.monotonic(), pid)
        self.conns[sock] = conn
        self._watch(conn)

    def _watch(self, conn: Connection) -> None:
        """Have the selector watch what ``conn`` needs: reading while it may send requests,
        writing while replies wait for room in its socket."""
        events = 0
        if conn.in_flight < MAX_IN_FLIGHT and len(conn.inbuf) < MAX_REQUEST + 4:
            events |= selectors.EVENT_READ
        if conn.outbuf:
            events |= selectors.EVENT_WRITE
        if events == conn.events:
            return
        if conn.events == 0:
            self.sel.register(conn.sock, events, conn)
        elif events == 0:
            self.sel.unregister(conn.sock)
        else:
            self.sel.modify(conn.sock, events, conn)
        conn.events = events

    def _read(self, conn: Connection) -> None:
        try:
            chunk = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn, "disconnected without saying bye")
            return
        if not chunk:
            self._close(conn, "disconnected without saying bye")
            return
        if not conn.inbuf:
            conn.partial_since = time.monotonic()
        conn.inbuf += chunk
        self._parse(conn)

    def _parse(self, conn: Connection) -> None:
        """Handle the complete frames in ``conn``'s input, as many as it may have in flight."""
        buf = conn.inbuf
        while (
            len(buf) >= 4
            and conn.in_flight < MAX_IN_FLIGHT
            and len(conn.outbuf) < OUTPUT_PAUSE
            and not conn.closed
        ):
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_REQUEST:
                log.warning(
                    "closing the control connection of pid %d: it sent a %d-byte frame "
                    "(requests are at most %d bytes)",
                    conn.pid,
                    n,
                    MAX_REQUEST,
                )
                self._close(conn, "sent an oversized request")
                return
            if len(buf) < 4 + n:
                break
            body = bytes(buf[4 : 4 + n])
            del buf[: 4 + n]
            conn.partial_since = time.monotonic() if buf else None
            conn.last_request = time.monotonic()
            self._dispatch(conn, body)
        if not conn.closed:
            self._watch(conn)

    def _dispatch(self, conn: Connection, body: bytes) -> None:
        rid: Any = None
        try:
            req = msgpack.unpackb(body)
            if not isinstance(req, dict):
                raise ValueError("a request must be a map")
            rid = req.get("id")
            if rid is not None and not isinstance(rid, int):
                raise ValueError("a request id must be an integer")
            op = req.get("op")
            if (
                op in ("reset", "set_rate_limiter", "checkpoint")
                and self.daemon.state == "restoring"
            ):
                # The tables are being filled: a checkpoint now would save them half-restored
                # (and prune the one being restored), a reset would race the restore.
                raise DaemonBusy(
                    f"the daemon of instance {self.daemon.name!r} is restoring a checkpoint; ask "
                    f"for {op} again once `shmreplay info --name {self.daemon.name}` says serving"
                )
            if op in ("info", "reset", "set_rate_limiter"):
                conn.in_flight += 1
                self._pool.submit(self._run, conn, rid, op, req)
                return
            if op == "checkpoint":
                conn.in_flight += 1
                conn.watching.add(rid)
                with self._ckpt_lock:
                    self._ckpt_waiting.append((conn, rid))
                self._ckpt_pool.submit(self._run_checkpoints)
                return
            reply = self._quick(conn, op, req)
        except ShmReplayError as exc:
            reply = _error(type(exc).__name__, str(exc))
        except Exception as exc:  # a malformed request must never take the daemon down
            reply = _error("InvalidArgumentError", f"malformed request: {exc}")
        self._send(conn, _with_id(reply, rid))

    def _quick(self, conn: Connection, op: object, req: dict) -> dict:
        """The requests answered from memory, on the I/O thread."""
        d = self.daemon
        if op == "hello":
            if req.get("protocol") != PROTOCOL_VERSION:
                return _error(
                    "FormatVersionError",
                    f"client speaks control protocol {req.get('protocol')}, the daemon "
                    f"{PROTOCOL_VERSION}; use the same shmreplay version on both sides",
                )
            state = d.state
            if state != "serving":
                return _not_serving(d, state, self.latest_progress())
            if conn.channel is not None:
                return {"ok": True, "channel": conn.channel, "tables": list(d.tables)}
            pid = req.get("pid")
            if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 1 << 31:
                raise InvalidArgumentError(f"hello: pid must be a process id, not {pid!r}")
            c = conn.channel = d.clients.register(pid, conn.sock)
            return {
                "ok": True,
                "channel": c,
                "tables": {n: segment_name(d.name, n) for n in d.tables},
                "events": {
                    n: {k: event_name(d.name, n, k) for k in TABLE_EVENTS} for n in d.tables
                },
                "wake": event_name(d.name, None, "daemon"),
                "pid": os.getpid(),
                "format_version": FORMAT_VERSION,
            }
        if op == "bye":
            self._client_gone(conn, "detached")
            return {"ok": True}
        if op == "shutdown":
            if not d._stop.is_set():
                log.info("shutdown requested over the control socket (pid %d)", conn.pid)
                d.request_stop()
            if req.get("follow"):
                # The final checkpoint's progress goes to this connection, then its EOF.
                conn.watching.add(req.get("id"))
            return {"ok": True, "final_checkpoint": d.config.server.checkpoint_dir is not None}
        return _error("InvalidArgumentError", f"unknown request op {op!r}")

    def _run(self, conn: Connection, rid: int | None, op: str, req: dict) -> None:
        """A request that may wait, on a worker thread."""
        d = self.daemon
        try:
            if op == "info":
                reply = {"ok": True, **d.info()}
            elif op == "reset":
                name = req.get("table")
                d._table(name).core.reset(timeout=CONTROL_LOCK_TIMEOUT_S)
                log.info("table %r reset over the control socket (pid %d)", name, conn.pid)
                reply = {"ok": True}
            else:
                reply = {"ok": True, "rate_limiter": d.set_rate_limiter(req)}
        except ShmReplayError as exc:
            reply = _error(type(exc).__name__, str(exc))
        except Exception as exc:
            log.exception("control request %r failed", op)
            reply = _error("InvalidArgumentError", f"malformed request: {exc}")
        self.reply(conn, _with_id(reply, rid))

    def _run_checkpoints(self) -> None:
        """One checkpoint for every request waiting when it starts (they all asked for one
        taken after their request: this one is)."""
        with self._ckpt_lock:
            batch, self._ckpt_waiting = self._ckpt_waiting, []
        if not batch:
            return
        try:
            reply = {"ok": True, "checkpoint": self.daemon.checkpoint()}
        except ShmReplayError as exc:
            reply = _error(type(exc).__name__, str(exc))
        except Exception as exc:
            log.exception("checkpoint failed")
            reply = _error("CheckpointError", f"checkpoint failed: {exc}")
        for conn, rid in batch:
            self.reply(conn, _with_id(reply, rid))

    def _deliver(self) -> None:
        """Send what the worker threads queued: replies, and progress to the watchers."""
        while True:
            try:
                conn, reply, done = self._replies.get_nowait()
            except queue.Empty:
                return
            if conn is None:  # progress: to every connection waiting on a long operation
                for c in list(self.conns.values()):
                    for rid in list(c.watching):
                        self._send(c, {"id": rid, **reply})
                continue
            if conn.closed:
                continue
            rid = reply.get("id")
            if done:
                conn.in_flight -= 1
                conn.watching.discard(rid)
            self._send(conn, reply)
            if done and not conn.closed:
                self._parse(conn)  # frames that waited for a free place in flight

    def _send(self, conn: Connection, reply: dict) -> None:
        if conn.closed:
            return
        if not conn.outbuf:
            conn.last_sent = time.monotonic()  # the clock of a peer not reading starts now
        conn.outbuf += encode(reply)
        if len(conn.outbuf) > MAX_OUTPUT:
            log.warning(
                "closing the control connection of pid %d: it does not read its replies "
                "(%d bytes waiting)",
                conn.pid,
                len(conn.outbuf),
            )
            self._close(conn, "stopped reading its control connection")
            return
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn, "disconnected without saying bye")
            return
        if sent:
            del conn.outbuf[:sent]
            conn.last_sent = time.monotonic()
        self._watch(conn)

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        latest = None
        for conn in list(self.conns.values()):
            if conn.closed:
                continue
            why = None
            if conn.outbuf and now - conn.last_sent > FRAME_S:
                log.warning(
                    "closing the control connection of pid %d: it does not read its replies "
                    "(%d bytes waiting for %.0f s)",
                    conn.pid,
                    len(conn.outbuf),
                    now - conn.last_sent,
                )
                self._close(conn, "stopped reading its control connection")
                continue
            if (
                conn.partial_since is not None
                and now - conn.partial_since > FRAME_S
                and not _has_frame(conn.inbuf)  # not a request waiting for its turn
            ):
                why = f"a request frame begun {FRAME_S:.0f} s ago is still incomplete"
            elif conn.last_request is None and now - conn.opened > FIRST_FRAME_S:
                why = f"no request within {FIRST_FRAME_S:.0f} s of connecting"
            elif (
                conn.channel is None
                and conn.in_flight == 0
                and not conn.watching  # following a long operation (stop's final checkpoint)
                and conn.last_request is not None
                and now - conn.last_request > IDLE_S
            ):
                why = f"idle for {IDLE_S:.0f} s without being an attached client"
            if why is not None:
                log.info("closing the control connection of pid %d: %s", conn.pid, why)
                self._close(conn, why)
                continue
            if conn.watching and now - conn.last_sent >= HEARTBEAT_S:
                if latest is None:
                    latest = self.latest_progress() or {"line": "working"}
                for rid in list(conn.watching):
                    self._send(conn, {"id": rid, "progress": latest})

    def _close(self, conn: Connection, reason: str | None) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.sel.unregister(conn.sock)
        self.conns.pop(conn.sock, None)
        self._client_gone(conn, reason or "disconnected without saying bye")
        conn.sock.close()

    def _client_gone(self, conn: Connection, reason: str) -> None:
        """The commit loop reclaims what an attached client held (see Clients.reclaim)."""
        c, conn.channel = conn.channel, None
        if c is not None:
            self.daemon.clients.gone(c, reason)


class _Workers:
    """A few daemon threads running submitted calls in order. Not concurrent.futures: its
    threads are joined at exit, and one waiting on a stopped client's lock (a checkpoint) would
    keep the daemon from exiting."""

    def __init__(self, n: int, name: str) -> None:
        self.n, self.name = n, name
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        if len(self.threads) < self.n:  # started on demand: most daemons never need them all
            t = threading.Thread(
                target=self._run, name=f"{self.name}-{len(self.threads)}", daemon=True
            )
            self.threads.append(t)
            t.start()
        self.q.put((fn, args))

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("control server: %s failed", self.name)

    def shutdown(self) -> None:
        for _ in self.threads:
            self.q.put(None)


def _has_frame(buf: bytearray) -> bool:
    """Whether ``buf`` starts with a complete frame."""
    return len(buf) >= 4 and len(buf) >= 4 + _LEN.unpack_from(buf)[0]


def _error(kind: str, message: str, **extra: Any) -> dict:
    return {"ok": False, "type": kind, "error": message, **extra}


def _with_id(reply: dict, rid: int | None) -> dict:
    return reply if rid is None else {**reply, "id": rid}


def _not_serving(d: Daemon, state: str, progress: dict | None) -> dict:
    """The answer to a hello while the daemon is restoring a checkpoint or shutting down."""
    if state == "restoring":
        where = f" ({progress['line']})" if progress else ""
        return _error(
            "DaemonBusy",
            f"the shmreplay daemon of instance {d.name!r} (pid {os.getpid()}) is restoring a "
            f"checkpoint{where}; attach with a longer timeout, or follow it with "
            f"shmreplay info --name {d.name}",
            state=state,
            progress=progress,
        )
    return _error(
        "DaemonNotRunning",
        f"the shmreplay daemon of instance {d.name!r} (pid {os.getpid()}) is {state}; start "
        f"one with: shmreplay serve --tables tables.toml --name {d.name}",
        state=state,
    )


def progress_update(line: str) -> dict:
    """A progress frame's body from a checkpoint or restore line: the line, and ``done`` and
    ``total`` when it counts items (``... 500/1000 items ...``), for a progress bar."""
    import re

    update: dict[str, Any] = {"line": line, "time": time.time()}
    m = re.search(r"(\d+)/(\d+) items", line)
    if m:
        update["done"], update["total"] = int(m.group(1)), int(m.group(2))
    return update
