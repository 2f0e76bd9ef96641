"""Prometheus metrics: the daemon's ``info()`` record in the text exposition format 0.0.4.

:func:`render` turns the record ``Daemon.info()`` returns (the same one ``shmreplay info --json``
prints, so the CLI and the metrics never disagree) into exposition text; :class:`MetricsServer`
serves it at ``GET /metrics`` from background threads, bound to 127.0.0.1 unless told
otherwise, because the numbers describe a training run and need not leave the host.

Every series carries ``instance`` (the shmreplay instance name, not Prometheus' own target label:
Prometheus renames a clashing scraped label to ``exported_instance`` unless the scrape config says
``honor_labels: true``) and, for table series, ``table``. Monotonic counts end in ``_total``.
Rate-limiter counters restart from zero at ``table.reset()``; Prometheus' ``rate()`` treats that
as a counter reset, as it does a daemon restart. Priority extremes are omitted while a table is
empty. An example::

    # HELP shmreplay_table_inserted_total Items committed to the table since the daemon started.
    # TYPE shmreplay_table_inserted_total counter
    shmreplay_table_inserted_total{instance="default",table="replay"} 123456

Usage, as the daemon does it::

    server = MetricsServer(daemon.info, port=config.server.metrics_port).start()
    ...
    server.close()                     # idempotent; joins the thread
"""

from __future__ import annotations

import http.server
import logging
import math
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..errors import ShmReplayError

log = logging.getLogger("shmreplay")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "shmreplay_"
# A scrape that stalls (a client that connects and sends nothing) holds its own thread this long
# at most; other scrapes are served meanwhile by threads of their own.
REQUEST_TIMEOUT_S = 5.0
# Connections served at once; more are closed at once (a flood of idle connections must cost
# neither unbounded threads nor the scrapes of Prometheus).
MAX_CONNECTIONS = 16

# (name without prefix, type, help, path into a table's info dict). Counters end in _total.
_TABLE_METRICS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("table_current_size", "gauge", "Items in the table now.", ("current_size",)),
    ("table_max_size", "gauge", "Items the table holds before evicting.", ("max_size",)),
    (
        "table_inserted_total",
        "counter",
        "Items committed to the table since the daemon started.",
        ("total_inserted",),
    ),
    (
        "table_sampled_total",
        "counter",
        "Items returned by samples since the daemon started.",
        ("total_sampled",),
    ),
    (
        "table_evicted_total",
        "counter",
        "Items removed by the remover to make room since the daemon started.",
        ("total_evicted",),
    ),
    (
        "table_unique_samples",
        "gauge",
        "Items in the table that have been sampled at least once.",
        ("num_unique_samples",),
    ),
    ("table_clients", "gauge", "Processes attached to the table.", ("clients",)),
    (
        "table_segment_bytes",
        "gauge",
        "Bytes of the table's shared-memory segment.",
        ("segment_bytes",),
    ),
    ("table_data_bytes", "gauge", "Bytes of the segment holding item data.", ("data_bytes",)),
    (
        "table_repairs_total",
        "counter",
        "Index rebuilds after a process died holding the table mutex.",
        ("repairs",),
    ),
    ("table_resets_total", "counter", "Calls of table.reset().", ("resets",)),
    (
        "table_max_priority",
        "gauge",
        "Largest priority in the table (absent while it is empty).",
        ("max_priority",),
    ),
    (
        "table_min_priority",
        "gauge",
        "Smallest priority in the table (absent while it is empty).",
        ("min_priority",),
    ),
    (
        "rate_limiter_inserts_total",
        "counter",
        "Inserts counted by the rate limiter (zeroed by table.reset()).",
        ("rate_limiter", "inserts"),
    ),
    (
        "rate_limiter_samples_total",
        "counter",
        "Samples counted by the rate limiter (zeroed by table.reset()).",
        ("rate_limiter", "samples"),
    ),
    (
        "rate_limiter_deletes_total",
        "counter",
        "Deletions counted by the rate limiter (zeroed by table.reset()).",
        ("rate_limiter", "deletes"),
    ),
    (
        "rate_limiter_insert_blocked",
        "gauge",
        "1 while the rate limiter holds inserts back, else 0.",
        ("rate_limiter", "insert_blocked"),
    ),
    (
        "rate_limiter_sample_blocked",
        "gauge",
        "1 while the rate limiter holds samples back, else 0.",
        ("rate_limiter", "sample_blocked"),
    ),
    (
        "rate_limiter_samples_per_insert",
        "gauge",
        "The rate limiter's target ratio of samples to inserts.",
        ("rate_limiter", "samples_per_insert"),
    ),
    (
        "rate_limiter_min_size_to_sample",
        "gauge",
        "Items the table needs before sampling may start.",
        ("rate_limiter", "min_size_to_sample"),
    ),
)


