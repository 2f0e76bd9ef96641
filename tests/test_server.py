"""shmreplay.Server: a daemon run from Python, and the TableSpec → tables.toml writer it uses."""

from __future__ import annotations

import math
import os
import signal
import tomllib
import warnings

import numpy as np
import pytest

import shmreplay
from shmreplay.config import (
    FieldSpec,
    RateLimiterSpec,
    SelectorSpec,
    ServerSpec,
    TableSpec,
    parse_config,
    to_toml,
)
from shmreplay.daemon.server import ServerStartError
from shmreplay.engine.instance import InstanceRecord, process_alive, shm_objects
from shmreplay.testing import table_toml, unique_name

SIGNATURE = (
    FieldSpec("obs", (3, 2), "float32"),
    FieldSpec("action", (), "int64"),
    FieldSpec("done", (), "bool"),
)

SELECTORS = [
    SelectorSpec.uniform(),
    SelectorSpec.prioritized(0.6),
    SelectorSpec.prioritized(0.0),
    SelectorSpec.fifo(),
    SelectorSpec.lifo(),
    SelectorSpec.min_heap(),
    SelectorSpec.max_heap(),
]


def _limiters() -> list[RateLimiterSpec]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the max_diff < target case warns by design
        return [
            RateLimiterSpec.min_size(1),
            RateLimiterSpec.min_size(1000),
            RateLimiterSpec.sample_to_insert_ratio(8.0, 1000, 200.0),
            RateLimiterSpec.sample_to_insert_ratio(0.25, 3, (-10.0, 0.5)),
            RateLimiterSpec.sample_to_insert_ratio(1.0 / 3.0, 7, 2.0),
            RateLimiterSpec.queue(10),
            RateLimiterSpec.stack(7),
            RateLimiterSpec.custom(2.5, 4, -math.inf, 12.0),
            RateLimiterSpec.custom(1.0, 1, 0.0, math.inf),
            # a spec no preset makes: kind says queue, numbers do not; written as custom
            RateLimiterSpec("queue", 2.0, 3, 0.0, 10.5),
        ]


