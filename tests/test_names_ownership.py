"""Names and ownership another user cannot plant (issue 11, §5, and the PID-namespace part of §6).

- one check of instance names, wherever a name arrives (CLI, tables.toml, Server, attach);
- the runtime directory: a daemon never writes through a planted symlink, and a directory
  someone else created first is refused, by the daemon and by its clients;
- clients trust the control socket only if its peer (SO_PEERCRED) is the daemon of the record;
- /dev/shm: a daemon adopts or removes only objects of its own user, and says what is in the way;
- liveness comes from the segments (daemon pid and start time), whatever runtime directory the
  daemon uses: neither ``gc`` nor a second daemon touches a live daemon's objects;
- a client in another PID namespace is told so.

What needs a second user, a planted file in /dev/shm or /tmp runs as root in a private mount
namespace (private tmpfs on /dev/shm and /tmp): the test re-executes a scenario function of this
module in a child under ``unshare`` and reads its JSON result. Acting as another user forks a
child that drops to uid 65534 (the interpreter under /root is closed to it, so nothing is
executed as that user: the forked child runs code the parent has already imported).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import posix_ipc
import psutil
import pytest

import shmreplay
from shmreplay.config import MAX_INSTANCE_NAME, MAX_TABLE_NAME, NAME_MAX, parse_config
from shmreplay.engine.instance import (
    InstanceRecord,
    event_name,
    record_path,
    segment_name,
    shm_objects,
    start_stamp,
)
from shmreplay.engine.layout import Ctrl
from shmreplay.engine.shm import Segment
from shmreplay.errors import ConfigError, InvalidArgumentError, PermissionDenied
from shmreplay.testing import (
    STAMPED_SIGNATURE,
    DaemonProcess,
    as_user,
    stamped_batch,
    table_toml,
    unique_name,
    verify_stamped,
)

NOBODY = 65534
TOML = table_toml(signature=STAMPED_SIGNATURE)
HERE = Path(__file__).parent


def cli(*args: str, env: dict | None = None, input: str | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "shmreplay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
        input=input,
    )


def fill_and_check(name: str, n: int = 50) -> int:
    """Insert ``n`` stamped rows more, sample them back verified; the table's size."""
    with shmreplay.attach(name, timeout=5) as c:
        t = c.table("replay")
        base = t.info().current_size
        t.insert_batch(stamped_batch(np.arange(base, base + n)))
        t.flush(timeout=10)
        assert verify_stamped(t.sample(20, timeout=5).data).all()
        return t.info().current_size


# -- names -----------------------------------------------------------------------------------------

BAD_NAMES = ["a.b", "", "../x", "a/b", "x" * (MAX_INSTANCE_NAME + 1), "a b", "é"]


def test_the_longest_name_still_fits_every_object_name():
    """The limit is NAME_MAX minus the longest object name an instance makes."""
    longest = event_name("x" * MAX_INSTANCE_NAME, "t" * MAX_TABLE_NAME, "sample")
    assert len("sem." + longest[1:]) == NAME_MAX


@pytest.mark.parametrize(
    "bad", BAD_NAMES, ids=["dot", "empty", "dotdot", "slash", "too-long", "space", "non-ascii"]
)
def test_a_bad_name_is_refused_by_every_way_it_arrives(bad, tmp_path):
    """One check: Server(name=), attach(name), [server] name and --name of serve, info, stop,
    gc. Each says what is allowed; no command starts anything or prints a traceback."""
    with pytest.raises(ConfigError, match="not a valid instance name"):
        shmreplay.Server(TOML, bad)
    with pytest.raises(InvalidArgumentError, match="letters, digits"):
        shmreplay.attach(bad, timeout=0.1)
    with pytest.raises(ConfigError, match="server.name"):
        parse_config({"server": {"name": bad}, **_tables()})
    toml = tmp_path / "tables.toml"
    toml.write_text(TOML)
    for args in (("serve", "--tables", str(toml)), ("info",), ("stop",), ("gc", "--yes")):
        r = cli(*args, "--name", bad, timeout=30)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "not a valid instance name" in r.stderr and "Traceback" not in r.stderr, args


def _tables() -> dict:
    import tomllib

    return tomllib.loads(TOML)


