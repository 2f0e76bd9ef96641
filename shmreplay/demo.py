"""``shmreplay demo``: a daemon, actor processes and a learner on an example table, live rates."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time

import numpy as np

DEMO_TABLES = """
[server]
name = "{name}"

[[table]]
name = "replay"
max_size = 100_000
sampler = {{ kind = "prioritized", priority_exponent = 0.6 }}
remover = {{ kind = "fifo" }}
rate_limiter = {{ kind = "min_size", min_size = 1000 }}
[table.signature]
obs = {{ shape = [8], dtype = "float32" }}
action = {{ dtype = "int64" }}
reward = {{ dtype = "float32" }}
done = {{ dtype = "bool" }}
"""


def _actor(name: str, seed: int, stop) -> None:
    import shmreplay

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    client = shmreplay.attach(name, timeout=10)
    table = client.table("replay")
    rng = np.random.default_rng(seed)
    n = 64
    batch = {
        "obs": rng.standard_normal((n, 8)).astype(np.float32),
        "action": rng.integers(0, 4, n),
        "reward": rng.standard_normal(n).astype(np.float32),
        "done": rng.random(n) < 0.01,
    }
    while not stop.is_set():
        table.insert_batch(batch, priorities=rng.random(n) + 0.1, timeout=5)
    client.close()


def _learner(name: str, batch_size: int, stop) -> None:
    import shmreplay

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    client = shmreplay.attach(name, timeout=10)
    table = client.table("replay")
    rng = np.random.default_rng(0)
    while not stop.is_set():
        try:
            s = table.sample(batch_size, timeout=1.0)
        except shmreplay.RateLimiterTimeout:
            continue
        table.update_priorities(s.info.key, rng.random(len(s)) + 0.1)
    client.close()


def run_demo(duration: float = 10.0, actors: int = 2, batch_size: int = 256) -> int:
    import shmreplay
    from shmreplay.engine.instance import shm_objects

    name = f"demo-{os.getpid()}"
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    print(f"starting daemon: shmreplay serve --name {name}", flush=True)
    # The daemon logs to our stderr, as a daemon started by hand in this terminal would.
    server = shmreplay.Server(DEMO_TABLES.format(name=name), name, log=sys.stderr)
    procs = []
    try:
        client = shmreplay.attach(name, timeout=15)
        table = client.table("replay")
        procs = [ctx.Process(target=_actor, args=(name, i, stop)) for i in range(actors)]
        procs.append(ctx.Process(target=_learner, args=(name, batch_size, stop)))
        for p in procs:
            p.start()
        print(
            f"{actors} actor(s) insert batches of 64 transitions; 1 learner samples "
            f"prioritized batches of {batch_size} and updates their priorities",
            flush=True,
        )
        last = table.info()
        t_last = time.monotonic()
        end = t_last + duration
        while time.monotonic() < end:
            time.sleep(1.0)
            now, info = time.monotonic(), table.info()
            dt = now - t_last
            ins = (info.total_inserted - last.total_inserted) / dt
            smp = (info.total_sampled - last.total_sampled) / dt
            print(
                f"  size {info.current_size:>7}/{info.max_size}   inserts/s {ins:>10,.0f}   "
                f"batches/s {smp / batch_size:>7,.0f}   sampled items/s {smp:>10,.0f}",
                flush=True,
            )
            last, t_last = info, now
        client.close()
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        # Status 0: the daemon removed its objects itself; stop() removes those of a
        # daemon it had to kill.
        server.stop(timeout=15)
    left = shm_objects(name)
    status = server.proc.returncode
    print(
        f"daemon exited with status {status}; objects left in /dev/shm: {len(left)}",
        flush=True,
    )
    return 0 if status == 0 and not left else 1