@pytest.mark.parametrize("selector", SELECTORS, ids=lambda s: f"{s.kind}")
@pytest.mark.parametrize("limiter", _limiters(), ids=lambda r: r.kind)
def test_table_specs_round_trip_through_toml(selector, limiter):
    spec = TableSpec(
        "replay",
        123,
        SIGNATURE,
        sampler=selector,
        remover=selector if selector.kind != "prioritized" else SelectorSpec.fifo(),
        rate_limiter=limiter,
        max_times_sampled=3,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = parse_config(tomllib.loads(to_toml([spec])))
    (again,) = config.tables
    if limiter.kind == "queue" and limiter.max_diff == 10.5:  # the hand-made one
        assert again.rate_limiter.kind == "custom"
        assert again == TableSpec(**{**spec.__dict__, "rate_limiter": again.rate_limiter})
        assert again.rate_limiter.to_dict() | {"kind": "queue"} == limiter.to_dict()
    else:
        assert again == spec


def test_server_section_and_several_tables_round_trip():
    server = ServerSpec(
        name="x-1",
        checkpoint_dir='/tmp/a "quoted" dir/ü',
        checkpoint_interval_s=60.5,
        checkpoint_keep=2,
        metrics_port=9100,
        max_clients=8,
    )
    tables = (
        TableSpec("a", 10, SIGNATURE),
        TableSpec("b", 5, (FieldSpec("x", (), "complex64"),), headroom=100),
    )
    config = parse_config(tomllib.loads(to_toml(tables, server)))
    assert config.server == server and config.tables == tables


def _specs() -> list[TableSpec]:
    return [
        TableSpec(
            "replay",
            100,
            SIGNATURE,
            sampler=SelectorSpec.fifo(),
            remover=SelectorSpec.fifo(),
            max_times_sampled=1,  # each sample takes the oldest and removes it
        )
    ]


def _row(i: int) -> dict:
    return {"obs": np.full((3, 2), i, np.float32), "action": i, "done": i % 2 == 0}


def test_server_from_specs_serves_and_stop_leaves_nothing():
    name = unique_name()
    with shmreplay.Server(_specs(), name) as server:
        assert server.name == name and server.running()
        rec = InstanceRecord.read(name)
        assert rec is not None and rec.pid == server.pid
        with shmreplay.attach(name) as client:
            t = client.table("replay")
            keys = [t.insert(_row(i)) for i in range(5)]
            t.flush()
            s = t.sample(5, timeout=10)
            assert s.info.key.tolist() == keys  # fifo: in insertion order
            assert s.data["action"].tolist() == [0, 1, 2, 3, 4]
            assert s.data["obs"][3].tolist() == [[3.0, 3.0]] * 3
        assert shm_objects(name)
    assert server.stop() == 0  # idempotent; the daemon exited cleanly on SIGTERM
    assert not server.running()
    assert shm_objects(name) == [] and InstanceRecord.read(name) is None
    assert "Server" in shmreplay.__all__ and "NotSupportedError" in shmreplay.__all__


def test_server_from_text_and_from_path(tmp_path):
    text = table_toml(max_size=50)
    with shmreplay.Server(text, unique_name()) as server, shmreplay.attach(server.name) as c:
        assert c.table("replay").info().max_size == 50
    path = tmp_path / "tables.toml"
    path.write_text(text)
    for tables in (path, str(path)):
        with shmreplay.Server(tables, unique_name()) as server, shmreplay.attach(server.name) as c:
            assert c.tables == ["replay"]
    with pytest.raises(shmreplay.ConfigError, match="no such file"):
        shmreplay.Server(str(tmp_path / "missing.toml"), unique_name())
    with pytest.raises(shmreplay.ConfigError, match="TableSpec"):
        shmreplay.Server([], unique_name())


def test_a_bad_config_raises_with_the_daemons_message():
    bad = table_toml(sampler='{ kind = "prioritised" }')
    with pytest.raises(ServerStartError) as info:
        shmreplay.Server(bad, unique_name())
    err = info.value
    assert isinstance(err, shmreplay.ShmReplayError) and isinstance(err, ConnectionError)
    assert err.returncode == 1
    msg = str(err)
    assert "exited with status 1" in msg
    assert "unknown selector 'prioritised'" in msg and "prioritized" in msg  # the daemon's
    assert "prioritised" in err.log


def test_early_exit_is_reported_with_the_log_tail():
    """A second server under a live instance's name exits at once (DaemonAlreadyRunning)."""
    name = unique_name()
    with shmreplay.Server(table_toml(), name) as first:
        with pytest.raises(ServerStartError, match="exited with status") as info:
            shmreplay.Server(table_toml(), name)
        assert "already" in str(info.value)
        assert first.running()  # the failed start did not touch the first daemon's objects
        with shmreplay.attach(name) as client:
            assert client.daemon_pid == first.pid


def test_not_ready_in_time_is_reported_and_the_child_stopped():
    with pytest.raises(ServerStartError, match="not serving after") as info:
        shmreplay.Server(table_toml(), unique_name(), ready_timeout=0.0)
    assert info.value.returncode is None


def test_stop_kills_a_daemon_that_ignores_sigterm_and_removes_its_objects():
    name = unique_name()
    server = shmreplay.Server(_specs(), name)
    try:
        os.kill(server.pid, signal.SIGSTOP)  # a stopped daemon cannot handle SIGTERM
        assert shm_objects(name)
        assert server.stop(timeout=0.5) == -signal.SIGKILL
        assert shm_objects(name) == [] and InstanceRecord.read(name) is None
    finally:
        server.stop()


def test_log_can_go_to_a_file_of_ours(tmp_path):
    log = tmp_path / "daemon.log"
    with shmreplay.Server(_specs(), unique_name(), log=log) as server:
        pass
    assert server.name in log.read_text()  # the daemon logged its start under its name
    assert log.exists()  # ours: not removed by stop()


def test_a_forgotten_server_is_stopped_at_exit(tmp_path):
    """A program that never calls stop() leaves no daemon and nothing in /dev/shm."""
    import subprocess
    import sys

    name = unique_name()
    script = (
        "import shmreplay, sys\n"
        f"s = shmreplay.Server({table_toml()!r}, {name!r})\n"
        "print(s.pid, flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    assert not process_alive(pid)
    assert shm_objects(name) == []


_CTRL_C_SCRIPT = """
import os, signal, sys
import shmreplay
from shmreplay.testing import table_toml
signal.signal(signal.SIGINT, lambda *a: print("parent got SIGINT", flush=True))
with shmreplay.Server(table_toml(), name=sys.argv[1]) as server:
    os.killpg(0, signal.SIGINT)  # what a Ctrl-C in the terminal does to the foreground group
    signal.sigtimedwait([signal.SIGCHLD], 1.0)
    print("daemon running:", server.running(), flush=True)
left = shmreplay.engine.instance.shm_objects(sys.argv[1])
print("stopped; left in /dev/shm:", len(left), flush=True)
"""


def test_a_ctrl_c_reaches_the_program_not_its_daemon():
    """The daemon runs in its own session: the terminal's SIGINT goes to the program, which
    decides when to stop it (after its own clients), not to the daemon first."""
    import subprocess
    import sys

    name = unique_name()
    out = subprocess.run(
        [sys.executable, "-c", _CTRL_C_SCRIPT, name],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # its own process group, so killpg(0) spares pytest
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "parent got SIGINT",
        "daemon running: True",
        "stopped; left in /dev/shm: 0",
    ], out.stdout + out.stderr


_OWNER_SCRIPT = """
import sys, time
import shmreplay
from shmreplay.testing import table_toml
s = shmreplay.Server(table_toml(), sys.argv[1], stop_with_owner=sys.argv[2] == "1")
with shmreplay.attach(sys.argv[1]) as c:
    c.table("replay").insert({"obs": [1.0] * 8, "action": 1, "reward": 0.5, "done": False})
    c.table("replay").flush()
print(s.pid, flush=True)
time.sleep(600)  # killed by the test
"""


def _start_owner(name: str, stop_with_owner: bool):
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", _OWNER_SCRIPT, name, "1" if stop_with_owner else "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(proc.communicate(timeout=30)[1])
    return proc, int(line)


def _wait_gone(pid: int, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_program_killed_by_sigkill_leaves_no_daemon_behind():
    """Server's daemon watches the process that started it: kill -9 of the program (no atexit,
    no finally) stops the daemon cleanly within a second, removing its shared memory."""
    name = unique_name()
    proc, daemon_pid = _start_owner(name, stop_with_owner=True)
    try:
        assert process_alive(daemon_pid) and shm_objects(name) != []
        proc.kill()
        proc.wait(timeout=30)
        assert _wait_gone(daemon_pid, 10.0), "the daemon outlived the program that started it"
        assert shm_objects(name) == []
        assert InstanceRecord.read(name) is None
    finally:
        proc.kill()
        if process_alive(daemon_pid):
            os.kill(daemon_pid, signal.SIGTERM)
            _wait_gone(daemon_pid, 15.0)


def test_stop_with_owner_false_lets_the_daemon_outlive_its_program():
    name = unique_name()
    proc, daemon_pid = _start_owner(name, stop_with_owner=False)
    try:
        proc.kill()
        proc.wait(timeout=30)
        assert not _wait_gone(daemon_pid, 1.0), "the daemon stopped with its program"
        with shmreplay.attach(name) as c:  # its table is still served, with its item
            assert c.table("replay").info().current_size == 1
    finally:
        proc.kill()
        os.kill(daemon_pid, signal.SIGTERM)
        assert _wait_gone(daemon_pid, 15.0)
    assert shm_objects(name) == []


def test_the_files_server_name_is_the_instance_name_unless_one_is_given(tmp_path):
    """Server("tables.toml") serves the file's [server] name, so that another script's
    attach(name) finds it; name= overrides it; a file without one gets a unique name."""
    own = unique_name()
    path = tmp_path / "tables.toml"
    path.write_text(f'[server]\nname = "{own}"\n' + table_toml())
    with shmreplay.Server(str(path)) as server:
        assert server.name == own
        with shmreplay.attach(own) as c:
            assert "replay" in c.tables
    other = unique_name()
    with shmreplay.Server(path.read_text(), other) as server:
        assert server.name == other and InstanceRecord.read(own) is None
    with shmreplay.Server(table_toml()) as server:
        assert server.name.startswith("server-")
    assert shm_objects(own) == [] and shm_objects(other) == []
