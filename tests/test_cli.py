"""The command line, run as a user would run it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from shmreplay.engine.instance import shm_objects
from shmreplay.testing import table_toml


def shmreplay_cli(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "shmreplay", *args], capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_the_commands():
    r = shmreplay_cli("--help")
    assert r.returncode == 0
    for cmd in ("serve", "info", "stop", "validate", "gc", "demo"):
        assert cmd in r.stdout
    r = shmreplay_cli("serve", "--help")
    assert "--tables" in r.stdout and "SIGTERM" in r.stdout


def test_validate_prints_memory_and_rejects_mistakes(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(table_toml(max_size=1000))
    r = shmreplay_cli("validate", str(good))
    assert r.returncode == 0, r.stderr
    assert "table 'replay'" in r.stdout and "OK" in r.stdout and "free" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(table_toml(sampler='{ kind = "prioritised" }'))
    r = shmreplay_cli("validate", str(bad))
    assert r.returncode == 1
    assert "prioritised" in r.stderr and "prioritized" in r.stderr and "Traceback" not in r.stderr


def _refuse_constant(token: str):
    raise AssertionError(f"{token} is not JSON (strict parsers refuse it)")


def test_info_and_stop(daemon_factory):
    d = daemon_factory(table_toml())
    r = shmreplay_cli("info", "--name", d.name, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout, parse_constant=_refuse_constant)  # strict: no Infinity, NaN
    assert data["tables"]["replay"]["max_size"] == 1000 and data["pid"] == d.proc.pid
    # A min_size limiter's min_diff is -inf: strict JSON says null.
    assert data["tables"]["replay"]["rate_limiter"]["min_diff"] is None, data["tables"]["replay"]
    r = shmreplay_cli("info", "--name", d.name)
    assert "replay: 0/1000 items" in r.stdout
    r = shmreplay_cli("stop", "--name", d.name)
    assert r.returncode == 0 and "stopped" in r.stdout
    assert d.proc.wait(10) == 0
    assert shm_objects(d.name) == []
    r = shmreplay_cli("info", "--name", d.name)
    assert r.returncode == 1 and "no shmreplay daemon" in r.stderr


def test_gc_removes_a_dead_instance_and_spares_a_live_one(daemon_factory):
    dead = daemon_factory(table_toml())
    live = daemon_factory(table_toml())
    os.kill(dead.proc.pid, signal.SIGKILL)
    dead.proc.wait()
    assert shm_objects(dead.name)
    r = shmreplay_cli("gc", "--name", dead.name, "--yes")
    assert r.returncode == 0 and "removed" in r.stdout
    assert shm_objects(dead.name) == []
    r = shmreplay_cli("gc", "--name", live.name)
    assert "is running: left alone" in r.stdout
    assert len(shm_objects(live.name)) == 4


def test_demo_runs_actors_and_a_learner_and_leaves_nothing_behind():
    r = shmreplay_cli("demo", "--duration", "2", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rates = [line for line in r.stdout.splitlines() if "inserts/s" in line]
    assert len(rates) >= 1
    inserts = [float(line.split("inserts/s")[1].split()[0].replace(",", "")) for line in rates]
    assert max(inserts) > 0  # actors did insert
    assert "objects left in /dev/shm: 0" in r.stdout + r.stderr
    assert not [e for e in shm_objects() if ".demo-" in e]


def test_info_watch_shows_rates_and_reset_empties_a_table(daemon_factory):
    import shmreplay

    d = daemon_factory(table_toml())
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        row = {"obs": [0.0] * 8, "action": 1, "reward": 0.5, "done": False}
        watcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shmreplay",
                "info",
                "--name",
                d.name,
                "--watch",
                "0.5",
                "--json",
            ],
            stdout=subprocess.PIPE,
            text=True,
            # Ctrl-C as in a terminal, even when the tests run as a background job (whose
            # SIGINT is ignored, and that is inherited)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            first = json.loads(watcher.stdout.readline(), parse_constant=_refuse_constant)
            for _ in range(200):
                t.insert(row)
            t.flush()
            second = json.loads(watcher.stdout.readline(), parse_constant=_refuse_constant)
        finally:
            watcher.send_signal(signal.SIGINT)
            watcher.wait(10)
        assert first["tables"]["replay"]["inserts_per_s"] is None
        assert second["tables"]["replay"]["inserts_per_s"] > 0
        assert second["tables"]["replay"]["current_size"] == 200
        r = shmreplay_cli("reset", "replay", "--name", d.name, "--yes")
        assert r.returncode == 0, r.stderr
        assert t.info().current_size == 0 and t.info().rate_limiter.inserts == 0
        r = shmreplay_cli("reset", "nope", "--name", d.name, "--yes")
        assert r.returncode == 1 and "no table 'nope'" in r.stderr and "replay" in r.stderr


def test_commands_give_up_on_a_stopped_daemon_after_their_timeout(daemon_factory):
    """A daemon that does not answer (here SIGSTOPped) is not reported as "no daemon running":
    info, checkpoint and stop give up after --timeout and say it is alive but not answering
    (and may still carry the request out: here the shutdown, once resumed)."""
    import time

    d = daemon_factory(table_toml())
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        for args in (("info",), ("checkpoint",), ("stop",)):
            t0 = time.monotonic()
            r = shmreplay_cli(*args, "--name", d.name, "--timeout", "1")
            took = time.monotonic() - t0
            assert r.returncode == 1 and took < 8, (args, took, r.stderr)
            assert "within 1.0 s" in r.stderr and "alive but" in r.stderr, (args, r.stderr)
            assert "no shmreplay daemon" not in r.stderr and "Traceback" not in r.stderr
            assert "may still carry the request out" in r.stderr
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    assert d.proc.wait(10) == 0  # the shutdown that timed out is carried out once resumed


def test_the_version_is_printed_by_both_flags():
    from importlib.metadata import version

    for flag in ("--version", "-V"):
        r = shmreplay_cli(flag)
        assert r.returncode == 0 and version("shmreplay") in r.stdout, (flag, r.stdout, r.stderr)
