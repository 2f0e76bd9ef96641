"""TableCore.commit and lease per call at steady state (table full: every commit evicts), in
process, under the mutex, against a live daemon that has nothing to do.

    python -m bench.commit_micro
"""

import time

import numpy as np

import shmreplay
from shmreplay.testing import DaemonProcess, table_toml

for remover in ("fifo", "uniform"):
    toml = "\n" + table_toml(max_size=1000, remover=f'{{ kind = "{remover}" }}')
    with DaemonProcess(toml) as d, shmreplay.attach(d.name) as client:
        core = client.table("replay").core
        for batch in (1, 4, 64):
            prios = np.ones(batch)
            times = []
            for _rep in range(3):
                n = 3000 if batch < 64 else 500
                core.mutex.acquire()
                try:
                    t_lease = t_commit = 0.0
                    for _ in range(n):
                        a = time.perf_counter()
                        s = core.lease(0, batch)
                        core.gen[s] += 2
                        b = time.perf_counter()
                        core.commit(s, prios[: len(s)])
                        c = time.perf_counter()
                        t_lease += b - a
                        t_commit += c - b
                finally:
                    core.mutex.release()
                times.append((1e6 * t_commit / n, 1e6 * t_lease / n))
            best = min(times)
            print(
                f"remover={remover} batch={batch}: commit {best[0]:.2f} us/call "
                f"(lease+gen {best[1]:.2f} us/call); size {int(core.ctrl[3])}"
            )