def _escape_label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: Any) -> str | None:
    """A sample value as the format spells it; None when there is nothing to report."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    x = float(value)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(x)


def _labels(**labels: Any) -> str:
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items()) + "}"


def _lookup(d: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, Mapping) or key not in d:
            return None
        d = d[key]
    return d


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> Iterator[str]:
    if samples:  # a family with no sample is left out entirely, HELP and TYPE included
        yield f"# HELP {PREFIX}{name} {_escape_help(help_text)}"
        yield f"# TYPE {PREFIX}{name} {kind}"
        yield from samples


def render(info: Mapping[str, Any]) -> str:
    """The exposition text of one ``Daemon.info()`` record (``name``, ``clients``, ``tables``).

    Pure and cheap (a few hundred lines for a dozen tables); missing keys are skipped rather than
    reported as zero, so an older or newer info record still renders.
    """
    instance = info.get("name", "")
    tables: Mapping[str, Mapping[str, Any]] = info.get("tables") or {}
    lines: list[str] = []

    clients = info.get("clients")
    if clients is not None:
        sample = f"{PREFIX}clients{_labels(instance=instance)} {len(clients)}"
        lines += _family("clients", "gauge", "Processes attached to the instance.", [sample])

    # Kinds as labels of a constant-1 series: the usual way to expose a string to Prometheus.
    kinds = []
    for tname, t in tables.items():
        sampler = _lookup(t, ("sampler", "kind"))
        remover = _lookup(t, ("remover", "kind"))
        limiter = _lookup(t, ("rate_limiter", "kind"))
        labels = _labels(
            instance=instance,
            table=tname,
            sampler=sampler or "",
            remover=remover or "",
            rate_limiter=limiter or "",
        )
        kinds.append(f"{PREFIX}table_info{labels} 1")
    lines += _family("table_info", "gauge", "Selectors and rate limiter of the table.", kinds)

    for name, kind, help_text, path in _TABLE_METRICS:
        samples = []
        for tname, t in tables.items():
            value = _format_value(_lookup(t, path))
            if value is not None:
                samples.append(f"{PREFIX}{name}{_labels(instance=instance, table=tname)} {value}")
        lines += _family(name, kind, help_text, samples)
    return "\n".join(lines) + "\n"


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    # A thread per connection, so that an idle one delays nobody; close() does not wait for
    # them (each ends within REQUEST_TIMEOUT_S).
    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("metrics: %d connections open; closing %s", MAX_CONNECTIONS, client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS query that can stall start-up
        # for seconds on a host with broken DNS; nothing here uses the name.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a scraper that hangs up is not news.
        log.debug("metrics: error serving %s", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Serves :func:`render` of ``get_info()`` at ``GET /metrics``; any other path is a 404.

    ``start()`` binds (``port=0`` picks a free port, read back from :attr:`port`) and starts a
    daemon thread, which serves each connection from a thread of its own (at most
    MAX_CONNECTIONS at once, each for at most REQUEST_TIMEOUT_S without a request); a port
    already in use raises :class:`ShmReplayError` saying so (the daemon then serves its tables
    without metrics). Each scrape calls ``get_info()``, from several threads at once: it must be
    thread-safe (``Daemon.info`` is: the control server's workers call it too).
    A ``get_info()`` that raises answers 500 and the daemon goes on.
    ``close()`` stops the thread, waits for it and closes the socket; calling it twice is fine.
    The default host is 127.0.0.1: pass ``host="0.0.0.0"`` (or ``"::"``) to expose the metrics
    to other machines.
    """

    _server: _Server | None = None
    _thread: threading.Thread | None = None

    def __init__(
        self,
        get_info: Callable[[], Mapping[str, Any]],
        port: int,
        host: str = "127.0.0.1",
    ) -> None:
        self.get_info = get_info
        self.host = host
        self.requested_port = port
        self._failed_once = False

    @property
    def port(self) -> int:
        """The bound port (the one the kernel chose when asked for port 0)."""
        if self._server is None:
            raise RuntimeError("MetricsServer is not started; call start() first")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> MetricsServer:
        """Bind and serve in a background thread. Returns self."""
        if self._server is not None:
            return self
        cls = _Server6 if ":" in self.host else _Server
        try:
            server = cls((self.host, self.requested_port), self._handler_class())
        except OSError as exc:
            raise ShmReplayError(
                f"cannot serve metrics on {self.host}:{self.requested_port}: "
                f"{exc.strerror or exc}; choose another [server] metrics_port or stop the "
                "process using that port"
            ) from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},  # how quickly close() is noticed
            name="metrics",
            daemon=True,
        )
        self._thread.start()
        log.info("serving Prometheus metrics at %s", self.url)
        return self

    def close(self) -> None:
        """Stop serving, join the thread, close the socket. Idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        if thread is not None:
            server.shutdown()  # returns once serve_forever has finished the request in progress
            thread.join()
        server.server_close()
        self._server = self._thread = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scrape(self) -> bytes:
        return render(self.get_info()).encode()

    def _scrape_failed(self) -> None:
        # Once as a warning with the traceback: a broken info() would otherwise log every scrape.
        if not self._failed_once:
            self._failed_once = True
            log.warning("metrics scrape failed; answering 500", exc_info=True)
        else:
            log.debug("metrics scrape failed again", exc_info=True)

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_S
            server_version = "shmreplay-metrics"

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

            def _answer(self, send_body: bool) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self._send(404, b"not found; metrics are at /metrics\n", send_body)
                    return
                try:
                    body = owner._scrape()
                except Exception:
                    owner._scrape_failed()
                    self._send(500, b"the daemon could not report its state\n", send_body)
                    return
                self._send(200, body, send_body, CONTENT_TYPE)

            def _send(
                self,
                code: int,
                body: bytes,
                send_body: bool,
                content_type: str = "text/plain; charset=utf-8",
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                # Scrapes every 15 s would flood the daemon's log (and the journal) at INFO.
                log.debug("metrics: %s - %s", self.address_string(), format % args)

        return Handler
