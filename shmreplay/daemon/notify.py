"""The systemd notify protocol (``sd_notify``), without a dependency.

A service started with ``Type=notify`` finds ``$NOTIFY_SOCKET`` in its environment: a Unix
datagram socket, given as a filesystem path or, with a leading ``@``, a name in the abstract
namespace. Each datagram is newline-separated ``KEY=value`` assignments. The ones the daemon sends:

- ``READY=1`` once every table is allocated and restored: systemd then starts dependent units and
  ``systemctl start`` returns. Before it, clients may find no instance record.
- ``STATUS=...`` one line shown by ``systemctl status``.
- ``WATCHDOG=1`` every :attr:`Notifier.watchdog_interval` seconds when the unit has
  ``WatchdogSec=``; systemd kills and (with ``Restart=on-failure``) restarts a daemon whose serve
  loop stops pinging.
- ``EXTEND_TIMEOUT_USEC=...`` while a long restore or final checkpoint runs, so that
  ``TimeoutStartSec=``/``TimeoutStopSec=`` measure progress rather than total time.
- ``STOPPING=1`` when shutdown begins.

Outside systemd (``$NOTIFY_SOCKET`` unset) every call is a no-op that returns False, so the daemon
calls these unconditionally. Nothing here raises into the daemon: a failed send is logged once as
a warning and then ignored, because a service manager that cannot hear us must not take the
replay buffer down with it.

Usage, as the daemon does it::

    notifier = Notifier()                 # reads $NOTIFY_SOCKET, $WATCHDOG_USEC, $WATCHDOG_PID
    ...create and restore the tables...
    notifier.ready("serving 2 tables")
    while serving:
        ...one round of the commit loop...
        notifier.watchdog_tick()          # one clock read; sends WATCHDOG=1 when it is due
    notifier.stopping()
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("shmreplay")

# A datagram to the service manager is tiny and normally accepted at once; the bound only guards
# against a wedged receiver stalling the daemon's serve loop (a watchdog ping is then dropped,
# which systemd notices on its own).
SEND_TIMEOUT_S = 1.0


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings the service manager expects from this process, or None.

    That is half of ``$WATCHDOG_USEC`` (as sd_watchdog_enabled(3) recommends), and only when
    ``$WATCHDOG_PID`` is unset or names this process: a child that inherited the variables must
    not ping for its parent. Malformed or non-positive values mean no watchdog.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        timeout_us = int(usec)
    except ValueError:
        return None
    if timeout_us <= 0:
        return None
    return timeout_us / 2e6


def _address(value: str) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a socket address: a path, or ``\\0name`` for ``@name``."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # e.g. "vsock:CID:PORT" (systemd ≥ 253 in VMs): not supported, see Notifier


def _one_line(text: str) -> str:
    # A newline would end the assignment and start another: keep STATUS to one line.
    return " ".join(str(text).splitlines())


class Notifier:
    """Sends notifications to the service manager named by ``$NOTIFY_SOCKET``.

    The environment is read once, at construction (pass ``environ`` to use another mapping, as
    tests do). ``enabled`` says whether a socket was given; every method returns True when the
    datagram was sent and False when notifications are disabled or the send failed. A socket is
    opened per message, as sd_notify does: there is no state to close and nothing to leak.
    """

    address: str | bytes | None = None
    watchdog_interval: float | None = None  # seconds between WATCHDOG=1 pings, None: no watchdog

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._warned = False
        self._last_ping = time.monotonic()
        if raw:
            self.address = _address(raw)
            if self.address is None:
                self._warn(f"NOTIFY_SOCKET={raw!r} is not a path or @abstract name; ignoring it")
        # Without a socket to ping there is no watchdog to keep, whatever WATCHDOG_USEC says.
        self.watchdog_interval = watchdog_interval(env) if self.address is not None else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram. Never raises."""
        if self.address is None or not assignments:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT_S)
                sock.sendto(message, self.address)
        except (OSError, ValueError) as exc:
            self._warn(f"could not notify the service manager at {self._shown()}: {exc}")
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: every table is allocated and restored; clients may attach."""
        extra = () if status is None else (f"STATUS={_one_line(status)}",)
        return self.notify("READY=1", *extra)

    def status(self, text: str) -> bool:
        """``STATUS=``: one line for ``systemctl status`` (newlines become spaces)."""
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun (a final checkpoint may follow)."""
        extra = () if status is None else (f"STATUS={_one_line(status)}",)
        return self.notify("STOPPING=1", *extra)

    def mainpid(self, pid: int | None = None) -> bool:
        """``MAINPID=``: the daemon's pid, when it is not the process systemd started."""
        return self.notify(f"MAINPID={os.getpid() if pid is None else int(pid)}")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: allow ``seconds`` more from now to finish starting or
        stopping. Send it again before it runs out, e.g. with each progress line of a restore."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1e6))}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the serve loop is alive. Sent only when the unit has a watchdog."""
        if self.watchdog_interval is None:
            return False
        self._last_ping = time.monotonic()
        return self.notify("WATCHDOG=1")

    def watchdog_tick(self, now: float | None = None) -> bool:
        """Ping if :attr:`watchdog_interval` has passed since the last ping; else do nothing.

        Costs one clock read, so the serve loop calls it every round. Call it from the loop that
        does the work (not from a helper thread), so a wedged loop stops pinging and systemd
        restarts the daemon.
        """
        if self.watchdog_interval is None:
            return False
        if (time.monotonic() if now is None else now) - self._last_ping < self.watchdog_interval:
            return False
        return self.watchdog()

    def _shown(self) -> str:
        a = self.address
        return "@" + a[1:].decode(errors="replace") if isinstance(a, bytes) else str(a)

    def _warn(self, message: str) -> None:
        # Once: a service manager that went away would otherwise fill the log at every ping.
        if not self._warned:
            self._warned = True
            log.warning("%s (further notification failures are not logged)", message)
