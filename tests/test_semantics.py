"""Runs the named cases of semantic_cases.py against real tables served by a real daemon."""

from __future__ import annotations

import numpy as np
import pytest
from semantic_cases import CASES  # tests/ is on sys.path (rootdir-relative imports)

import shmreplay
from shmreplay.engine.layout import SlotState
from shmreplay.testing import STAMPED_SIGNATURE, stamped_row, verify_stamped

BLOCK_S = 0.2  # how long a call must stay blocked to count as held back


def present_uids(t) -> list[int]:
    # No public "list the items" call yet: read the per-slot metadata the daemon committed.
    core = t.core
    ready = np.flatnonzero(core.state == SlotState.READY)
    return sorted(core.data["uid"][ready].tolist())


@pytest.mark.parametrize("name", list(CASES))
def test_case(name, daemon_factory):
    body, ops = CASES[name]
    d = daemon_factory(f'[[table]]\nname = "t"\n{body}{STAMPED_SIGNATURE}')
    with shmreplay.attach(d.name, seed=7) as client:
        t = client.table("t")
        keys: dict[int, int] = {}
        for step, op in enumerate(ops):
            where = f"step {step} {op[:2]}"
            kind = op[0]
            if kind == "insert":
                keys[op[1]] = t.insert(stamped_row(op[1]), priority=op[2], timeout=5)
                t.flush(timeout=5)
            elif kind == "insert_blocked":
                with pytest.raises(shmreplay.RateLimiterTimeout, match="insert blocked"):
                    t.insert(stamped_row(op[1]), timeout=BLOCK_S)
            elif kind in ("sample", "sample_partial"):
                if kind == "sample":
                    s = t.sample(op[1], timeout=5)
                elif not op[2].get("uid", True):  # partial, and nothing may be returned
                    with pytest.raises(shmreplay.RateLimiterTimeout, match="sample blocked"):
                        t.sample(op[1], timeout=BLOCK_S, partial=True)
                    continue
                else:
                    s = t.sample(op[1], timeout=BLOCK_S, partial=True)
                assert verify_stamped(s.data).all(), where
                got = {"uid": s.data["uid"].tolist()}
                for f in ("probability", "times_sampled", "table_size", "priority"):
                    got[f] = getattr(s.info, f).tolist()
                for field, want in op[2].items():
                    if field == "uid_in":
                        assert set(got["uid"]) <= want, where
                    elif field == "probability":
                        np.testing.assert_allclose(got[field], want, err_msg=where)
                    else:
                        assert got[field] == want, (where, field)
                assert [keys[u] for u in got["uid"]] == s.info.key.tolist(), where
            elif kind == "sample_blocked":
                with pytest.raises(shmreplay.RateLimiterTimeout, match="sample blocked"):
                    t.sample(op[1], timeout=BLOCK_S)
            elif kind == "update":
                t.update_priorities([keys[u] for u in op[1]], list(op[1].values()))
            elif kind == "delete":
                t.delete([keys[u] for u in op[1]])
            elif kind == "expect":
                info = t.info()
                lim = info.rate_limiter
                state = {
                    "size": info.current_size,
                    "inserts": lim.inserts,
                    "samples": lim.samples,
                    "deletes": lim.deletes,
                    "uids": present_uids(t),
                }
                for field, want in op[1].items():
                    assert state[field] == want, (where, field, state)
            else:
                raise AssertionError(f"unknown operation {op!r}")
