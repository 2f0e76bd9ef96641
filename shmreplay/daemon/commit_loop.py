"""The commit loop: what the daemon's main thread does for every table, round after round.

A round drains every writer's publish ring, commits the slots under the table mutex in one
compiled call (selectors, eviction, counters), refills the writers' lease rings as the rate
limiter allows and wakes the processes waiting on the table. Between rounds the loop naps while
writers are active and sleeps until posted once they are quiet (the commit policy, see
:meth:`CommitLoop.native_loop`). The steady state runs in C (:meth:`CommitLoop.serve`,
csrc/commit.c's shm_loop_serve); this module's Python finishes a round the C loop hands back
(:meth:`CommitLoop.service`, :meth:`CommitLoop._refill`: the same rules, with the cut-offs,
repairs, waits for a busy lock and the logging that need Python).

Every value read from memory a client can write is checked first: a client that wrote nonsense
is cut off alone (the ``cut_off`` callback, :meth:`Clients.cut_off
<shmreplay.daemon.clients.Clients.cut_off>`); a table whose commit or lease fails is
quarantined alone (:meth:`CommitLoop.quarantine`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..engine import _native
from ..engine.events import Event
from ..engine.layout import LEASE_CAPACITY, PUBLISH_CAPACITY, Chan, Ctrl, TableState
from ..engine.table import TableCore
from ..errors import LockTimeout

log = logging.getLogger("shmreplay")

# With writers active the daemon never sleeps longer than this: it bounds the delay of a wake-up
# lost to store/load reordering between a writer's publish and the daemon's sleeping flag.
ACTIVE_SLEEP_S = 0.002  # a nap: bounds the delay from publish to sampleable
ACTIVE_WINDOW_S = 0.05  # writers quiet for this long: sleep until woken instead of napping
IDLE_SLEEP_S = 0.1
STALL_WARN_S = 2.0  # the commit loop says who holds a table lock this long
QUARANTINE_S = 1.0  # far longer than any client takes to write a row or copy a sample
_ROUND = object()  # CommitLoop.service: no round result given, run one


@dataclass
class ServedTable:
    core: TableCore
    outstanding: np.ndarray  # per channel: slots leased and not yet committed
    # Slots a dead daemon's clients held, and when to free them (see TableCore.adopt).
    quarantine: tuple[float, np.ndarray] | None = None
    # The Python refill's (CommitLoop._refill) rotation and starved flag; the loop in C keeps
    # its own (csrc/commit.c, shm_loop_table) by the same rules.
    rotation: int = 0  # which wanting writer is served first next time
    # The rate limiter left nothing to lease to the writers that wait. Only a sample (or a
    # delete, reset or limiter change) can change that, and each of those posts the daemon:
    # no need to nap and re-check every ACTIVE_SLEEP_S meanwhile.
    starved: bool = False
    # The daemon's own copies of the ring indices it owns (the copies in shared memory are only
    # published for the writers: a client may overwrite them, the daemon never reads them back).
    pub_head: np.ndarray | None = None
    lease_tail: np.ndarray | None = None
    # Why the table was quarantined (see CommitLoop.quarantine), None while it is sound.
    broken: str | None = None
    # The compiled round over the table's channels (CommitLoop.round_for): drain, finish, lease.
    round: _native.CommitRound | None = None
    out_slots: np.ndarray | None = None  # where the round drains to (slots, priorities)
    out_prios: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.pub_head is None:
            self.pub_head = np.zeros(len(self.outstanding), np.int64)
        if self.lease_tail is None:
            self.lease_tail = np.zeros(len(self.outstanding), np.int64)


class CommitLoop:
    """The rounds over every table of an instance (the main thread's work).

    ``tables`` and ``active`` are the daemon's own (filled as tables are created and clients
    attach); ``cut_off(channel, why)`` stops serving a client that wrote nonsense."""

    def __init__(
        self,
        tables: dict[str, ServedTable],
        active: np.ndarray,
        max_clients: int,
        cut_off: Callable[[int, str], None],
    ) -> None:
        self.tables = tables
        # Channels whose rings the loop reads: registered, not yet reclaimed or cut off.
        self.active = active
        self.max_clients = max_clients
        self.cut_off = cut_off
        self.wake: Event | None = None  # the daemon's semaphore, made at start-up
        # Set (then wake posted) when the loop in C must come back to Python (attend()).
        self.attention = np.zeros(1, np.int64)
        self.native: _native.Loop | None = None  # the loop in C (native_loop)

    def new_table(self, core: TableCore) -> ServedTable:
        """The loop's state of a table just created or adopted, with its compiled round."""
        state = ServedTable(core, np.zeros(self.max_clients, np.int64))
        state.round = self.round_for(state)
        return state

    def serve(self, deadline: float) -> None:
        """Serve every table until time.monotonic() reaches ``deadline`` or Python is needed.

        The steady state runs in C without the GIL (``_native.Loop.serve``, csrc/commit.c):
        per table, drain and commit, refill the writers' leases (the rate limiter's budget in
        C, csrc/ratelimit.c), post the waiters; then settle and nap (the commit policy, see
        native_loop). It returns here for what needs Python: a table's round that does (a
        refused run, a busy or orphaned lock, a repair, a writer to cut off) is finished by
        :meth:`service` with what the loop did; the attention word (:meth:`attend`: a stop, a
        client attached or gone); a signal (its handler runs once this returns); the deadline
        (the daemon's timers). About ten times a second when nothing unusual happens."""
        loop = self.native_loop()
        order = list(self.tables.values())
        self.attention[0] = 0  # before the loop looks at what asked for it
        for i, t in enumerate(order):
            loop.set_broken(i, t.broken is not None)
        code, i, res = loop.serve(deadline)
        if code == _native.LOOP_TABLE:
            self.service(order[i], res)

    def attend(self) -> None:
        """Bring the loop (in C, without the GIL) back to Python at once (any thread)."""
        self.attention[0] = 1
        if self.wake is not None and self.wake.sem is not None:
            self.wake.sem.release()

    def native_loop(self) -> _native.Loop:
        """The loop in C over every table, in self.tables' order (made on first use, once
        every table exists).

        Its commit policy (CommitLoop.sleep before it moved to C): nap while writers are
        busy (they need not wake us per item); sleep until posted once they have been quiet
        for ACTIVE_WINDOW_S (the next publish wakes us). The daemon's half of the Dekker pair
        with a publishing writer: raise the flag (store, seq_cst fence), then look at every
        PUB_TAIL; a writer stores its PUB_TAIL, fences, then looks at the flag: one of the two
        sees the other. Writers active and nobody waiting on us: nap, even if items were
        published meanwhile (a round per nap, not per item), at most ACTIVE_SLEEP_S (the
        commit latency bound), shorter while the writers consume their leases fast (the lease
        pace: no longer than it takes them to use half of what they hold, at least 50 us). A
        writer low on leases, a flush or a waiting sampler posts us and ends the nap at once."""
        if self.native is None:
            loop = _native.Loop(
                self.wake.name, self.attention, ACTIVE_SLEEP_S, IDLE_SLEEP_S, ACTIVE_WINDOW_S
            )
            for t in self.tables.values():
                loop.add(
                    t.round,
                    t.core.segment.arrays["params"].reshape(-1),
                    int(t.core.spec.headroom),
                    t.core.events.sample.name,
                    t.core.events.insert.name,
                )
            self.native = loop
        return self.native

    def close(self) -> None:
        """Drop the loop in C (its semaphore handles and its hold on the tables' rounds)."""
        self.native = None

    def broken_tables(self) -> str:
        """Which tables are quarantined and why, as a phrase ('' if none)."""
        return "; ".join(
            f"table {n!r} is quarantined ({t.broken})"
            for n, t in self.tables.items()
            if t.broken is not None
        )

    def committed_total(self) -> int:
        return sum(int(t.core.ctrl[Ctrl.TOTAL_INSERTED]) for t in self.tables.values())

    @contextlib.contextmanager
    def locked(self, t: ServedTable, what: str):
        """The table's lock, for the commit loop. A process stopped (SIGSTOP) while holding it
        cannot be told from a slow one and its lock cannot be taken from it: wait, and say
        every STALL_WARN_S who holds it."""
        waited = 0.0
        while True:
            try:
                t.core.mutex.acquire(STALL_WARN_S)
                break
            except LockTimeout:
                waited += STALL_WARN_S
                log.warning(
                    "table %r: its lock has been held by pid %d for %.0f s (a stopped process?);"
                    " %s waits",
                    t.core.name,
                    t.core.mutex.owner_pid,
                    waited,
                    what,
                )
        try:
            yield
        finally:
            t.core.mutex.release()

    def end_quarantines(self, now: float) -> None:
        """Free the slots a dead daemon's clients held, once they must have noticed (the
        post-adoption hold, not a quarantined table: see _quarantine)."""
        for name, t in self.tables.items():
            if t.quarantine is not None and t.broken is None and now >= t.quarantine[0]:
                try:
                    freed = t.core.release_quarantined(t.quarantine[1])
                except Exception as exc:
                    self.quarantine(t, f"{type(exc).__name__}: {exc}", exc)
                    continue
                t.quarantine = None
                if freed:
                    log.info("table %r: %d slot(s) held before the restart freed", name, freed)

    def round_for(self, t: ServedTable) -> _native.CommitRound:
        """The compiled round over ``t``'s channels, on the daemon's private arrays (its ring
        ends, the active channels) and the segment's rings."""
        a = t.core.segment.arrays
        size = self.max_clients * PUBLISH_CAPACITY
        t.out_slots, t.out_prios = np.empty(size, np.int64), np.empty(size, np.float64)
        rnd = _native.CommitRound(
            t.core._commit_engine(),
            a["chan.ctrl"].reshape(-1),
            a["chan.lease"].reshape(-1),
            a["chan.publish"].reshape(-1),
            self.active,
            t.pub_head,
            t.lease_tail,
            t.outstanding,
            t.out_slots,
            t.out_prios,
        )
        rnd.set_mutex(a["mutex"])  # commit_round tries the table's lock itself
        return rnd

    def service(self, t: ServedTable, res: object = _ROUND) -> bool:
        """Commit what was published, refill leases, wake waiters. True if anything happened.
        ``res``: what the loop in C drained and did (commit_round's result), else a round here.

        Raises nothing on a table's account: a value a client wrote that makes no sense cuts
        that client off (:meth:`_cut_off`); any other error quarantines the table
        (:meth:`_quarantine`). Blocks only while another process holds the table's lock."""
        if t.broken is not None:
            return False
        try:
            return self._commit_and_lease(t, res)
        except Exception as exc:
            self.quarantine(t, f"{type(exc).__name__}: {exc}", exc)
            return True

    def _commit_and_lease(self, t: ServedTable, res: object = _ROUND) -> bool:
        core = t.core
        rnd = t.round
        # Every active channel's run, checked and copied once, then committed under the lock
        # (tried once), the selectors and the eviction included, and PUB_HEAD released: one
        # call (commit_round, or the loop in C). What it leaves to Python: refused runs, a
        # busy or orphaned lock, structures to repair.
        if res is _ROUND:
            res = rnd.commit_round()
        committed, n, refused = 0, 0, None
        if res is None:
            pass
        elif type(res) is int:
            n = 1  # something was drained
            if res >= 0:
                committed = res
            else:  # -2: committed, then a selector failed: repair, evict, release PUB_HEAD
                with self.locked(t, "committing"):
                    committed = core._commit_repaired(core._commit_engine(), res, None, None)
                rnd.finish()
        else:
            n, refused = res
            if refused is False:  # we hold the lock; its previous owner died holding it
                core.mutex.recover_from_dead_owner()
                core.mutex.release()
                refused = None
            if refused:
                for c, why in refused:
                    self.cut_off(c, f"table {core.name!r}: {why}")
            if n:
                with self.locked(t, "committing"):
                    committed = core.commit(t.out_slots[:n], t.out_prios[:n], in_place=True)
                rnd.finish()  # PUB_HEAD store-release per drained channel
        leased = self._refill(t)
        wait_insert, wait_sample = rnd.waiters()  # after a seq_cst fence (Dekker)
        if committed and wait_sample:  # a waiting sampler is on the critical path
            core.events.sample.post(wait_sample)
        if core.ctrl[Ctrl.SAMPLER_WAITING]:
            # Clear the hint, then re-check: a sampler sets its flag before the hint.
            core.ctrl[Ctrl.SAMPLER_WAITING] = 0
            if rnd.waiters()[1]:
                core.ctrl[Ctrl.SAMPLER_WAITING] = 1
        if (n or refused or leased) and wait_insert:
            core.events.insert.post(wait_insert)
        return bool(n or refused or leased)

    def _refill(self, t: ServedTable) -> int:
        core = t.core
        t.starved = False
        limited = core.limiter.blocks_inserts
        # [(channel, want, have)], active channels only; unlimited, empty when every writer's
        # lease ring is more than half full (decided in C: most rounds lease nothing).
        wanting = t.round.wanting(0 if limited else int(core.spec.headroom))
        if not wanting:
            return 0
        # The writers move their lease heads: checked against the tails we wrote.
        ok = []
        for c, want, have in wanting:
            if want < 0:
                self.cut_off(c, f"table {core.name!r}: it asked for {want} slots")
            elif not 0 <= have <= LEASE_CAPACITY:
                self.cut_off(
                    c,
                    f"table {core.name!r}: its lease ring's head is {have} slot(s) behind "
                    f"the tail {int(t.lease_tail[c])} (capacity {LEASE_CAPACITY})",
                )
            else:
                ok.append((c, want, have))
        if not ok:
            return 0
        if limited and core.limiter.insert_allowance(1, int(t.outstanding.sum())) == 0:
            # Read without the lock, as a hint: counters only move towards more budget through
            # a sample, delete or reset, each of which posts us (see t.starved).
            t.starved = True
            return 0
        # Scalars in Python, not numpy: this runs at every wake-up of the commit loop.
        headroom = min(max(int(core.spec.headroom) // (2 * len(ok)), 1), LEASE_CAPACITY)
        if not limited:  # keep every writer's lease ring filled, refilling at half
            ok = [(c, w, h, headroom - h if h <= headroom // 2 else 0) for c, w, h in ok]
            if not any(x[3] for x in ok):
                return 0
        if len(ok) > 1:
            # Writers served first get the limiter's budget (or the last free slots) first:
            # rotate who that is.
            t.rotation += 1
            shift = t.rotation % len(ok)
            ok = ok[shift:] + ok[:shift]
        total = 0
        with self.locked(t, "leasing slots"):
            core.check_counts()
            pending = int(t.outstanding.sum())
            if limited:
                # What each writer asked for (see Table._wait_for_lease), and more ahead of
                # need only out of a wide budget: at most a quarter of what the limiter
                # allows now is shared out ahead, so a writer going idle cannot hoard it.
                free = core.limiter.insert_allowance(LEASE_CAPACITY * len(ok), pending)
                ahead = min(headroom, free // (4 * len(ok)))
                ok = [
                    (c, w, h, min(max(max(min(w, LEASE_CAPACITY), ahead) - h, 0), LEASE_CAPACITY))
                    for c, w, h in ok
                ]
            need = sum(x[3] for x in ok)
            budget = core.limiter.insert_allowance(need, pending)
            t.starved = limited and budget <= 0 < need
            for c, _, _, n in ok:
                n = min(n, budget)
                if n <= 0:
                    continue
                k = t.round.lease(c, n)  # LEASE_TAIL store-release inside
                if k < 0:
                    # The free ring lists a slot that is not one, or not free, or twice.
                    core._repair_counts("its free ring lists slots that are not free")
                    k = max(t.round.lease(c, n), 0)
                if k == 0:
                    break
                budget -= k
                total += k
        return total

    def quarantine(self, t: ServedTable, why: str, exc: BaseException | None = None) -> None:
        """Stop serving a table that cannot go on (its lock is corrupt, or committing to it or
        leasing from it raised), not the instance. Its structures are rebuilt from the per-slot
        metadata if its lock still works, so samplers keep reading it; writers get
        TableQuarantined; it is written to no checkpoint and stays in /dev/shm at exit, for
        the next daemon to adopt (and repair)."""
        if t.broken is not None:
            return
        t.broken = why
        core = t.core
        core.ctrl[Ctrl.TABLE_STATE] = TableState.QUARANTINED
        log.error(
            "table %r quarantined: %s; samplers may still read it, writers are refused, and it "
            "stays in /dev/shm for the next daemon to adopt (restart the daemon to repair it)",
            core.name,
            why,
            exc_info=exc,
        )
        try:
            with core.mutex.held(STALL_WARN_S):
                core.repair()
        except Exception as repair_exc:
            log.error("table %r: could not rebuild its structures: %s", core.name, repair_exc)
        # Writers waiting for a lease or a commit look again, and raise.
        core.events.insert.post(int(np.count_nonzero(core.chan[:, Chan.WAIT_INSERT])) + 1)