def test_names_cannot_claim_each_others_objects(daemon_factory):
    """'exp' and 'exp-v2' run side by side; --fresh of one, a refused start of the other and
    gc of a dead one leave the other's objects alone (with '.' banned, no instance's objects
    start with another's prefix)."""
    a = daemon_factory(TOML)
    b = daemon_factory(TOML, name=a.name + "-v2")
    fill_and_check(b.name)
    before = shm_objects(b.name)
    assert len(before) == 4 and not set(before) & set(shm_objects(a.name))
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait()
    with pytest.raises(RuntimeError, match="already serves"):
        daemon_factory(TOML, name=b.name)  # refused: must not touch b's objects either
    a2 = daemon_factory(TOML, name=a.name, args=("--fresh",))
    r = cli("gc", "--name", a.name, "--yes")
    assert r.returncode == 0, r.stderr
    assert shm_objects(b.name) == before
    assert fill_and_check(b.name) == 100
    assert fill_and_check(a2.name) == 50


# -- the runtime directory (same user) -----------------------------------------------------------


def test_the_record_is_never_written_through_a_symlink(tmp_path):
    """A symlink planted as <name>.json.tmp is replaced, never followed: the file it points
    to keeps its content and mode."""
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o700)
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    precious.chmod(0o644)
    name = unique_name()
    (rt / f"{name}.json.tmp").symlink_to(precious)
    env = {"SHMREPLAY_RUNTIME_DIR": str(rt)}
    with _env(env):
        d = DaemonProcess(TOML, name=name)
        try:
            assert fill_and_check(name) == 50
            assert not (rt / f"{name}.json").is_symlink()
        finally:
            d.close()
    assert precious.read_text() == "keep me"
    assert precious.stat().st_mode & 0o777 == 0o644


@contextlib.contextmanager
def _env(env: dict):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_a_record_pointing_at_another_process_socket_is_not_trusted(daemon_factory, tmp_path):
    """A record whose socket is served by some other process (pid and uid from SO_PEERCRED
    differ from the record's) is refused at once with PermissionDenied naming both, before a
    single request is sent to it."""
    d = daemon_factory(TOML)
    rec = InstanceRecord.read(d.name)
    fake = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(fake))
    listener.listen(4)
    path = record_path(d.name)
    data = json.loads(path.read_text())
    data["socket"] = str(fake)
    path.write_text(json.dumps(data))
    try:
        t0 = time.monotonic()
        with pytest.raises(PermissionDenied) as info:
            shmreplay.attach(d.name, timeout=1)
        assert time.monotonic() - t0 < 2
        msg = str(info.value)
        assert f"served by pid {os.getpid()}" in msg and f"pid {rec.pid}" in msg, msg
        listener.settimeout(0)
        conn, _ = listener.accept()  # it connected, sent nothing and hung up
        conn.settimeout(5)
        assert conn.recv(1) == b""
        conn.close()
    finally:
        listener.close()
    data["socket"] = rec.socket
    path.write_text(json.dumps(data))
    assert fill_and_check(d.name) == 50


# -- liveness from the objects -------------------------------------------------------------------


def _other_runtime_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="shmreplay-rt2-")


def test_gc_from_another_runtime_directory_spares_a_live_daemon(daemon_factory):
    """gc run without the daemon's runtime directory (root next to a systemd unit) sees from
    its segments that the daemon lives: it removes nothing and the daemon keeps serving."""
    d = daemon_factory(TOML)
    fill_and_check(d.name)
    before = shm_objects(d.name)
    with _other_runtime_dir() as rt2:
        r = cli("gc", "--name", d.name, "--yes", env={"SHMREPLAY_RUNTIME_DIR": rt2})
        assert r.returncode == 0, r.stderr
        assert f"is running: left alone (daemon pid {d.proc.pid})" in r.stdout, r.stdout
        assert os.listdir(rt2) == []  # and it created no lock file of its own
    assert shm_objects(d.name) == before
    assert fill_and_check(d.name) == 100


def test_a_second_daemon_elsewhere_refuses_a_live_daemons_tables(daemon_factory):
    """A daemon of the same name in another runtime directory does not adopt a live daemon's
    tables: DaemonAlreadyRunning naming its pid, and nothing of the live one is touched (not
    even its semaphores)."""
    d = daemon_factory(TOML)
    fill_and_check(d.name)
    before = shm_objects(d.name)
    with _other_runtime_dir() as rt2, tempfile.TemporaryDirectory() as tmp:
        toml = Path(tmp, "tables.toml")
        toml.write_text(TOML)
        for extra in ((), ("--fresh",)):
            r = cli(
                "serve", "--tables", str(toml), "--name", d.name, *extra,
                env={"SHMREPLAY_RUNTIME_DIR": rt2},
            )  # fmt: skip
            assert r.returncode == 1, r.stderr
            assert f"a shmreplay daemon (pid {d.proc.pid}) serves instance" in r.stderr
            assert "Traceback" not in r.stderr
    assert shm_objects(d.name) == before
    assert fill_and_check(d.name) == 100


