"""The daemon's clients: who is attached, on which channel, and what happens when one goes.

A client attaches over the control socket (:meth:`Clients.register`, in the control thread)
and gets a channel: its lines and rings in every table's segment. Its death is noticed by its
connection closing (:meth:`Clients.gone`) or by the liveness check (:meth:`Clients.check_alive`);
the main thread then commits what it published and frees the slots it held
(:meth:`Clients.reclaim`). A client that wrote nonsense where only it writes is cut off alone
(:meth:`Clients.cut_off`). Who may connect at all: :meth:`Clients.accept` (SO_PEERCRED, file
descriptors kept for the daemon's own work).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import resource
import socket
import struct
import threading
from dataclasses import dataclass

import numpy as np
import psutil

from ..config import Config
from ..control import encode
from ..engine.instance import process_alive
from ..engine.layout import Chan, Ctrl
from ..engine.ownership import is_out_of_descriptors
from ..errors import ShmReplayError
from .commit_loop import CommitLoop, ServedTable

log = logging.getLogger("shmreplay")

# Descriptors the daemon keeps free for its own work (a checkpoint opens a file per field at
# once, the lock file, directories to fsync; /proc reads; the metrics server): a connection
# that would eat into them is refused with TooManyOpenFiles instead.
FD_RESERVE = 32
ACCEPT_PAUSE_S = 0.1  # no descriptor even to refuse a connection: look again this much later


@dataclass
class AttachedClient:
    channel: int
    pid: int
    start_time: float | None
    conn: socket.socket | None = None
    # What it held was taken back (it died, or was cut off); its channel stays reserved until
    # the control thread reports its connection closed (see Clients.reclaim).
    reclaimed: bool = False
    leaving: bool = False  # the control thread reported its connection closed (bye, EOF)


class Clients:
    """The attached clients of an instance. ``register``, ``gone`` and ``accept`` run in the
    control thread; everything else in the main thread (the commit loop's)."""

    def __init__(
        self,
        config: Config,
        tables: dict[str, ServedTable],
        active: np.ndarray,
        loop: CommitLoop,
    ) -> None:
        self.config = config
        self.name = config.server.name
        self.max_clients = config.server.max_clients
        self.tables = tables
        self.active = active  # shared with the loop: which channels it reads
        self.loop = loop
        self._clients: dict[int, AttachedClient] = {}
        self.lock = threading.Lock()
        # Channels whose connection closed, for the main thread to reclaim (see gone()).
        self._departed: queue.Queue[tuple[int, str]] = queue.Queue()
        self._fd_refusing = False  # refusing connections for want of descriptors (logged once)

    def gone(self, channel: int, reason: str) -> None:
        """The control thread saw ``channel``'s connection close: list it no more, and have
        the main thread reclaim what it held (:meth:`reclaim`)."""
        with self.lock:
            client = self._clients.get(channel)
            if client is not None:
                client.leaving = True  # info() lists it no more, before its reclaim
        self._departed.put((channel, reason))
        self.loop.attend()  # the loop, in C, comes back to Python to reclaim it

    def reclaim_departed(self) -> None:
        """Reclaim every channel :meth:`gone` reported (main thread)."""
        while not self._departed.empty():
            self.reclaim(*self._departed.get())

    def attached(self) -> list[dict]:
        """Attached clients, for info(): not those that left, whose channel waits for its
        reclaim (marked leaving by the control thread before it answers their bye)."""
        with self.lock:
            return [
                {"pid": c.pid, "channel": c.channel}
                for c in self._clients.values()
                if not (c.reclaimed or c.leaving)
            ]

    def register(self, pid: int, conn: socket.socket) -> int:
        """Give a new client a channel (control thread). A channel is free again only once the
        previous client's connection was reported closed and its reclaim finished."""
        with self.lock:
            used = set(self._clients)
            free = [c for c in range(self.max_clients) if c not in used]
            if not free:
                raise ShmReplayError(
                    f"instance {self.name!r} already has {self.max_clients} clients attached; "
                    "raise max_clients in [server] or close unused clients"
                )
            c = free[0]
            try:
                start = psutil.Process(pid).create_time()
            except psutil.Error:
                start = None
            self._clients[c] = AttachedClient(c, pid, start, conn)
        for t in self.tables.values():
            if t.broken is None:  # (a quarantined table's channels wait for adoption)
                t.core.chan[c, :] = 0
            t.outstanding[c] = 0
            t.pub_head[c] = 0
            t.lease_tail[c] = 0
            t.core.chan[c, Chan.PID] = pid
        self.active[c] = True  # last: the commit loop reads the channel from now on
        self.loop.attend()  # the loop in C copies the active channels at each call
        log.info("client pid %d attached (channel %d)", pid, c)
        return c

    def check_alive(self) -> None:
        with self.lock:
            clients = [c for c in self._clients.values() if not c.reclaimed]
        for cl in clients:
            if not process_alive(cl.pid, cl.start_time):
                self._take_back(cl, "died")
                # Its connection reports the death too, unless a child inherited it: close it
                # on our side so that the control thread frees the channel either way.
                shutdown_connection(cl.conn)

    def reclaim(self, channel: int, reason: str = "disconnected") -> None:
        """The control thread reported ``channel``'s connection closed (once per attach): take
        back what its client held, if not done already, and free the channel."""
        with self.lock:
            client = self._clients.get(channel)
        if client is None:
            return
        if not client.reclaimed:
            self._take_back(client, reason)
        with self.lock:
            self._clients.pop(channel, None)  # last: _register may hand the channel out now

    def _take_back(self, client: AttachedClient, reason: str) -> None:
        """Commit what a departed client published, then free the slots it still held."""
        channel = client.channel
        for t in self.tables.values():
            self.loop.service(t)  # commit what it published before it went away: nothing is lost
        self.active[channel] = False
        client.reclaimed = True
        freed = self._free_channel(channel)
        log.info(
            "client pid %d (channel %d) %s; %d unused leased slot(s) returned",
            client.pid,
            channel,
            reason,
            freed,
        )

    def _free_channel(self, channel: int) -> int:
        """Free every slot leased to (or being released by) ``channel`` in every table, and
        clear its channel lines; the channel is inactive already. Returns the slots freed."""
        freed = 0
        for name, t in self.tables.items():
            t.core.chan[channel, Chan.WANT_LEASE] = 0
            t.outstanding[channel] = 0
            if t.broken is not None:
                # What it leased and published waits for the next daemon: adopt() commits
                # what was published and frees the rest.
                continue
            repairs = int(t.core.ctrl[Ctrl.REPAIRS])
            try:
                with self.loop.locked(t, "reclaiming a client's slots"):
                    # A holder that died is detected here, and repaired first.
                    freed += t.core.reclaim_channel(channel)
            except Exception as exc:
                self.loop.quarantine(t, f"{type(exc).__name__}: {exc}", exc)
                continue
            if int(t.core.ctrl[Ctrl.REPAIRS]) != repairs:
                log.warning(
                    "table %r: a process died holding its lock; rebuilt its structures from "
                    "the per-slot metadata",
                    name,
                )
        return freed

    def cut_off(self, channel: int, why: str) -> None:
        """A client wrote a value that makes no sense where only it writes: stop reading its
        channel, take back what it held (what it published and was not committed is dropped),
        close its connection. Its next call raises ClientCutOff; other clients go on."""
        if not self.active[channel]:
            return
        self.active[channel] = False
        with self.lock:
            client = self._clients.get(channel)
        pid = client.pid if client is not None else 0
        log.error(
            "client pid %d (channel %d) cut off: %s; its connection is closed and the slots it "
            "held are taken back (its uncommitted items are dropped)",
            pid,
            channel,
            why,
        )
        if client is not None:
            client.reclaimed = True
        self._free_channel(channel)
        for t in self.tables.values():
            t.core.events.insert.post(1)  # it may wait for a lease: it looks again, and raises
            t.core.events.sample.post(1)
        if client is not None:
            shutdown_connection(client.conn)

    def accept(self, listener: socket.socket) -> tuple[socket.socket | None, bool]:
        """Accept one control connection, or refuse it with an error reply and close it: a
        peer not allowed (SO_PEERCRED), or no descriptor to spare (the daemon keeps
        FD_RESERVE free for its own work: checkpoints, /proc). Returns the connection (None
        if none was accepted) and whether accept() itself found no descriptor."""
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return None, False
        except OSError as exc:
            if not is_out_of_descriptors(exc):
                return None, False
            self._fd_shortage(None)
            return None, True
        short = self._fd_shortage(conn)
        if short is not None:
            refuse(conn, "TooManyOpenFiles", short)
            return None, False
        refused = self._peer_refused(conn)
        if refused is not None:
            refuse(conn, "PermissionDenied", refused)
            return None, False
        return conn, False

    def _fd_shortage(self, conn: socket.socket | None) -> str | None:
        """A message if the daemon has fewer than FD_RESERVE descriptors to spare (``conn``
        counted as spent), else None. The first refusal is logged, and the recovery."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        try:
            used = len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
        except OSError:
            used = soft
        if conn is not None and used + FD_RESERVE <= soft:
            if self._fd_refusing:
                self._fd_refusing = False
                log.info("file descriptors available again (%d of %d in use)", used, soft)
            return None
        message = (
            f"the shmreplay daemon of instance {self.name!r} (pid {os.getpid()}) is out of file "
            f"descriptors ({used} in use, limit {soft}, {FD_RESERVE} kept for itself) and "
            "refuses new connections until some close; close unused clients, or raise its "
            "limit (LimitNOFILE= in its systemd unit, ulimit -n before shmreplay serve), then "
            "attach again"
        )
        if not self._fd_refusing:
            self._fd_refusing = True
            with self.lock:
                attached = len(self._clients)
            log.warning(
                "out of file descriptors: %d in use of a limit of %d (%d clients attached); "
                "refusing new control connections until some close (logged once)",
                used,
                soft,
                attached,
            )
        return message

    def _peer_refused(self, conn: socket.socket) -> str | None:
        """The socket's mode already keeps others out; the kernel's word on the peer (its uid,
        SO_PEERCRED) is checked too: our user, root, or a member of [server] group. Returns
        why the peer is refused, or None."""
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        if uid in (0, os.getuid()):
            return None
        group = group_id(self.config.server.group)
        if group is not None and (gid == group or user_in_group(uid, group)):
            return None
        log.warning("refused a control connection from pid %d (uid %d): not allowed", pid, uid)
        if group is None:
            return (
                f"uid {uid} may not use instance {self.name!r}: its daemon (uid {os.getuid()}) "
                "admits only its own user and root; to admit others, set group in [server] of "
                "its tables.toml and add them to that group"
            )
        g = self.config.server.group
        return (
            f"uid {uid} may not use instance {self.name!r}: its daemon (uid {os.getuid()}) "
            f"admits its own user, root and the members of group {g!r}; add this user to it "
            f"(usermod -aG {g} <user>) and log in again"
        )


def shutdown_connection(conn: socket.socket | None) -> None:
    """End a client's control connection from our side: the control thread then sees it
    closed, reports it and frees its channel (see Clients.reclaim)."""
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)


def error_reply(kind: str, message: str) -> dict:
    return {"ok": False, "type": kind, "error": message}


def refuse(conn: socket.socket, kind: str, message: str) -> None:
    """Answer a connection's first request in advance with an error, and close it. The
    client reads the reply even if its request arrives after the close (see ControlClient)."""
    try:
        conn.settimeout(0.5)  # the reply fits in any socket buffer; never wait on the peer
        conn.sendall(encode(error_reply(kind, message)))
    except OSError:
        pass
    finally:
        conn.close()


def user_in_group(uid: int, gid: int) -> bool:
    import grp
    import pwd

    try:
        user = pwd.getpwuid(uid)
        return user.pw_gid == gid or user.pw_name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


def group_id(group: str | None) -> int | None:
    if group is None:
        return None
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ShmReplayError(f"[server] group = {group!r}: no such group on this machine") from None
