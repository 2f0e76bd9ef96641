"""A soak: 2 actors and 1 learner at full speed for minutes, with a SampleToInsertRatio limiter
and periodic checkpoints; throughput and every process's RSS over time.

    python -m bench.soak --minutes 10        # the documented run (not in CI)
    python -m bench.soak --minutes 1         # a short one

Prints a JSON line per interval (inserts/s, batches/s, RSS in MB of the daemon, each actor and
the learner) and a summary: the first and last thirds' mean throughput (a downward drift shows
as a ratio below 1), each process's RSS growth from the first sample after warm-up to the last,
the checkpoints written, and the rows the learner found torn (0 in a good run).
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


def run(minutes: float, interval: float, ckpt_dir: str) -> dict:
    toml = (
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
    stop, torn = CTX.Event(), CTX.Value("q", 0)
    lines = []
    with DaemonProcess(toml) as d, shmreplay.attach(d.name) as monitor:
        procs = [CTX.Process(target=_actor, args=(d.name, i, stop)) for i in (1, 2)]
        procs.append(CTX.Process(target=_learner, args=(d.name, stop, torn)))
        for p in procs:
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
        finally:
            stop.set()
            for p in procs:
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between lines")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shmreplay-soak-") as ckpt:
        print(json.dumps(run(args.minutes, args.interval, ckpt)), flush=True)


if __name__ == "__main__":
    main()