def _kill_and_stamp(d: DaemonProcess, pid: int, start: float) -> None:
    """Kill ``d`` and make its segment record ``pid`` and ``start`` as its daemon's."""
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    seg = Segment.attach(segment_name(d.name, "replay"))
    try:
        ctrl = seg.arrays["ctrl"][:, 0]
        ctrl[Ctrl.DAEMON_PID] = pid
        ctrl[Ctrl.DAEMON_START] = start_stamp(start)
        del ctrl
    finally:
        seg.close()


def test_liveness_is_the_recorded_pid_and_start_time(daemon_factory):
    """A segment whose recorded daemon pid runs but started at another time (the pid was
    reused) is dead: it is adopted. One whose pid and start time match a live process is
    alive: a new daemon refuses it naming the pid."""
    me = psutil.Process()
    d = daemon_factory(TOML)
    fill_and_check(d.name)
    _kill_and_stamp(d, me.pid, me.create_time() - 3600)  # a reused pid
    d2 = daemon_factory(TOML, name=d.name)
    assert "adopted the segment" in d2.log()
    assert fill_and_check(d.name) == 100
    _kill_and_stamp(d2, me.pid, me.create_time())  # "alive"
    with pytest.raises(RuntimeError, match=f"a shmreplay daemon \\(pid {me.pid}\\) serves"):
        daemon_factory(TOML, name=d.name)
    r = cli("gc", "--name", d.name, "--yes")
    assert f"left alone (daemon pid {me.pid})" in r.stdout and shm_objects(d.name)


def test_gc_lists_asks_and_leaves_nothing_stale(daemon_factory):
    """gc lists what it would remove and asks: 'n' removes nothing; 'y' removes the killed
    daemon's segments, semaphores, record, socket and lock file; a live instance is listed as
    running and kept."""
    dead = daemon_factory(TOML)
    live = daemon_factory(TOML)
    os.kill(dead.proc.pid, signal.SIGKILL)
    dead.proc.wait()
    objs = shm_objects(dead.name)
    rt = record_path(dead.name).parent
    files = sorted(p.name for p in rt.iterdir() if p.name.startswith(dead.name + "."))
    assert files == [f"{dead.name}.{s}" for s in ("json", "lock", "sock")]
    r = cli("gc", "--name", dead.name, input="n\n")
    assert r.returncode == 1 and "Aborted" in r.stderr
    for o in objs:
        assert f"would remove /dev/shm/{o}" in r.stdout
    for f in files:
        assert f"would remove {rt / f}" in r.stdout
    assert shm_objects(dead.name) == objs
    r = cli("gc", "--name", dead.name, input="y\n")
    assert r.returncode == 0, r.stderr
    assert f"{len(objs) + len(files)} object(s) removed" in r.stdout
    assert shm_objects(dead.name) == []
    assert not [p for p in rt.iterdir() if p.name.startswith(dead.name + ".")]
    r = cli("gc", "--name", live.name)
    assert "is running: left alone" in r.stdout and "nothing to remove" in r.stdout
    assert fill_and_check(live.name) == 50


# -- another PID namespace -----------------------------------------------------------------------


def _pid_namespaces_work() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _pid_namespaces_work(), reason="needs root and PID namespaces (unshare)")
def test_a_client_in_another_pid_namespace_is_told_so(daemon_factory):
    d = daemon_factory(TOML)
    code = (
        "import shmreplay, sys, time\n"
        "t0 = time.monotonic()\n"
        "try:\n"
        "    shmreplay.attach(sys.argv[1], timeout=3)\n"
        "except Exception as e:\n"
        "    print(f'{time.monotonic() - t0:.2f}', type(e).__name__ + ': ' + str(e))\n"
    )
    r = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code, d.name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    seconds, out = r.stdout.strip().split(" ", 1)
    assert float(seconds) < 2, out  # at once, not when the 3 s timeout runs out
    assert out.startswith("DaemonNotRunning: "), out
    assert "not visible from this process's PID namespace" in out and "--pid=host" in out, out
    assert f"pid {d.proc.pid}" in out
    assert fill_and_check(d.name) == 50


# -- another user (root, private mount namespace) ------------------------------------------------


def _mount_namespaces_work() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return r.returncode == 0


