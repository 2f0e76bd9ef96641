"""The ``shmreplay`` command line: serve, info, stop, validate, gc, demo."""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import replace

import click

from .config import load_config
from .errors import ShmReplayError

EXIT_S = 30.0  # how long `stop` waits for the exit once the daemon closed its control socket
LOG_FORMAT = "%(asctime)s shmreplay[%(process)d] %(levelname)s %(message)s"


class _Group(click.Group):
    """Turns our errors into one clean line and exit status 1 instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ShmReplayError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


def _valid_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--name of every command: the same check as [server] name, Server(name=), attach()."""
    from .config import check_instance_name
    from .errors import ConfigError

    if value is None:
        return None
    try:
        return check_instance_name(value, "--name")
    except ConfigError as exc:
        raise click.BadParameter(str(exc).removeprefix("--name: ")) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(None, "-V", "--version", package_name="shmreplay")
def main() -> None:
    """Experience replay for reinforcement learning over POSIX shared memory.

    Start a daemon with `shmreplay serve --tables tables.toml`, then call
    `shmreplay.attach(NAME)` from your actors and learners. `shmreplay demo` shows it all.
    """


@main.command()
@click.option(
    "--tables",
    "tables_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The tables.toml file describing the instance and its tables.",
)
@click.option(
    "--name", default=None, callback=_valid_name, help="Instance name (overrides [server] name)."
)
@click.option(
    "--fresh",
    is_flag=True,
    help="Discard tables a killed daemon of this instance left in /dev/shm (default: adopt "
    "them, keeping every committed item).",
)
@click.option(
    "--restore",
    "restore_path",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Restore this checkpoint directory (default: the latest complete one in "
    "[server] checkpoint_dir, if set).",
)
@click.option(
    "--truncate",
    is_flag=True,
    help="Restore only the newest items of a checkpoint larger than a table's max_size.",
)
@click.option(
    "--owner-pid",
    type=click.IntRange(min=1),
    default=None,
    metavar="PID",
    help="Stop as on SIGTERM once process PID has exited (shmreplay.Server passes its own "
    "process, so that a killed program leaves no daemon behind).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
def serve(
    tables_path: str,
    name: str | None,
    fresh: bool,
    restore_path: str | None,
    truncate: bool,
    owner_pid: int | None,
    verbose: bool,
) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT.

    Creates every table in /dev/shm, writes the instance record that attach() finds, and serves
    the control socket. On SIGTERM/SIGINT it wakes every waiting client with an error and
    removes all its shared memory. If a daemon of the same instance was killed (kill -9, OOM),
    its tables are adopted: checked against tables.toml, repaired, served with every item they
    held. Logs go to stderr.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)
    from .daemon.lifecycle import serve as run_daemon

    config = load_config(tables_path)
    if name is not None:
        config = replace(config, server=replace(config.server, name=name))
    sys.exit(
        run_daemon(
            config, fresh=fresh, restore=restore_path, truncate=truncate, owner_pid=owner_pid
        )
    )


@main.command()
@click.option(
    "--name", default="default", show_default=True, callback=_valid_name, help="Instance name."
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the full record as strict JSON (an infinite or NaN number is null).",
)
@click.option(
    "--watch",
    type=float,
    default=None,
    metavar="SECONDS",
    help="Print again every SECONDS with insert and sample rates, until Ctrl-C.",
)
@click.option(
    "--timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds to wait for the daemon's answer.",
)
def info(name: str, as_json: bool, watch: float | None, timeout: float) -> None:
    """Show the instance's tables: size, rates, rate limiter (and which side it blocks),
    memory, clients. While the daemon restores a checkpoint, says so, with its progress."""
    import time

    data = _request(name, "info", timeout=timeout)
    data.pop("ok", None)
    if as_json and watch is None:
        click.echo(_strict_json(data, indent=2))
        return
    _print_info(data, None, 0.0, as_json)
    while watch is not None:
        before, t0 = data, time.monotonic()
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return
        data = _request(name, "info", timeout=timeout)
        data.pop("ok", None)
        _print_info(data, before, time.monotonic() - t0, as_json)


def _finite(value):
    """``value`` with every infinite or NaN float replaced by None (JSON's null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _strict_json(data: dict, indent: int | None = None) -> str:
    """JSON that strict parsers accept (JavaScript's JSON.parse, monitoring agents): no
    Infinity or NaN tokens; a limiter's unbounded ``min_diff`` is null."""
    return json.dumps(_finite(data), indent=indent, default=str, allow_nan=False)


def _print_info(data: dict, before: dict | None, dt: float, as_json: bool) -> None:
    from .engine.shm import format_bytes

    def rate(tname: str, key: str) -> float | None:
        if before is None or tname not in before["tables"] or dt <= 0:
            return None
        return (data["tables"][tname][key] - before["tables"][tname][key]) / dt

    if as_json:
        for tname, t in data["tables"].items():
            t["inserts_per_s"] = rate(tname, "total_inserted")
            t["samples_per_s"] = rate(tname, "total_sampled")
        click.echo(_strict_json(data))
        return
    click.echo(f"instance {data['name']!r}  pid {data['pid']}  clients {len(data['clients'])}")
    state = data.get("state", "serving")
    if state != "serving":
        progress = data.get("progress") or {}
        line = f": {progress['line']}" if progress.get("line") else ""
        click.echo(f"  the daemon is {state}{line}")
    for tname, t in data["tables"].items():
        lim = t["rate_limiter"]
        blocked = [s for s in ("insert", "sample") if lim[f"{s}_blocked"]]
        ins, smp = rate(tname, "total_inserted"), rate(tname, "total_sampled")
        rates = "" if ins is None else f"{ins:,.0f} inserts/s, {smp:,.0f} samples/s, "
        click.echo(
            f"  {tname}: {t['current_size']}/{t['max_size']} items, {rates}"
            f"sampler {t['sampler']['kind']}, remover {t['remover']['kind']}, "
            f"inserted {t['total_inserted']}, sampled {t['total_sampled']}, "
            f"evicted {t['total_evicted']}, limiter {lim['kind']} "
            f"(inserts {lim['inserts']}, samples {lim['samples']}, deletes {lim['deletes']}"
            f"{', blocked: ' + '/'.join(blocked) if blocked else ''}), "
            f"memory {format_bytes(t['segment_bytes'])}"
        )


_TIMEOUT_HELP = (
    "Give up waiting after SECONDS (the daemon goes on); default: wait as long as the daemon "
    "reports progress."
)


@main.command()
@click.option(
    "--name", default="default", show_default=True, callback=_valid_name, help="Instance name."
)
@click.option("--timeout", type=float, default=None, metavar="SECONDS", help=_TIMEOUT_HELP)
def checkpoint(name: str, timeout: float | None) -> None:
    """Write a checkpoint of every table now (into [server] checkpoint_dir) and wait for it,
    showing its progress."""
    from .engine.shm import format_bytes

    with _ProgressBar("checkpoint") as bar:
        report = _request(name, "checkpoint", timeout=timeout, progress=bar.update)["checkpoint"]
    click.echo(
        f"checkpoint {report['path']}: {format_bytes(report['bytes'])} in "
        f"{report['seconds']:.2f} s, longest table lock hold "
        f"{report['longest_hold_s'] * 1e3:.1f} ms"
    )


@main.command()
@click.argument("table")
@click.option(
    "--name", default="default", show_default=True, callback=_valid_name, help="Instance name."
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def reset(table: str, name: str, yes: bool) -> None:
    """Remove every item of TABLE and zero its rate-limiter counters."""
    if not yes:
        click.confirm(f"remove every item of table {table!r} of instance {name!r}?", abort=True)
    _request(name, "reset", table=table)
    click.echo(f"table {table!r} reset")


def _request(name: str, op: str, timeout: float | None = 10.0, progress=None, **args) -> dict:
    """One request to the daemon of instance ``name`` over its control socket; waits at most
    ``timeout`` seconds (None: as long as the daemon reports progress) for the answer."""
    ctl, _ = _connect(name, timeout)
    try:
        return ctl.request(op, timeout=timeout, progress=progress, **args)
    finally:
        ctl.close()


def _connect(name: str, timeout: float | None):
    """A control connection to the daemon of ``name`` whose peer is checked against its
    record, and that record."""
    from .control import DEFAULT_TIMEOUT_S, ControlClient
    from .engine.instance import InstanceRecord, check_peer
    from .errors import DaemonNotRunning

    rec = InstanceRecord.read(name)
    if rec is None or not rec.alive():
        raise DaemonNotRunning(
            f"no shmreplay daemon named {name!r} is running; "
            f"start one with: shmreplay serve --tables tables.toml --name {name}"
        )
    ctl = ControlClient(rec.socket, timeout=DEFAULT_TIMEOUT_S if timeout is None else timeout)
    try:
        check_peer(ctl.sock, rec)  # the socket's peer must be the record's daemon (SO_PEERCRED)
    except BaseException:
        ctl.close()
        raise
    return ctl, rec


_NO_COUNT_FORMAT = "{desc} {elapsed}{postfix}"


class _ProgressBar:
    """A tqdm bar on stderr fed with the daemon's progress frames (``line``, ``done`` and
    ``total`` when it counts items); nothing is shown for an operation that ends at once."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.bar = None

    def update(self, progress: dict) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                desc=self.what,
                unit=" items",
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format=_NO_COUNT_FORMAT,  # until a line counts items
            )
        total, done = progress.get("total"), progress.get("done")
        if total is not None and done is not None:
            if self.bar.total != total:
                self.bar.bar_format = None  # tqdm's own: bar, count, rate, time left
                self.bar.reset(total=total)
            self.bar.n = done
        self.bar.set_postfix_str(str(progress.get("line", "")), refresh=False)
        self.bar.refresh()

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


@main.command()
@click.argument("table")
@click.option(
    "--name", default="default", show_default=True, callback=_valid_name, help="Instance name."
)
@click.option(
    "--kind",
    required=True,
    type=click.Choice(["min_size", "sample_to_insert_ratio", "queue", "stack", "custom"]),
    help="The limiter, with its options as in tables.toml.",
)
@click.option("--min-size", type=int, help="min_size: items before sampling may start.")
@click.option("--samples-per-insert", type=float, help="sample_to_insert_ratio, custom.")
@click.option("--min-size-to-sample", type=int, help="sample_to_insert_ratio, custom.")
@click.option(
    "--error-buffer",
    help="sample_to_insert_ratio: a number, or MIN_DIFF,MAX_DIFF.",
)
@click.option("--size", type=int, help="queue, stack: items that may wait.")
@click.option("--min-diff", type=float, help="custom (-inf allowed).")
@click.option("--max-diff", type=float, help="custom (inf allowed).")
def limiter(table: str, name: str, kind: str, error_buffer: str | None, **options) -> None:
    """Change TABLE's rate limiter while the daemon runs (counters are kept).

    Takes effect at once for every process, blocked callers included. For example, to pre-fill
    a table from offline data without the ratio limiter blocking the writer, then restore it:

    \b
      shmreplay limiter replay --kind min_size --min-size 1
      shmreplay limiter replay --kind sample_to_insert_ratio --samples-per-insert 8 \\
          --min-size-to-sample 1000 --error-buffer 200
    """
    spec: dict = {"kind": kind}
    spec.update({k: v for k, v in options.items() if v is not None})
    if error_buffer is not None:
        parts = [float(x) for x in error_buffer.split(",")]
        spec["error_buffer"] = parts[0] if len(parts) == 1 else parts
    state = _request(name, "set_rate_limiter", table=table, rate_limiter=spec)["rate_limiter"]
    click.echo(
        f"table {table!r}: rate limiter {state['kind']} (samples_per_insert "
        f"{state['samples_per_insert']:g}, min_size_to_sample {state['min_size_to_sample']}, "
        f"min_diff {state['min_diff']:g}, max_diff {state['max_diff']:g}); "
        f"inserts {state['inserts']}, samples {state['samples']}, deletes {state['deletes']}"
    )


@main.command()
@click.option(
    "--name", default="default", show_default=True, callback=_valid_name, help="Instance name."
)
@click.option("--timeout", type=float, default=None, metavar="SECONDS", help=_TIMEOUT_HELP)
def stop(name: str, timeout: float | None) -> None:
    """Ask the daemon of an instance to shut down, and wait until it has, showing the progress
    of its final checkpoint (with [server] checkpoint_dir)."""
    import time

    from .engine.instance import process_alive
    from .errors import DaemonBusy

    deadline = None if timeout is None else time.monotonic() + timeout
    ctl, rec = _connect(name, timeout)  # rec: the record whose daemon the socket's peer is
    try:
        with _ProgressBar("final checkpoint") as bar:
            ctl.request("shutdown", timeout=timeout, follow=True)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ctl.follow(bar.update, left)  # until the daemon closes the connection, exiting
    finally:
        ctl.close()
    # After its control server closes, the daemon removes its shared memory and exits: that
    # takes well under a second, EXIT_S bounds it when no --timeout does.
    if deadline is None:
        deadline = time.monotonic() + EXIT_S
    while process_alive(rec.pid, rec.start_time):
        if time.monotonic() > deadline:
            raise DaemonBusy(
                f"daemon pid {rec.pid} has not exited yet; it goes on shutting down: see its log"
            )
        time.sleep(0.05)
    click.echo(f"instance {name!r} stopped")


@main.command()
@click.argument("tables_path", type=click.Path(dir_okay=False))
def validate(tables_path: str) -> None:
    """Check a tables.toml and print the shared memory each table needs."""
    from .daemon.lifecycle import check_fits
    from .engine.layout import compute_layout
    from .engine.shm import format_bytes, shm_free_bytes

    config = load_config(tables_path)
    total = 0
    for t in config.tables:
        size = compute_layout(t, config.server.max_clients).total_size
        total += size
        click.echo(
            f"table {t.name!r}: {t.num_slots} slots × {t.row_bytes} B/row = {format_bytes(size)}"
        )
    free = shm_free_bytes()
    click.echo(f"total {format_bytes(total)}; /dev/shm has {format_bytes(free)} free")
    check_fits(config)
    click.echo(f"{tables_path}: OK")


@main.command()
@click.option(
    "--name",
    default=None,
    callback=_valid_name,
    help="Only this instance (default: every one with leftovers).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def gc(name: str | None, yes: bool) -> None:
    """Remove what daemons that are no longer running left: their segments and semaphores in
    /dev/shm, and their record, socket and lock file in the runtime directory.

    Lists what it would remove and asks first (unless --yes). Whether a daemon is alive is read
    from its segments (each records the daemon's pid and start time), so a live daemon is left
    alone even if it uses another runtime directory; objects of other users are never touched,
    nor objects made less than 30 s ago that record no daemon (one may be starting).
    """
    import os

    from .engine.instance import find_leftovers, instances_in_sight

    names = [name] if name else instances_in_sight()
    found = [find_leftovers(inst) for inst in names]
    for f in found:
        f.close()  # no lock held while we ask: a daemon may start meanwhile (rechecked below)
    try:
        for f in found:
            if f.live_pid is not None:
                pid = f" (daemon pid {f.live_pid})" if f.live_pid > 0 else ""
                click.echo(f"instance {f.instance!r} is running: left alone{pid}")
            for line in f.kept:
                click.echo(f"left alone: {line}")
            for path in f.removable:
                click.echo(f"would remove {path}")
        planned = {p for f in found for p in f.removable}
        if not planned:
            click.echo("nothing to remove")
            return
        if not yes:
            click.confirm(f"remove these {len(planned)} object(s)?", abort=True)
        removed = 0
        for f in found:
            # Again, after the question: a daemon may have started meanwhile.
            again = find_leftovers(f.instance)
            try:
                for path in again.removable:
                    if path not in planned:
                        continue
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        continue
                    removed += 1
                    click.echo(f"removed {path}")
            finally:
                again.close()
        click.echo(f"{removed} object(s) removed")
    finally:
        for f in found:
            f.close()


@main.command()
@click.option("--duration", default=10.0, show_default=True, help="Seconds to run.")
@click.option("--actors", default=2, show_default=True, help="Actor processes.")
@click.option("--batch-size", default=256, show_default=True, help="Learner batch size.")
def demo(duration: float, actors: int, batch_size: int) -> None:
    """Run a daemon, actor processes and a prioritized learner; print live rates; clean up."""
    from .demo import run_demo

    sys.exit(run_demo(duration=duration, actors=actors, batch_size=batch_size))


if __name__ == "__main__":
    main()
