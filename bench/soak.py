"""A soak: 2 actors and 1 learner at full speed for minutes, with a SampleToInsertRatio limiter
and periodic checkpoints; throughput and every process's RSS over time; meanwhile a process
attaches and closes in a loop.

    python -m bench.soak --minutes 10        # the documented run (not in CI)
    python -m bench.soak --minutes 1         # a short one
    python -m bench.soak --attach-loop 10000 # only the attach loop, 10,000 times (about a minute)

Prints a JSON line per interval (inserts/s, batches/s, RSS in MB of the daemon, each actor and
the learner) and a summary: the first and last thirds' mean throughput (a downward drift shows
as a ratio below 1), each process's RSS growth from the first sample after warm-up to the last,
the checkpoints written, and the rows the learner found torn (0 in a good run). The attach
loop reports its cycles and its open descriptors and memory mappings after a warm-up and at the
end (equal in a good run), and the daemon's client count after it (the loop's channels all
reclaimed). Under the soak's load a cycle takes ~100 ms on the 2-core machine, so the 10,000
cycles of issue 5 have a run of their own (``--attach-loop``, the same tables, no other load);
tests/test_hostile_input.py runs the loop 300 times in the suite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time

import numpy as np
import psutil

import shmreplay
from shmreplay.testing import (
    W1_SIGNATURE,
    DaemonProcess,
    stamped_batch,
    table_toml,
    verify_stamped,
)

from .run import w1_row

CTX = mp.get_context("spawn")
STAMPED = """
[table.signature]
uid = { dtype = "int64" }
obs = { shape = [16], dtype = "float32" }
check = { dtype = "uint32" }
"""


def _actor(instance: str, actor_id: int, stop) -> None:
    client = shmreplay.attach(instance, timeout=30)
    t = client.table("replay")
    rows = [w1_row(np.random.default_rng(actor_id)) for _ in range(64)]
    uid = actor_id * 1_000_000_000
    checked = client.table("checked")
    while not stop.is_set():
        try:
            for r in rows:
                t.insert(r, timeout=1.0)
            checked.insert_batch(stamped_batch(np.arange(uid, uid + 8)), timeout=1.0)
            uid += 8
        except shmreplay.RateLimiterTimeout:
            pass
    client.close(timeout=5)


def _learner(instance: str, stop, torn) -> None:
    client = shmreplay.attach(instance, timeout=30)
    t, checked = client.table("replay"), client.table("checked")
    rng = np.random.default_rng(0)
    out = {f.name: np.empty((256, *f.shape), f.np_dtype) for f in t.spec.signature}
    while not stop.is_set():
        try:
            s = t.sample(256, timeout=1.0, out=out)
            t.update_priorities(s.info.key, rng.random(256) + 0.1)
            c = checked.sample(64, timeout=0.1)
            with torn.get_lock():
                torn.value += int((~verify_stamped(c.data)).sum())
        except shmreplay.RateLimiterTimeout:
            pass
    client.close(timeout=5)


def _attacher(instance: str, cycles: int | None, stop, result) -> None:
    """Attach and close until ``cycles`` are done (None: no limit) or ``stop`` is set: puts
    (cycles, descriptors and mappings after a warm-up, the same at the end, s per cycle)."""
    import gc

    me = psutil.Process()

    def counts() -> tuple[int, int]:
        gc.collect()
        return me.num_fds(), len(me.memory_maps(grouped=False))

    def cycle(i: int) -> None:
        # Every 100th maps the tables' pages too (prefault thread); the rest only attach.
        c = shmreplay.attach(instance, timeout=30, prefault=i % 100 == 0)
        c.table("replay").info()
        c.close()

    for i in range(50):  # warm-up: imports and objects made once
        cycle(i)
    before = counts()
    t0 = time.monotonic()
    done = 0
    while (cycles is None or done < cycles) and not stop.is_set():
        cycle(done)
        done += 1
    per_cycle = (time.monotonic() - t0) / max(done, 1)
    result.put((done, before, counts(), per_cycle))


def soak_tables(ckpt_dir: str) -> str:
    return (
        f'[server]\ncheckpoint_dir = "{ckpt_dir}"\ncheckpoint_interval_s = 60\n'
        "checkpoint_keep = 2\n"
        + table_toml(
            "replay",
            max_size=1_000_000,
            sampler='{ kind = "prioritized", priority_exponent = 0.6 }',
            rate_limiter='{ kind = "sample_to_insert_ratio", samples_per_insert = 4.0, '
            "min_size_to_sample = 10000, error_buffer = 100000.0 }",
            signature=W1_SIGNATURE,
        )
        + table_toml("checked", max_size=100_000, signature=STAMPED)
    )


def _attach_report(result, daemon_clients: int) -> dict:
    cycles, before, after, per_cycle = result
    return {
        "cycles": cycles,
        "ms_per_cycle": round(per_cycle * 1e3, 2),
        "fds_and_mappings_after_warmup": before,
        "fds_and_mappings_at_end": after,
        "daemon_clients_after": daemon_clients,
    }


def attach_loop(cycles: int, ckpt_dir: str) -> dict:
    """Only the attach loop: ``cycles`` attach/close cycles against the soak's tables."""
    stop, result = CTX.Event(), CTX.Queue()
    with DaemonProcess(soak_tables(ckpt_dir)) as d, shmreplay.attach(d.name) as monitor:
        p = CTX.Process(target=_attacher, args=(d.name, cycles, stop, result))
        p.start()
        try:
            report = result.get(timeout=max(120.0, cycles * 0.2))
        finally:
            stop.set()
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
        clients = len(monitor.server_info()["clients"])  # this monitor only
    return {"benchmark": "attach_loop", **_attach_report(report, clients)}