needs_namespace = pytest.mark.skipif(
    not (_mount_namespaces_work() and _pid_namespaces_work()),
    reason="needs root, mount and PID namespaces (unshare)",
)


def in_private_namespace(scenario: str) -> dict:
    """Run ``scenario`` (a function of this module) as root in a private mount namespace with
    its own tmpfs on /dev/shm and /tmp; its JSON result."""
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_names_ownership as m; "
        "print(json.dumps(getattr(m, sys.argv[2])()))"
    )
    # The interpreter, a venv or this checkout may live under /tmp (a CI clone): the host's /tmp
    # stays reachable at /mnt (inside the namespace only) and those paths are bound back.
    keep = sorted(
        {
            str(Path(p).resolve())
            for p in (sys.prefix, sys.base_prefix, HERE.parent, Path(shmreplay.__file__).parent)
            if Path(p).resolve().is_relative_to("/tmp")
        }
    )
    rebind = "".join(
        f'mkdir -p "{p}" && mount --bind "/mnt/{Path(p).relative_to("/tmp")}" "{p}" && '
        for p in keep
    )
    shell = (
        "mount -t tmpfs -o size=64m tmpfs /dev/shm && mount --bind /tmp /mnt && "
        f'mount -t tmpfs tmpfs /tmp && {rebind}exec "$0" -c "$@"'
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SHMREPLAY_RUNTIME_DIR", "TMPDIR")}
    env.pop("XDG_RUNTIME_DIR", None)
    r = subprocess.run(
        # A PID namespace of its own too (--kill-child): if the timeout kills the scenario, the
        # kernel kills the daemons it started (in sessions of their own) with it.
        ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child"]
        + ["--mount-proc", "sh", "-c", shell, sys.executable]
        + [script, str(HERE), scenario],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        start_new_session=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(out)
    return out


def serve(name: str, *extra: str, env: dict | None = None) -> dict:
    """``shmreplay serve`` of TOML as ``name``: its exit status and stderr, or "served" (then
    stopped) if it was still serving after 15 s."""
    with tempfile.TemporaryDirectory() as tmp:
        toml = Path(tmp, "tables.toml")
        toml.write_text(TOML)
        proc = subprocess.Popen(
            [sys.executable, "-m", "shmreplay", "serve", "--tables", str(toml), "--name", name]
            + list(extra),
            stderr=subprocess.PIPE,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        try:
            _, err = proc.communicate(timeout=15)
            return {"code": proc.returncode, "stderr": err[-1500:]}
        except subprocess.TimeoutExpired:
            proc.terminate()
            _, err = proc.communicate(timeout=15)
            return {"code": "served", "stderr": err[-1500:]}


def _planted_runtime_dir_scenario() -> dict:
    """Neither SHMREPLAY_RUNTIME_DIR nor XDG_RUNTIME_DIR: root's default is /tmp/shmreplay-0.
    Uid 65534 made it first (0755) with a symlink <name>.json.tmp to a root file, and a record
    of its own pointing at a socket it listens on."""
    out: dict = {}
    name = unique_name()
    rt = Path("/tmp/shmreplay-0")
    precious = Path("/tmp/precious")
    precious.write_text("root's")
    precious.chmod(0o644)

    def plant() -> bool:
        os.umask(0o022)
        rt.mkdir(mode=0o755)
        (rt / f"{name}.json.tmp").symlink_to(precious)
        return True

    out["planted"] = as_user(NOBODY, plant)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(rt / f"{name}.sock"))
    listener.listen(4)
    listener.setblocking(False)
    record = rt / f"{name}.json"
    record.write_text(
        json.dumps(
            {
                "name": name,
                "pid": os.getpid(),
                "start_time": psutil.Process().create_time(),
                "socket": str(rt / f"{name}.sock"),
                "tables": ["replay"],
                "format_version": 2,
            }
        )
    )
    for p in (record, rt / f"{name}.sock"):
        os.chown(p, NOBODY, NOBODY, follow_symlinks=False)
    out["serve"] = serve(name)
    out["precious"] = [precious.read_text(), oct(precious.stat().st_mode & 0o777)]
    try:
        shmreplay.attach(name, timeout=1).close()
        out["attach"] = "attached"
    except Exception as exc:  # noqa: BLE001 (the test checks which)
        out["attach"] = [type(exc).__name__, str(exc)]
    try:
        listener.accept()[0].close()
        out["attacker_was_contacted"] = True
    except BlockingIOError:
        out["attacker_was_contacted"] = False
    listener.close()
    # Once the directory is removed, root's daemon makes its own and serves.
    shutil.rmtree(rt)
    d = DaemonProcess(TOML, name=name)
    try:
        out["after_removal"] = fill_and_check(name)
        st = rt.stat()
        out["new_dir"] = [st.st_uid, oct(st.st_mode & 0o777)]
    finally:
        d.close()
    return out


@needs_namespace
def test_a_runtime_directory_another_user_made_first_is_refused():
    """Root's daemon refuses /tmp/shmreplay-0 made by uid 65534 (saying whose it is and what to
    do) and writes nothing through its symlink; root's attach refuses it too and never contacts
    the planted socket. Removed, the directory is made again 0700 and all works."""
    out = in_private_namespace("_planted_runtime_dir_scenario")
    assert out["planted"] == ["ok", True]
    assert out["serve"]["code"] == 1, out["serve"]
    err = out["serve"]["stderr"]
    assert "unsafe shmreplay runtime directory /tmp/shmreplay-0" in err, err
    assert "belongs to uid 65534" in err and "rm -r /tmp/shmreplay-0" in err, err
    assert "Traceback" not in err
    assert out["precious"] == ["root's", "0o644"]
    kind, msg = out["attach"]
    assert kind == "PermissionDenied" and "belongs to uid 65534" in msg, out["attach"]
    assert out["attacker_was_contacted"] is False
    assert out["after_removal"] == 50 and out["new_dir"] == [0, "0o700"]


def _in_process_daemon(name: str, rt: str) -> Callable[[], object]:
    """Start and clean up a daemon in this process (as uid 65534, in a forked child: the
    interpreter is closed to that user) with runtime directory ``rt``."""
    from shmreplay.daemon.lifecycle import Daemon

    def run() -> object:
        os.environ["SHMREPLAY_RUNTIME_DIR"] = rt
        d = Daemon(parse_config({"server": {"name": name}, **_tables()}))
        try:
            d.start()
            return "started"
        finally:
            d.cleanup()

    return run


def _planted_dev_shm_scenario() -> dict:
    os.environ["SHMREPLAY_RUNTIME_DIR"] = "/tmp/rt-root"
    out: dict = {}
    # An attacker's valid table under root's instance name (a killed daemon's, given to 65534).
    d = DaemonProcess(TOML, name=unique_name())
    fill_and_check(d.name)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait()
    seg = "/dev/shm" + segment_name(d.name, "replay")
    os.chown(seg, NOBODY, NOBODY)
    out["foreign_table"] = serve(d.name)
    out["foreign_table_fresh"] = serve(d.name, "--fresh")
    out["foreign_table_kept"] = os.stat(seg).st_uid == NOBODY
    out["gc"] = cli("gc", "--name", d.name, "--yes").stdout
    out["foreign_table_kept_by_gc"] = os.path.exists(seg)
    for e in shm_objects(d.name):  # gc removed its record: d.close() would not know them
        os.unlink("/dev/shm/" + e)
    d.close()

    # A garbage file of 65534's in the place of a table.
    name = unique_name()
    garbage = "/dev/shm" + segment_name(name, "replay")

    def plant_garbage() -> bool:
        with open(garbage, "wb") as f:
            f.write(b"garbage" * 1000)
        return True

    out["garbage_planted"] = as_user(NOBODY, plant_garbage)
    out["garbage"] = serve(name)
    os.unlink(garbage)

    # A semaphore of root's in the way of a daemon of 65534's. The same code runs as root
    # first: the child cannot import anything more.
    warm = unique_name()
    out["warm"] = _in_process_daemon(warm, "/tmp/rt-warm")()
    name = unique_name()
    sem = posix_ipc.Semaphore(event_name(name, None, "daemon"), posix_ipc.O_CREX, mode=0o644)
    sem.close()
    os.makedirs("/tmp/rt-nobody", mode=0o700)
    os.chown("/tmp/rt-nobody", NOBODY, NOBODY)
    out["nobody_daemon"] = as_user(NOBODY, _in_process_daemon(name, "/tmp/rt-nobody"))
    out["sem_kept"] = os.path.exists("/dev/shm/sem." + event_name(name, None, "daemon")[1:])
    posix_ipc.unlink_semaphore(event_name(name, None, "daemon"))
    out["nobody_daemon_after"] = as_user(NOBODY, _in_process_daemon(name, "/tmp/rt-nobody"))

    # What an older version let instance "<x>.v2" make is not instance <x>'s: serving <x>
    # with --fresh, and stopping it, leaves it alone.
    x = unique_name()
    legacy = [f"shmreplay.{x}.v2.replay", f"sem.shmreplay.{x}.v2.daemon"]
    legacy += [f"sem.shmreplay.{x}.v2.replay.{k}" for k in ("sample", "insert")]
    for e in legacy:
        Path("/dev/shm", e).write_bytes(b"x" * 32)
    d = DaemonProcess(TOML, name=x, args=("--fresh",))
    out["legacy_serving"] = fill_and_check(x)
    d.close()
    out["legacy_kept"] = all(Path("/dev/shm", e).exists() for e in legacy)
    for e in legacy:
        os.unlink("/dev/shm/" + e)
    out["left"] = sorted(os.listdir("/dev/shm"))
    return out


@needs_namespace
def test_dev_shm_objects_of_another_user_are_neither_adopted_nor_removed():
    """A valid table of uid 65534 under root's instance name is not adopted (nor removed by
    --fresh or gc); a garbage file of 65534 is reported, not a traceback; a root semaphore
    in the way of a daemon of 65534 is a PermissionDenied naming it, not a raw posix_ipc
    error. Each message names the path, its owner and what to do. Objects of a dotted name
    of old ("x.v2") are not taken for instance "x"'s, not even by --fresh."""
    out = in_private_namespace("_planted_dev_shm_scenario")
    for key in ("foreign_table", "foreign_table_fresh", "garbage"):
        r = out[key]
        assert r["code"] == 1, (key, r)
        assert "is in the way of this daemon" in r["stderr"], (key, r)
        assert "belongs to uid 65534" in r["stderr"] and "rm /dev/shm/" in r["stderr"], (key, r)
        assert "Traceback" not in r["stderr"], (key, r)
    assert out["foreign_table_kept"] and out["foreign_table_kept_by_gc"]
    assert "left alone: /dev/shm/shmreplay." in out["gc"] and "uid 65534" in out["gc"]
    assert out["garbage_planted"] == ["ok", True]
    assert out["warm"] == "started"
    kind, classes, msg = out["nobody_daemon"]
    assert (kind, classes[0]) == ("error", "PermissionDenied"), out["nobody_daemon"]
    assert "/dev/shm/sem.shmreplay." in msg and "uid 0 (root)" in msg, msg
    assert out["sem_kept"]
    assert out["nobody_daemon_after"] == ["ok", "started"]
    assert out["legacy_serving"] == 50 and out["legacy_kept"]
    assert out["left"] == [], out["left"]


def _client_trust_scenario() -> dict:
    """Root's daemon; one of its objects at a time handed to uid 65534 (as if planted in its
    place): root's attach must refuse each, and attach again once it is given back."""
    os.environ["SHMREPLAY_RUNTIME_DIR"] = "/tmp/rt-root"
    out: dict = {}
    d = DaemonProcess(TOML)
    try:
        fill_and_check(d.name)
        objects = {
            "record": str(record_path(d.name)),
            "segment": "/dev/shm" + segment_name(d.name, "replay"),
            "semaphore": "/dev/shm/sem." + event_name(d.name, "replay", "sample")[1:],
        }
        for what, path in objects.items():
            os.chown(path, NOBODY, -1)
            try:
                shmreplay.attach(d.name, timeout=1).close()
                out[what] = "attached"
            except Exception as exc:  # noqa: BLE001 (the test checks which)
                out[what] = [type(exc).__name__, str(exc)]
            finally:
                os.chown(path, 0, -1)
        out["given_back"] = fill_and_check(d.name)
    finally:
        d.close()
    out["left"] = sorted(os.listdir("/dev/shm"))
    return out


@needs_namespace
def test_a_client_refuses_objects_that_are_not_the_daemons():
    """A record, segment or semaphore that belongs to someone else than the daemon's user (and,
    for the record, than this user, root and the runtime directory's owner) is refused with
    PermissionDenied naming it and its owner, before it is used."""
    out = in_private_namespace("_client_trust_scenario")
    for what in ("record", "segment", "semaphore"):
        assert out[what] != "attached", what
        kind, msg = out[what]
        assert kind == "PermissionDenied", out[what]
        assert "refusing to use" in msg and "belongs to uid 65534" in msg, msg
    assert "neither this user, root nor the runtime directory's owner" in out["record"][1]
    assert "not to the daemon's user (uid 0 (root))" in out["segment"][1]
    assert "/dev/shm/sem.shmreplay." in out["semaphore"][1]
    assert out["given_back"] == 100 and out["left"] == []
