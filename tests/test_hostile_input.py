"""Hostile and malformed requests on the control socket: the daemon answers with an error or
closes that connection, and keeps serving everyone else."""

from __future__ import annotations

import os
import random
import socket
import struct

import msgpack
import pytest

import shmreplay
from shmreplay.control import MAX_FRAME, recv
from shmreplay.engine.instance import InstanceRecord
from shmreplay.testing import table_toml


def connect(name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(InstanceRecord.read(name).socket)
    return s


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def answer_or_close(s: socket.socket) -> dict | None:
    """The daemon's reply, or None if it closed the connection."""
    try:
        return recv(s)
    except (ConnectionError, OSError):
        return None


def still_serves(name: str) -> None:
    with shmreplay.attach(name, timeout=5) as client:
        t = client.table("replay")
        t.insert({"obs": [0.0] * 8, "action": 1, "reward": 0.5, "done": False})
        t.flush(timeout=5)
        assert client.server_info()["tables"]["replay"]["current_size"] >= 1


@pytest.fixture
def daemon(daemon_factory):
    return daemon_factory(table_toml())


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x92\x01",  # truncated array
        msgpack.packb([1, 2, 3]),  # not a map
        msgpack.packb({"op": "no-such-op"}),
        msgpack.packb({"op": "hello"}),  # no protocol, no pid
        msgpack.packb({"op": "hello", "protocol": 1, "pid": "x"}),
        msgpack.packb({"op": "set_rate_limiter", "table": ["a"], "rate_limiter": 5}),
        msgpack.packb({"op": "reset", "table": None}),
        msgpack.packb({"op": b"\xff" * 100}),
    ],
    ids=lambda b: repr(b[:12]),
)
def test_malformed_requests_get_an_error_and_the_daemon_goes_on(daemon, body):
    with connect(daemon.name) as s:
        s.sendall(frame(body))
        reply = answer_or_close(s)
        assert reply is None or (reply.get("ok") is False and reply.get("error"))
    assert daemon.proc.poll() is None
    still_serves(daemon.name)


def test_a_huge_length_closes_the_connection_without_allocating(daemon):
    with connect(daemon.name) as s:
        s.sendall(struct.pack(">I", MAX_FRAME + 1) + b"x" * 100)
        assert answer_or_close(s) is None
    with connect(daemon.name) as s:
        s.sendall(struct.pack(">I", 0xFFFFFFFF))
        assert answer_or_close(s) is None
    assert daemon.proc.poll() is None
    still_serves(daemon.name)


def test_random_bytes_and_truncated_frames_do_no_harm(daemon):
    rng = random.Random(20261125)
    for _ in range(60):
        with connect(daemon.name) as s:
            kind = rng.randrange(3)
            if kind == 0:  # random garbage, length prefix included
                s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
            elif kind == 1:  # a valid request cut short, then hang up
                whole = frame(msgpack.packb({"op": "info"}))
                s.sendall(whole[: rng.randrange(1, len(whole))])
            else:  # a random map
                body = msgpack.packb(
                    {
                        "op": rng.choice(["info", "hello", "bye", "reset", "x"]),
                        "table": rng.random(),
                        "pid": rng.randrange(-5, 5),
                    }
                )
                s.sendall(frame(body))
                answer_or_close(s)
    assert daemon.proc.poll() is None
    still_serves(daemon.name)


def test_a_client_that_connects_and_never_speaks_blocks_nobody(daemon):
    idle = connect(daemon.name)
    try:
        still_serves(daemon.name)  # with the idle connection open
    finally:
        idle.close()


def _connect_as(uid: int, path: str, result) -> None:
    import os

    os.setgid(uid)
    os.setuid(uid)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        try:
            s.connect(path)
        except OSError as exc:
            result.put(f"refused: {exc.errno}")
            return
        try:
            s.sendall(frame(msgpack.packb({"op": "info"})))
        except OSError:  # EPIPE, ECONNRESET: the daemon hung up first; its reply may be there
            pass
        reply = answer_or_close(s)
        if reply is None:
            result.put("closed")
        elif reply.get("ok"):
            result.put("answered")
        else:  # refused with an error, then closed
            try:
                closed = s.recv(1) == b""
            except ConnectionResetError:  # closed with our request unread: also closed
                closed = True
            result.put(f"{reply['type']}: {reply['error']}" if closed else "open")
    finally:
        s.close()


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="needs root to act as another user")
def test_another_user_is_turned_away_even_if_the_socket_mode_lets_it_in(daemon):
    """The socket is 0600; should its mode ever be wrong, the daemon still checks the peer's
    uid with SO_PEERCRED, answers with PermissionDenied and closes the connection."""
    import multiprocessing as mp
    import os

    path = InstanceRecord.read(daemon.name).socket
    rundir = os.path.dirname(path)
    ctx = mp.get_context("fork")
    try:
        os.chmod(rundir, 0o711)  # let the other user reach the socket file itself
        for mode, expected in ((0o600, "refused: 13"), (0o666, "PermissionDenied: uid 65534")):
            os.chmod(path, mode)
            result = ctx.Queue()
            p = ctx.Process(target=_connect_as, args=(65534, path, result))
            p.start()
            got = result.get(timeout=10)
            p.join(10)
            assert got.startswith(expected), (oct(mode), got)
        assert "group" in got  # what to do: [server] group
    finally:
        os.chmod(path, 0o600)
        os.chmod(rundir, 0o700)
    assert "refused a control connection" in daemon.log()
    still_serves(daemon.name)


def test_attaching_over_and_over_leaks_no_descriptor_mapping_or_channel(daemon):
    """A client that attaches and closes in a loop: open files, memory mappings and the
    daemon's channels come back to where they were (10,000 times in the soak; 300 here)."""
    import gc

    import psutil

    me = psutil.Process()

    def counts() -> tuple[int, int]:
        return me.num_fds(), len(me.memory_maps(grouped=False))

    def cycle(n: int) -> None:
        for i in range(n):
            c = shmreplay.attach(daemon.name, prefault=(i % 2 == 0))
            c.table("replay").info()
            c.close()
        gc.collect()

    cycle(50)  # warm up: imports, thread stacks, objects created once
    before = counts()
    cycle(300)
    after = counts()
    assert after[0] <= before[0] + 2 and after[1] <= before[1] + 2, (before, after)
    with shmreplay.attach(daemon.name) as c:
        assert c.server_info()["clients"] == [{"pid": os.getpid(), "channel": 0}]


def test_a_hello_with_a_pid_no_process_has_costs_no_channel(daemon_factory):
    """A pid that does not fit the channel's int64 line (1e30, 2**63) used to fail after the
    client was registered: its channel stayed taken for good, and max_clients such frames
    locked everyone out. Now the hello is refused before anything is registered."""
    from shmreplay.control import PROTOCOL_VERSION

    d = daemon_factory("[server]\nmax_clients = 2\n" + table_toml())
    for pid in (1e30, 2**63, -1, 0, "1", 1.5):
        s = connect(d.name)
        try:
            s.sendall(
                frame(msgpack.packb({"op": "hello", "protocol": PROTOCOL_VERSION, "pid": pid}))
            )
            reply = answer_or_close(s)
            assert reply is not None and reply["ok"] is False, (pid, reply)
            assert reply["type"] == "InvalidArgumentError" and "pid" in reply["error"], reply
        finally:
            s.close()
    with shmreplay.attach(d.name, timeout=5) as a, shmreplay.attach(d.name, timeout=5) as b:
        assert {c["pid"] for c in a.server_info()["clients"]} == {os.getpid()}
        assert len(b.server_info()["clients"]) == 2
