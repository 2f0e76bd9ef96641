"""Prometheus exposition of the daemon's info record, and the HTTP server that serves it.

The exposition is checked with a parser written here from the format's rules (text format 0.0.4),
not with the writer's own helpers: every line is a ``# HELP``, a ``# TYPE`` or a sample
``name{label="value",...} number``, and each family's HELP and TYPE come before its samples.
"""

from __future__ import annotations

import http.client
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import psutil
import pytest

import shmreplay
from shmreplay.daemon import metrics
from shmreplay.daemon.metrics import CONTENT_TYPE, MetricsServer, render
from shmreplay.errors import ShmReplayError
from shmreplay.testing import table_toml

# -- a parser for the text format ------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _number(text: str) -> float:
    return {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(text) or float(text)


def _labels(text: str) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m is not None, f"bad label set at {text[pos:]!r}"
        out[m[1]] = re.sub(r"\\[\\\"n]", lambda e: _UNESCAPE[e[0]], m[2])
        pos = m.end()
    return out


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(TYPE per family, samples). Asserts the rules of the format while parsing."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: list[tuple[str, dict[str, str], float]] = []
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in helps, f"second HELP for {name}"
            helps.add(name)
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and name not in types, line
            assert kind in ("counter", "gauge"), line
            types[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m is not None, f"not a sample line: {line!r}"
            name = m[1]
            assert name == current and name in types, f"{name} outside its family"
            samples.append((name, _labels(m[2] or ""), _number(m[3])))
    return types, samples


def value(samples, name: str, **labels: str) -> float | None:
    found = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


# -- an info record as Daemon.info() returns it --------------------------------------------------


def _table(**over) -> dict:
    t = {
        "name": "replay",
        "max_size": 1000,
        "current_size": 640,
        "max_times_sampled": 0,
        "sampler": {"kind": "prioritized", "priority_exponent": 0.6},
        "remover": {"kind": "fifo"},
        "rate_limiter": {
            "kind": "sample_to_insert_ratio",
            "samples_per_insert": 8.0,
            "min_size_to_sample": 100,
            "min_diff": -200.0,
            "max_diff": 200.0,
            "inserts": 700,
            "samples": 5000,
            "deletes": 60,
            "insert_blocked": True,
            "sample_blocked": False,
        },
        "signature": {"obs": {"shape": [8], "dtype": "float32"}},
        "num_unique_samples": 600,
        "total_inserted": 700,
        "total_sampled": 5000,
        "total_evicted": 60,
        "resets": 1,
        "repairs": 2,
        "clients": 3,
        "segment_bytes": 1 << 20,
        "data_bytes": 32000,
        "max_priority": 2.5,
        "min_priority": 0.125,
    }
    t.update(over)
    return t


INFO = {
    "ok": True,
    "name": "default",
    "pid": 1234,
    "format_version": 3,
    "clients": [{"pid": 10, "channel": 0}, {"pid": 11, "channel": 1}],
    "tables": {
        "replay": _table(),
        "recent": _table(
            name="recent",
            current_size=0,
            total_inserted=0,
            max_priority=None,  # empty: no extremes
            min_priority=None,
            sampler={"kind": "uniform"},
        ),
    },
}

# (metric, type, table, expected value) for the "replay" table of INFO.
EXPECTED = [
    ("shmreplay_table_current_size", "gauge", 640),
    ("shmreplay_table_max_size", "gauge", 1000),
    ("shmreplay_table_inserted_total", "counter", 700),
    ("shmreplay_table_sampled_total", "counter", 5000),
    ("shmreplay_table_evicted_total", "counter", 60),
    ("shmreplay_table_unique_samples", "gauge", 600),
    ("shmreplay_table_clients", "gauge", 3),
    ("shmreplay_table_segment_bytes", "gauge", 1 << 20),
    ("shmreplay_table_data_bytes", "gauge", 32000),
    ("shmreplay_table_repairs_total", "counter", 2),
    ("shmreplay_table_resets_total", "counter", 1),
    ("shmreplay_table_max_priority", "gauge", 2.5),
    ("shmreplay_table_min_priority", "gauge", 0.125),
    ("shmreplay_rate_limiter_inserts_total", "counter", 700),
    ("shmreplay_rate_limiter_samples_total", "counter", 5000),
    ("shmreplay_rate_limiter_deletes_total", "counter", 60),
    ("shmreplay_rate_limiter_insert_blocked", "gauge", 1),
    ("shmreplay_rate_limiter_sample_blocked", "gauge", 0),
    ("shmreplay_rate_limiter_samples_per_insert", "gauge", 8.0),
    ("shmreplay_rate_limiter_min_size_to_sample", "gauge", 100),
]


@pytest.mark.parametrize(("name", "kind", "expected"), EXPECTED)
def test_table_values(name: str, kind: str, expected: float) -> None:
    types, samples = parse(render(INFO))
    assert types[name] == kind
    assert value(samples, name, instance="default", table="replay") == expected


def test_every_family_is_named_and_typed_by_the_conventions() -> None:
    types, samples = parse(render(INFO))
    for name, kind in types.items():
        assert name.startswith("shmreplay_")
        assert name.endswith("_total") == (kind == "counter"), name
    for name, labels, _ in samples:
        assert labels["instance"] == "default"
        assert name == "shmreplay_clients" or labels["table"] in INFO["tables"]


def test_instance_series_and_kinds() -> None:
    _, samples = parse(render(INFO))
    assert value(samples, "shmreplay_clients", instance="default") == 2
    labels = {lab["table"]: lab for n, lab, _ in samples if n == "shmreplay_table_info"}
    assert labels["replay"]["sampler"] == "prioritized"
    assert labels["recent"]["sampler"] == "uniform"
    assert labels["replay"]["remover"] == "fifo"
    assert labels["replay"]["rate_limiter"] == "sample_to_insert_ratio"


def test_an_empty_table_has_no_priority_extremes() -> None:
    _, samples = parse(render(INFO))
    assert value(samples, "shmreplay_table_current_size", table="recent") == 0
    assert value(samples, "shmreplay_table_max_priority", table="recent") is None
    assert value(samples, "shmreplay_table_min_priority", table="recent") is None


def test_no_tables_no_empty_families() -> None:
    types, samples = parse(render({"name": "x", "clients": [], "tables": {}}))
    assert types == {"shmreplay_clients": "gauge"}
    assert samples == [("shmreplay_clients", {"instance": "x"}, 0)]


def test_label_values_are_escaped() -> None:
    name = 'we"ird\\name\nline'
    _, samples = parse(render({**INFO, "name": name}))
    assert value(samples, "shmreplay_clients", instance=name) == 2


def test_special_floats() -> None:
    limiter = {**_table()["rate_limiter"], "samples_per_insert": math.inf}
    info = {"name": "x", "tables": {"t": {"rate_limiter": limiter, "max_priority": math.nan}}}
    text = render(info)
    assert 'shmreplay_rate_limiter_samples_per_insert{instance="x",table="t"} +Inf' in text
    _, samples = parse(text)
    assert math.isnan(value(samples, "shmreplay_table_max_priority", table="t"))


def test_matches_a_real_daemons_info(daemon_factory) -> None:
    """The record of a live daemon, with items inserted and sampled, renders to the same numbers
    (and every field the brief names is present)."""
    d = daemon_factory(
        table_toml("replay", sampler='{ kind = "prioritized", priority_exponent = 1.0 }')
        + table_toml("other")
    )
    client = shmreplay.attach(d.name, timeout=10.0)
    try:
        table = client.table("replay")
        n = 50
        step = {
            "obs": np.zeros((n, 8), np.float32),
            "action": np.arange(n),
            "reward": np.zeros(n, np.float32),
            "done": np.zeros(n, bool),
        }
        table.insert_batch(step, priorities=np.linspace(0.5, 3.0, n))
        table.flush()
        table.sample(16, timeout=10.0)
        info = client.server_info()
    finally:
        client.close()
    _, samples = parse(render(info))
    for tname, t in info["tables"].items():
        labels = {"instance": d.name, "table": tname}
        assert value(samples, "shmreplay_table_current_size", **labels) == t["current_size"]
        assert value(samples, "shmreplay_table_inserted_total", **labels) == t["total_inserted"]
        assert value(samples, "shmreplay_table_sampled_total", **labels) == t["total_sampled"]
        lim = t["rate_limiter"]
        for key in ("inserts", "samples", "deletes"):
            assert value(samples, f"shmreplay_rate_limiter_{key}_total", **labels) == lim[key]
    labels = {"instance": d.name, "table": "replay"}
    assert value(samples, "shmreplay_table_current_size", **labels) == n
    assert value(samples, "shmreplay_table_sampled_total", **labels) == 16
    assert value(samples, "shmreplay_table_max_priority", **labels) == 3.0
    assert value(samples, "shmreplay_table_min_priority", **labels) == 0.5
    assert value(samples, "shmreplay_table_max_priority", instance=d.name, table="other") is None


# -- the HTTP server ---------------------------------------------------------------------------


@pytest.fixture
def servers() -> Iterator[list[MetricsServer]]:
    """Servers a test starts; closed afterwards whatever happened, then no thread may remain."""
    started: list[MetricsServer] = []
    yield started
    for s in started:
        s.close()
    assert not [t for t in threading.enumerate() if t.name == "metrics"]


def _start(servers: list[MetricsServer], get_info=lambda: INFO, **kw) -> MetricsServer:
    s = MetricsServer(get_info, **{"port": 0, **kw})
    servers.append(s)
    return s.start()


def _get(server: MetricsServer, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    host = server._server.server_address[0]
    conn = http.client.HTTPConnection(host, server.port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


def test_get_metrics(servers) -> None:
    s = _start(servers)
    assert s.port > 0
    status, ctype, body = _get(s, "/metrics")
    assert status == 200
    assert ctype == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert body.decode() == render(INFO)
    assert _get(s, "/metrics?name[]=x")[0] == 200  # Prometheus may add query parameters


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/", "/metricsx", "/favicon.ico"])
def test_other_paths_are_404(servers, path: str) -> None:
    assert _get(_start(servers), path)[0] == 404


def test_head_and_other_methods(servers) -> None:
    s = _start(servers)
    status, ctype, body = _get(s, "/metrics", "HEAD")
    assert (status, ctype, body) == (200, CONTENT_TYPE, b"")
    assert _get(s, "/metrics", "POST")[0] == 501


def test_binds_loopback_by_default(servers) -> None:
    s = _start(servers)
    assert s._server.socket.getsockname()[0] == "127.0.0.1"
    assert s.url == f"http://127.0.0.1:{s.port}/metrics"


def test_binds_all_interfaces_only_when_asked(servers) -> None:
    s = _start(servers, host="0.0.0.0")
    assert s._server.socket.getsockname()[0] == "0.0.0.0"


def test_ipv6_loopback(servers) -> None:
    try:
        s = _start(servers, host="::1")
    except ShmReplayError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    assert s._server.socket.getsockname()[0] == "::1"
    assert s.url == f"http://[::1]:{s.port}/metrics"
    assert _get(s, "/metrics")[0] == 200


def test_close_stops_the_thread_and_frees_the_port(servers) -> None:
    s = _start(servers)
    port = s.port
    s.close()
    s.close()  # idempotent
    assert not [t for t in threading.enumerate() if t.name == "metrics"]
    with pytest.raises(RuntimeError, match="not started"):
        s.port  # noqa: B018 (the property raises)
    again = _start(servers, port=port)  # the port is free again
    assert again.port == port


def test_context_manager() -> None:
    with MetricsServer(lambda: INFO, port=0) as s:
        assert _get(s, "/metrics")[0] == 200
    assert not [t for t in threading.enumerate() if t.name == "metrics"]


def test_port_in_use_is_a_clear_error(servers) -> None:
    taken = _start(servers)
    with pytest.raises(ShmReplayError, match="metrics_port"):
        MetricsServer(lambda: INFO, port=taken.port).start()


def test_a_failing_info_answers_500_and_the_server_lives_on(servers, caplog) -> None:
    broken = {"yes": True}

    def get_info() -> dict:
        if broken["yes"]:
            raise RuntimeError("table went away")
        return INFO

    s = _start(servers, get_info=get_info)
    with caplog.at_level(logging.DEBUG, logger="shmreplay"):
        assert _get(s, "/metrics")[0] == 500
        assert _get(s, "/metrics")[0] == 500
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once, not once per scrape
    broken["yes"] = False
    assert _get(s, "/metrics")[0] == 200


def test_an_idle_connection_does_not_hold_close(servers, monkeypatch) -> None:
    """A client that connects and sends nothing holds the single thread only until the request
    timeout: close() still returns promptly."""
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT_S", 0.2)
    s = _start(servers)
    idle = socket.create_connection(("127.0.0.1", s.port))
    try:
        time.sleep(0.3)  # the server has accepted it and is waiting for a request line
        t0 = time.monotonic()
        s.close()
        assert time.monotonic() - t0 < 2.0
    finally:
        idle.close()


def test_the_daemon_serves_metrics_on_localhost_when_metrics_port_is_set(daemon_factory) -> None:
    """[server] metrics_port: `shmreplay serve` answers GET /metrics on 127.0.0.1 only."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = daemon_factory(f"[server]\nmetrics_port = {port}\n" + table_toml())
    with shmreplay.attach(d.name) as client:
        t = client.table("replay")
        t.insert({"obs": [0.0] * 8, "action": 1, "reward": 0.5, "done": False})
        t.flush()
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "metrics server never came up"
                time.sleep(0.05)
        body = resp.read().decode()
        conn.close()
    assert resp.status == 200
    assert f'shmreplay_table_current_size{{instance="{d.name}",table="replay"}} 1' in body
    listening = [
        c.laddr
        for c in psutil.Process(d.proc.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