def run(minutes: float, interval: float, ckpt_dir: str) -> dict:
    toml = soak_tables(ckpt_dir)
    stop, stop_attaching, torn = CTX.Event(), CTX.Event(), CTX.Value("q", 0)
    lines = []
    with DaemonProcess(toml) as d, shmreplay.attach(d.name) as monitor:
        procs = [CTX.Process(target=_actor, args=(d.name, i, stop)) for i in (1, 2)]
        procs.append(CTX.Process(target=_learner, args=(d.name, stop, torn)))
        attached = CTX.Queue()
        attacher = CTX.Process(target=_attacher, args=(d.name, None, stop_attaching, attached))
        for p in [*procs, attacher]:
            p.start()
        try:
            watched = {"daemon": psutil.Process(d.proc.pid)}
            watched.update({f"actor{i}": psutil.Process(p.pid) for i, p in enumerate(procs[:2])})
            watched["learner"] = psutil.Process(procs[2].pid)
            t = monitor.table("replay")
            last, t_last = t.info(), time.monotonic()
            end = t_last + minutes * 60
            while time.monotonic() < end:
                time.sleep(interval)
                info, now = t.info(), time.monotonic()
                dt = now - t_last
                line = {
                    "t_s": round(now - (end - minutes * 60), 1),
                    "inserts_per_s": round((info.total_inserted - last.total_inserted) / dt),
                    "batches_per_s": round((info.total_sampled - last.total_sampled) / dt / 256, 1),
                    "rss_mb": {
                        k: round(p.memory_info().rss / 2**20, 1) for k, p in watched.items()
                    },
                }
                print(json.dumps(line), flush=True)
                lines.append(line)
                last, t_last = info, now
            stop_attaching.set()
            attach = _attach_report(
                attached.get(timeout=60),
                len(monitor.server_info()["clients"]),  # 2 actors, the learner, this monitor
            )
        finally:
            stop.set()
            stop_attaching.set()
            for p in [*procs, attacher]:
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join()
        checkpoints = d.log().count("written:")
    third = max(1, len(lines) // 3)
    first, final = lines[1 : 1 + third] or lines[:1], lines[-third:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    return {
        "benchmark": "soak",
        "minutes": minutes,
        "inserts_per_s_first_third": round(mean(first, "inserts_per_s")),
        "inserts_per_s_last_third": round(mean(final, "inserts_per_s")),
        "batches_per_s_first_third": round(mean(first, "batches_per_s"), 1),
        "batches_per_s_last_third": round(mean(final, "batches_per_s"), 1),
        "rss_growth_mb": {
            k: round(lines[-1]["rss_mb"][k] - lines[1 if len(lines) > 1 else 0]["rss_mb"][k], 1)
            for k in lines[-1]["rss_mb"]
        },
        "checkpoints_written": checkpoints,
        "torn_rows": torn.value,
        "attach_loop": attach,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between lines")
    parser.add_argument(
        "--attach-loop",
        type=int,
        metavar="CYCLES",
        help="run only the attach/close loop, this many times (issue 5: 10000)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shmreplay-soak-") as ckpt:
        if args.attach_loop is not None:
            result = attach_loop(args.attach_loop, ckpt)
        else:
            result = run(args.minutes, args.interval, ckpt)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
