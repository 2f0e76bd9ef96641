"""Table operations shared by every process: commit, lease, sample, mutate, reset, repair, info.

:class:`TableCore` wraps the numpy views of one table segment. The daemon uses it to commit what
writers published and to lease free slots; learners use it to sample and mutate. Operations that
touch index structures (selectors, counters, free ring) run under the table's robust mutex, which
is held for microseconds: data rows are never copied under it.

Slot lifecycle::

    FREE --lease (daemon)--> LEASED --publish (writer) + commit (daemon)--> READY
      ^                        |  writer died: reclaimed by the daemon          |
      +------------------------+---------------------------- evict / delete ---+
      +-- release (sampler, after its copy) <-- RELEASING <-- max_times_sampled --+

Keys carry their slot: ``key = tag << 32 | slot``; the tag grows each time the slot is leased, so
a stale key never matches a reused slot and finding a key's item costs one array lookup.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..config import FieldSpec, RateLimiterSpec, TableSpec
from ..errors import (
    ClientCutOff,
    DaemonNotRunning,
    InvalidArgumentError,
    RateLimiterTimeout,
    SegmentError,
    TableQuarantined,
)
from ..values import check_priorities
from . import _native
from ._native import SampleCore
from .events import Event
from .layout import LINE, PUBLISH_CAPACITY, Chan, Ctrl, SlotState, TableState
from .mutex import RobustMutex
from .ratelimit import RateLimiter, RateLimiterInfo
from .rings import ring_get, ring_put
from .selectors import selector_class
from .selectors.base import CorruptStructure
from .shm import Segment, physical_memory

log = logging.getLogger("shmreplay")
SLOT_MASK = np.uint64(0xFFFFFFFF)
TAG_SHIFT = np.uint64(32)
# A sampled row whose slot was recycled while we copied it is drawn again; after this many
# rounds something is badly wrong (a table far smaller than its writers' churn).
MAX_REDRAW_ROUNDS = 100
# Draw ranks and times_sampled are int32: no batch may hold more draws.
MAX_BATCH_SIZE = 2**31 - 1
INT64_MAX = 2**63 - 1
SAMPLE_INFO_BYTES = 8 + 8 + 8 + 4 + 8  # key, probability, priority, times_sampled, table_size
QUARANTINED = -2  # owner of slots a dead daemon's clients held, until they are freed

# Test hook: called as ``before_copy_hook(core, slots)`` in the sample path after the table lock
# is released and before the selected rows are copied and their generations checked, so that a
# test can recycle a slot in exactly that window instead of waiting for the race. None in
# production (one global lookup per copy).
before_copy_hook: Callable[[TableCore, np.ndarray], None] | None = None


@dataclass(frozen=True)
class TableEvents:
    """The semaphores a table's processes sleep on."""

    daemon: Event  # the daemon: something was published, or a lease is wanted
    sample: Event  # samplers blocked by the rate limiter or an empty table
    insert: Event  # writers waiting for a lease or for their items to be committed

    def close(self) -> None:
        for e in (self.daemon, self.sample, self.insert):
            e.close()


@dataclass(frozen=True)
class SampleInfo:
    """Per-item information snapshotted at sample time; one entry per sampled item."""

    key: np.ndarray  # uint64
    probability: np.ndarray  # float64
    priority: np.ndarray  # float64
    times_sampled: np.ndarray  # int32, including this sample
    table_size: np.ndarray  # int64, before a max_times_sampled deletion


@dataclass(frozen=True)
class Sample:
    """A sampled batch: ``data[field]`` has shape ``[B, *field_shape]``; ``info`` per item."""

    data: dict[str, np.ndarray]
    info: SampleInfo

    def __len__(self) -> int:
        return len(self.info.key)


@dataclass(frozen=True)
class TableInfo:
    """A snapshot of a table's state: counters taken together under the table lock; the
    priority extremes and episode counts scanned right after it (O(size)), or, in the daemon's
    ``info`` and metrics, from a scan at most STATS_MAX_AGE_S old (see TableCore.info)."""

    name: str
    max_size: int
    current_size: int
    max_times_sampled: int
    sampler: dict
    remover: dict
    rate_limiter: RateLimiterInfo
    signature: tuple[FieldSpec, ...]
    num_unique_samples: int
    total_inserted: int
    total_sampled: int
    total_evicted: int
    resets: int
    repairs: int
    clients: int
    segment_bytes: int
    data_bytes: int
    max_priority: float | None  # None when the table is empty
    min_priority: float | None
    num_episodes: int  # episodes with items in the table (items written with an episode)
    num_deleted_episodes: int  # episodes that had items here and have none left

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["rate_limiter"] = self.rate_limiter.__dict__.copy()
        d["signature"] = {
            f.name: {"shape": list(f.shape), "dtype": f.dtype} for f in self.signature
        }
        return d


_INFO_FIELDS = ("key", "probability", "priority", "times_sampled", "table_size")
# info(max_age=...) reuses the statistics scan of a table of SCAN_REUSE_SLOTS slots or more (a
# scan of 100k slots takes ~0.5-3 ms, of 1M 5-30 ms): one scan per max_age however often
# info() is called. A smaller table is cheaper to scan again than to report stale.
SCAN_REUSE_SLOTS = 100_000
LOCK_GRACE_S = 0.1  # a live holder keeps the lock for microseconds: even nowait waits this long


def _lock_wait(timeout: float | None) -> float | None:
    return None if timeout is None else max(timeout, LOCK_GRACE_S)


@dataclass
class _Selection:
    slots: np.ndarray
    probability: np.ndarray
    key: np.ndarray
    priority: np.ndarray
    times_sampled: np.ndarray
    gen: np.ndarray
    table_size: np.ndarray  # per draw: a max_times_sampled deletion shrinks it for later ones
    releasing: np.ndarray  # slots deleted by this sample, to release after the copy


class TableCore:
    """Numpy views of one table segment and the operations on them."""

    # The last O(size) statistics scan of info(): (monotonic time, max priority, min priority,
    # episodes). Per process: a scan only reads the segment.
    _scan: tuple[float, float | None, float | None, int] | None = None

    # The daemon's compiled commit metadata and lease (_commit_engine), made on first use.
    _commit_table = None

    def __init__(self, segment: Segment, events: TableEvents | None = None) -> None:
        layout = segment.layout
        a = segment.arrays
        self.segment = segment
        self.spec: TableSpec = layout.spec
        self.name = self.spec.name
        self.num_slots = self.spec.num_slots
        self.max_clients = layout.max_clients
        self.events = events
        self.ctrl = a["ctrl"][:, 0]
        self.params = a["params"][:, 0]
        self.key = a["meta.key"]
        self.state = a["meta.state"]
        self.priority = a["meta.priority"]
        self.times_sampled = a["meta.times_sampled"]
        self.seq = a["meta.seq"]
        self.gen = a["meta.gen"]
        self.owner = a["meta.owner"]
        self.episode = a["meta.episode"]
        self.episode_steps = a["meta.episode_steps"]
        # Daemon side: the episode each writer channel committed last. A writer's episodes come
        # one after the other, so a commit's ids that differ from it are episodes new to us.
        self._last_episode = np.zeros(len(a["chan.ctrl"]), np.int64)
        self.free = a["free"]
        self.chan = a["chan.ctrl"][:, :, 0]
        self.lease_ring = a["chan.lease"]
        self.publish_ring = a["chan.publish"]
        self.data = {f.name: a[f"data.{f.name}"] for f in self.spec.signature}
        self.sampler = self._selector("sampler", self.spec.sampler)
        self.remover = self._selector("remover", self.spec.remover)
        self.limiter = RateLimiter(self.params, self.ctrl)
        self.mutex = RobustMutex(
            a["mutex"], on_owner_died=self.repair, name=f"the lock of table {self.name!r}"
        )
        self.rng = np.random.default_rng()
        # The daemon's own draws (the remover's victims), in C: csrc/rng.h.
        self.commit_rng = _native.Rng(int.from_bytes(os.urandom(8), "little"))
        self.daemon_pid: int | None = None  # a client's: the daemon it attached to
        self.channel: int | None = None  # a client's: its channel (check_open checks it)
        # What adopt() found published but could not commit (bad values), for the daemon's log.
        self.skipped_at_adoption: list[str] = []
        # Items a timed-out sample() had already taken (and counted): the next call gets them.
        self._carry: list[tuple[dict[str, np.ndarray], SampleInfo]] = []
        mts = self.spec.max_times_sampled
        self._times_left = (lambda s: mts - self.times_sampled[s]) if mts > 0 else None

    def _selector(self, role: str, spec):
        prefix = role + "."
        arrays = {
            k[len(prefix) :]: v for k, v in self.segment.arrays.items() if k.startswith(prefix)
        }
        return selector_class(spec.kind)(arrays, spec, self.num_slots)

    # -- creation (daemon) ---------------------------------------------------------------------

    def adopt(self, daemon_pid: int) -> tuple[int, np.ndarray]:
        """Take over a segment whose daemon died (warm restart).

        Commits what writers had published (complete items), takes every slot still leased to a
        writer or held by a sampler away from its channel (returned, to be freed once whoever
        held it must have noticed the restart), clears the channels and rebuilds every derived
        structure from the per-slot metadata. Returns (items committed now, held slots).
        """
        try:
            self.mutex.acquire()  # robust: if the dead daemon held it, repair() runs first
        except SegmentError:
            # Its bytes are not a mutex any more (EINVAL): whoever "holds" it cannot release it
            # either. Make a fresh one; repair() below rebuilds what it protected.
            RobustMutex.initialize(self.segment.arrays["mutex"])
            self.mutex.acquire()
        try:
            # The dead daemon may have died half-way through anything, not only holding the
            # lock (an exception): rebuild from the per-slot metadata before trusting anything.
            repairs = int(self.ctrl[Ctrl.REPAIRS])  # (adoption's own repairs are not counted)
            self.repair()
            slots = [
                self._adoptable(c, int(h), int(t))
                for c, (h, t) in enumerate(self.chan[:, [Chan.PUB_HEAD, Chan.PUB_TAIL]])
            ]
            committed = self.commit(np.concatenate(slots)) if slots else 0
            held = np.flatnonzero(
                (self.state == SlotState.LEASED) | (self.state == SlotState.RELEASING)
            )
            self.owner[held] = QUARANTINED
            self.chan[:] = 0
            self.repair()
            self.ctrl[Ctrl.REPAIRS] = repairs
            for c in (
                Ctrl.SHUTDOWN,
                Ctrl.DAEMON_SLEEPING,
                Ctrl.SAMPLER_WAITING,
                Ctrl.TABLE_STATE,  # a new daemon tries again, on the repaired table
            ):
                self.ctrl[c] = 0
            self.ctrl[Ctrl.DAEMON_PID] = daemon_pid
        finally:
            self.mutex.release()
        return committed, held

    def _adoptable(self, c: int, head: int, tail: int) -> np.ndarray:
        """What channel ``c`` published that adopt() may commit. Unlike the running daemon's
        check (check_published), lenient: the dead daemon may have died between a commit and
        moving the ring's head, so slots committed already are skipped, and so is what makes
        no sense (noted in ``skipped_at_adoption``); the rest is committed."""
        n = tail - head
        if n <= 0 or n > PUBLISH_CAPACITY:
            if n != 0:
                self.skipped_at_adoption.append(f"channel {c}: ring head {head}, tail {tail}")
            return np.empty(0, np.int64)
        slots = ring_get(self.publish_ring[c], head, n)
        ok = (slots >= 0) & (slots < self.num_slots)
        safe = np.where(ok, slots, 0)
        p = self.priority[safe]
        ok &= (self.owner[safe] == c) & (self.state[safe] == SlotState.LEASED)
        ok &= np.isfinite(p) & (p >= 0) & (p <= self.max_priority)
        once = np.zeros(int(np.count_nonzero(ok)), dtype=bool)  # a slot published twice: once
        once[np.unique(slots[ok], return_index=True)[1]] = True
        ok[np.flatnonzero(ok)] = once
        if not ok.all():
            self.skipped_at_adoption.append(
                f"channel {c}: {int(np.count_nonzero(~ok))} of {n} published slot(s)"
            )
        return slots[ok]

    def release_quarantined(self, slots: np.ndarray) -> int:
        """Free slots adopt() held back; mutex taken here. Returns how many were freed."""
        with self.mutex:
            mine = slots[self.owner[slots] == QUARANTINED]
            self.state[mine] = SlotState.FREE
            self.owner[mine] = -1
            self._free_push(mine)
        return len(mine)

    def initialize(self, daemon_pid: int) -> None:
        """Put a freshly created segment in its empty state (every slot free)."""
        RobustMutex.initialize(self.segment.arrays["mutex"])
        RateLimiter.initialize(self.spec.rate_limiter, self.params)
        self.key[:] = np.arange(self.num_slots, dtype=np.uint64)
        self.owner[:] = -1
        self.free[:] = np.arange(self.num_slots)
        self.ctrl[Ctrl.FREE_HEAD], self.ctrl[Ctrl.FREE_TAIL] = 0, self.num_slots
        self.sampler.clear()
        self.remover.clear()
        self.ctrl[Ctrl.DAEMON_PID] = daemon_pid
        self.ctrl[Ctrl.READY] = 1

    # -- liveness ------------------------------------------------------------------------------

    def check_open(self, writing: bool = False) -> None:
        """Raise DaemonNotRunning if the daemon shut down, died or was replaced, ClientCutOff if
        it cut this client off, and, when ``writing``, TableQuarantined if it quarantined the
        table."""
        self._check_daemon()
        if self.channel is not None and self.chan[self.channel, Chan.PID] != os.getpid():
            raise ClientCutOff(
                f"table {self.name!r}: the shmreplay daemon cut this client off (channel "
                f"{self.channel}): it wrote a value into shared memory that makes no sense; the "
                "daemon's log names it. Call shmreplay.attach() again"
            )
        if writing and self.ctrl[Ctrl.TABLE_STATE] == TableState.QUARANTINED:
            raise TableQuarantined(
                f"table {self.name!r} is quarantined: the daemon stopped committing to it "
                "(its log says why); its items can still be sampled. Restart the daemon: it "
                "adopts the table and repairs it"
            )

    def _check_daemon(self) -> None:
        if self.ctrl[Ctrl.SHUTDOWN]:
            raise DaemonNotRunning(
                f"table {self.name!r}: the shmreplay daemon has shut down; "
                "start it again and re-attach"
            )
        pid = int(self.ctrl[Ctrl.DAEMON_PID])
        if self.daemon_pid is not None and pid != self.daemon_pid:
            raise DaemonNotRunning(
                f"table {self.name!r}: the shmreplay daemon was restarted (pid {self.daemon_pid}"
                f" -> {pid}) and adopted the tables; call shmreplay.attach() again"
            )
        try:
            os.kill(int(self.ctrl[Ctrl.DAEMON_PID]), 0)
        except ProcessLookupError:
            raise DaemonNotRunning(
                f"table {self.name!r}: the shmreplay daemon (pid {int(self.ctrl[Ctrl.DAEMON_PID])})"
                " died; start it again and re-attach"
            ) from None
        except PermissionError:
            pass  # alive, owned by another user

    # -- free ring (mutex held) ------------------------------------------------------------------

    def _free_push(self, slots: np.ndarray) -> None:
        """Push freed slots (their states set already) by csrc/free_ring.h's rule: a FREE_TAIL
        that does not fit (negative, or so large the push would overflow) is not pushed at;
        the ring is rebuilt from the slots' states instead, these slots included."""
        tail = int(self.ctrl[Ctrl.FREE_TAIL])
        if not 0 <= tail <= INT64_MAX - self.num_slots:
            self._repair_counts(f"the free ring's tail is {tail}")
            return
        ring_put(self.free, tail, slots)
        self.ctrl[Ctrl.FREE_TAIL] = tail + len(slots)

    @property
    def free_count(self) -> int:
        return int(self.ctrl[Ctrl.FREE_TAIL] - self.ctrl[Ctrl.FREE_HEAD])

    # -- daemon side (mutex held) -------------------------------------------------------------

    def sane_priorities(self, p: np.ndarray) -> np.ndarray:
        """Priorities read back from shared memory (unchecked: any process may have written
        them), clamped into 0..max_priority: NaN and negative ones become 0. The selectors take
        checked priorities only, so one bad value cannot poison a sum-tree."""
        return np.where(p >= 0.0, np.minimum(p, self.max_priority), 0.0)  # NaN fails p >= 0

    def _commit_engine(self):
        """The compiled commit metadata and free-slot lease over this table's arrays (made on
        first use: only the daemon commits and leases)."""
        engine = self._commit_table
        if engine is None:
            a = self.segment.arrays
            engine = self._commit_table = _native.CommitTable(
                a["ctrl"].reshape(-1),
                self.key,
                self.state,
                self.priority,
                self.times_sampled,
                self.seq,
                self.gen,
                self.owner,
                self.episode,
                self.free,
                self._last_episode,
                self.max_priority,
            )
            engine.attach(
                self.sampler._c_selector(),
                self.remover._c_selector(),
                self.commit_rng,
                self.spec.max_size,
            )
        return engine

    def lease(self, channel: int, n: int) -> np.ndarray:
        """Take up to ``n`` free slots for ``channel``, give them fresh keys; mutex held."""
        self.check_counts()
        engine = self._commit_engine()
        out = np.empty(max(n, 0), np.int64)
        k = engine.lease(channel, len(out), out)
        if k < 0:
            # The free ring lists a slot that is not one, or not free, or twice: rebuild it.
            self._repair_counts("its free ring lists slots that are not free")
            k = engine.lease(channel, len(out), out)
            if k < 0:
                raise CorruptStructure("the free ring makes no sense even after a repair")
        return out[:k]

    def commit(
        self, slots: np.ndarray, priorities: np.ndarray | None = None, in_place: bool = False
    ) -> int:
        """Make published slots sampleable, then evict what exceeds max_size; mutex held.

        ``slots`` are distinct and in range, ``priorities`` theirs as checked (None: read them
        now, clamped); the daemon's round checked both (CommitRound.drain). Returns how many
        items were committed: those still LEASED with an even generation. ``in_place``: the
        arrays are the caller's scratch (int64, float64), compacted in place instead of copied.
        Insert-then-evict: the remover chooses among all items including the new ones, with
        uniforms from ``commit_rng``. One C call (CommitTable.commit_all) does it all: the
        count checks of check_counts, the metadata, both selectors' inserts, the eviction.
        """
        if not in_place:
            slots = np.array(slots, np.int64)
        if priorities is None:  # (adoption) read back from shared memory: clamped
            priorities = self.sane_priorities(self.priority[slots])
        elif not in_place:
            priorities = np.array(priorities, np.float64)
        engine = self._commit_engine()
        k = engine.commit_all(slots, priorities)
        if k < 0:
            k = self._commit_repaired(engine, k, slots, priorities)
        return k

    def _commit_repaired(self, engine, code: int, slots: np.ndarray, prios: np.ndarray) -> int:
        """commit_all found the counts or a selector's arrays wrong: rebuild them from the
        per-slot metadata and finish the commit, once. -1: nothing had changed, commit again;
        -2: the metadata was committed (the rebuild takes the new items), evict again."""
        why, k = engine.why()
        self._repair_counts(why)
        if code == -1:
            code = engine.commit_all(slots, prios)
            if code >= 0:
                return code
            why, k = engine.why()
            if code == -1:
                raise CorruptStructure(f"table {self.name!r}: {why}, even after a repair")
            self._repair_counts(why)
        if engine.evict() < 0:
            raise CorruptStructure(f"table {self.name!r}: {engine.why()[0]}, even after a repair")
        return k

    def set_episode(self, slot: int, episode: tuple[int, int, int]) -> None:
        """A writer records the episode of the item it writes into ``slot`` (always: the slot
        may still hold an old item's). Three scalar stores: a row assignment costs 3x more."""
        self.episode[slot] = episode[0]
        steps = self.episode_steps
        steps[slot, 0] = episode[1]
        steps[slot, 1] = episode[2]

    def reclaim_channel(self, channel: int) -> int:
        """Free what a dead client's channel held (leased and releasing slots); mutex held.

        Returns the number of slots freed. Published items must be committed before this.
        """
        held = np.flatnonzero(
            (self.owner == channel)
            & ((self.state == SlotState.LEASED) | (self.state == SlotState.RELEASING))
        )
        self.state[held] = SlotState.FREE
        self.owner[held] = -1
        self._free_push(held)
        self.chan[channel, :] = 0
        return len(held)

    def _remove(self, slots: np.ndarray, releasing_owner: int | None = None) -> None:
        """Delete distinct READY items; their slots go back to the free ring, or, when a sampler
        still copies them, to RELEASING until it releases them."""
        if len(slots) == 0:
            return
        try:
            self.sampler.remove(slots)
            self.remover.remove(slots)
        except CorruptStructure as exc:
            # The slots are still READY: rebuilt, both selectors hold them again.
            self._repair_counts(str(exc))
            self.sampler.remove(slots)
            self.remover.remove(slots)
        # In C: the slots' state first, the counters after (as in commit): repair() trusts the
        # states and the deletes, and derives the inserts from them. The slots are in range:
        # the selectors removed them.
        slots = np.ascontiguousarray(slots, np.int64)
        self._engine.removed(slots, -1 if releasing_owner is None else releasing_owner)
        if releasing_owner is None:
            self._free_push(slots)

    def check_counts(self) -> None:
        """Check the counts the commit path trusts (size, the free ring's ends, the selectors'
        own counts) against each other and the table's bounds, in O(1); rebuild them from the
        per-slot metadata (the source of truth) if they disagree. Mutex held.

        They live in memory every sampler can write: a stray store must cost a repair and a
        warning, not the daemon. The checks run in C (CommitTable.check, csrc/commit.c), the
        ones commit_all makes first."""
        why = self._commit_engine().check()
        if why is not None:
            self._repair_counts(why)

    def _repair_counts(self, why: str) -> None:
        log.warning(
            "table %r: %s; rebuilt its structures from the per-slot metadata", self.name, why
        )
        self.repair()

    def repair(self) -> None:
        """Rebuild every derived structure from the per-slot metadata; mutex held.

        Called when a process died holding the mutex: whatever it was changing in the selectors,
        the free ring or the size is recomputed from the slots' states, keys and priorities.
        """
        ready = np.flatnonzero(self.state == SlotState.READY)
        ready = ready[np.argsort(self.seq[ready], kind="stable")]
        priorities = self.sane_priorities(self.priority[ready])
        self.priority[ready] = priorities
        self.sampler.rebuild(ready, priorities)
        self.remover.rebuild(ready, priorities)
        free = np.flatnonzero(self.state == SlotState.FREE)
        self.free[: len(free)] = free
        self.ctrl[Ctrl.FREE_HEAD], self.ctrl[Ctrl.FREE_TAIL] = 0, len(free)
        self.ctrl[Ctrl.SIZE] = len(ready)
        # size = inserts − deletes always (reset zeroes all three); a holder that died between a
        # commit's state change and its counter update left the inserts short.
        self.ctrl[Ctrl.INSERTS] = len(ready) + int(self.ctrl[Ctrl.DELETES])
        self.ctrl[Ctrl.UNIQUE_SAMPLED] = int(np.count_nonzero(self.times_sampled[ready]))
        self.ctrl[Ctrl.REPAIRS] += 1

    # -- sampling ------------------------------------------------------------------------------

    @functools.cached_property  # built on first use, over the segment's arrays
    def _engine(self) -> SampleCore:
        """The compiled sample path over this table's shared arrays (csrc/sample.c)."""
        engine = SampleCore(
            self.times_sampled,
            self.key,
            self.priority,
            self.gen,
            self.state,
            self.owner,
            self.free,
            self.segment.arrays["ctrl"],
            Ctrl.SAMPLES * LINE,
            Ctrl.TOTAL_SAMPLED * LINE,
            Ctrl.UNIQUE_SAMPLED * LINE,
            Ctrl.SIZE * LINE,
            Ctrl.DELETES * LINE,
            Ctrl.FREE_TAIL * LINE,
            self.spec.max_times_sampled,
            list(self.data.values()),
        )
        a = self.segment.arrays
        engine.configure(
            self.sampler._c_selector(),
            self.remover._c_selector(),
            a["mutex"],
            a["params"],
            a["chan.ctrl"],
        )
        return engine

    def _select(self, n: int, channel: int, count_samples: bool) -> _Selection | None:
        """Choose up to ``n`` items and do their bookkeeping; mutex held. None if blocked."""
        size = int(self.ctrl[Ctrl.SIZE])
        if count_samples:
            n = self.limiter.sample_allowance(n)
        if n <= 0 or size <= 0:
            return None
        # The draw is the sampler's (a later step calls it from C in the same call as the
        # bookkeeping: the seam is here).
        slots, probability = self._draw(n)
        if len(slots) == 0:
            return None
        try:
            return self._selected(slots, probability, size, channel, count_samples)
        except CorruptStructure as exc:
            # A slot outside the table: the sampler's structures are corrupt. Nothing was
            # written; rebuild them and draw again once.
            self._repair_counts(str(exc))
            slots, probability = self._draw(n)
            if len(slots) == 0:
                return None
            return self._selected(slots, probability, size, channel, count_samples)

    def _draw(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The sampler's draw; mutex held. The engine refuses to walk selector arrays that
        contradict themselves (CorruptStructure, nothing changed): rebuild them from the
        per-slot metadata and draw again."""
        try:
            return self.sampler.sample(n, self.rng, self._times_left)
        except CorruptStructure as exc:
            self._repair_counts(str(exc))
            return self.sampler.sample(n, self.rng, self._times_left)

    def _selected(
        self,
        slots: np.ndarray,
        probability: np.ndarray,
        size: int,
        channel: int,
        count_samples: bool,
    ) -> _Selection:
        """The draw's bookkeeping in C (times sampled as if drawn one at a time, draws past
        max_times_sampled dropped, per-draw table size, counters, the snapshot of key, priority
        and generation), then the deletion of the items it exhausted; mutex held."""
        # Read only (a sampler may hand out a view of its arrays); converted only if needed.
        if slots.dtype != np.int64 or not slots.flags.c_contiguous:
            slots = np.ascontiguousarray(slots, np.int64)
        if probability.dtype != np.float64 or not probability.flags.c_contiguous:
            probability = np.ascontiguousarray(probability, np.float64)
        k = len(slots)
        kept, kept_probability = np.empty(k, np.int64), np.empty(k, np.float64)
        key = np.empty(k, np.uint64)
        priority = np.empty(k, np.float64)
        times = np.empty(k, np.int32)
        gen = np.empty(k, np.int64)
        table_size = np.empty(k, np.int64)
        exhausted = np.empty(k, np.int64)
        try:
            taken, n_exhausted = self._engine.select(
                slots,
                probability,
                kept,
                kept_probability,
                key,
                priority,
                times,
                gen,
                table_size,
                exhausted,
                size,
                count_samples,
            )
        except CorruptStructure as exc:
            raise CorruptStructure(f"its sampler drew a slot outside the table ({exc})") from None
        selection = _Selection(
            kept, kept_probability, key, priority, times, gen, table_size, exhausted[:n_exhausted]
        )
        if taken < k:
            for f in (
                "slots",
                "probability",
                "key",
                "priority",
                "times_sampled",
                "gen",
                "table_size",
            ):
                setattr(selection, f, getattr(selection, f)[:taken])
        if n_exhausted:
            self._remove(selection.releasing, releasing_owner=channel)
        return selection

    def _release(self, slots: np.ndarray, channel: int) -> None:
        if len(slots) == 0:
            return
        with self.mutex:
            # In C: those still RELEASING for us become FREE and go on the free ring.
            try:
                freed = self._engine.release(slots, channel)
            except CorruptStructure as exc:  # a FREE_TAIL that does not fit: nothing changed
                self._repair_counts(f"releasing sampled slots: {exc}")
                freed = self._engine.release(slots, channel)
        if self.events is not None and freed:
            self.events.daemon.post(1)  # free slots may unblock a writer waiting for a lease

    def sample(
        self,
        batch_size: int,
        *,
        channel: int,
        timeout: float | None = None,
        partial: bool = False,
        out: dict[str, np.ndarray] | None = None,
    ) -> Sample:
        """Sample ``batch_size`` items, blocking while the rate limiter or an empty table says so.

        Rows are gathered after the mutex is released; a row whose slot was recycled meanwhile
        (its generation changed) is drawn again, so no torn or foreign row is ever returned.

        With a random sampler (uniform, prioritized) the whole sample is one call into the
        engine (SampleCore.sample: lock, limiter, draw, bookkeeping, max_times_sampled removal,
        unlock, copy, generation check); what it cannot finish alone (a busy lock, a short or
        torn batch, a structure to repair, blocking) continues here.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise InvalidArgumentError(f"batch_size must be an int, got {batch_size!r}")
        if batch_size <= 0:
            raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
        n = int(batch_size)
        if out is None:
            self._check_batch_fits(n)
        out = self._output_buffers(n, out)
        if self._carry:
            return self._sample_slowly(n, None, None, out, channel, timeout, partial)
        if not self._one_call or before_copy_hook is not None:
            return self._sample_python(n, out, channel, timeout, partial)
        engine = self._engine
        if self.rng is not self._engine_rng:  # a client seeds its own (Client(seed=...))
            engine.set_rng(self.rng.bit_generator)
            self._engine_rng = self.rng
        outs = tuple([out[name] for name in self.data])
        key, probability, priority = np.empty(n, np.uint64), np.empty(n), np.empty(n)
        times_sampled, table_size = np.empty(n, np.int32), np.empty(n, np.int64)
        deadline = None if timeout is None else time.monotonic() + timeout
        locked = False
        while True:
            status, taken, n_exhausted, n_intact, wake, freed = engine.sample(
                n, channel, outs, key, probability, priority, times_sampled, table_size, locked
            )
            locked = False
            if status == SampleCore.SAMPLED or status == SampleCore.UNREMOVED:
                break
            if status == SampleCore.BUSY:
                # A holder that is stopped, not dead, keeps the lock: waiting for it honours
                # the timeout and names its pid (LockTimeout).
                self.mutex.acquire(
                    _lock_wait(None if deadline is None else deadline - time.monotonic())
                )
                locked = True
            elif status == SampleCore.OWNER_DIED:
                self.mutex.recover_from_dead_owner()  # repairs; we keep the lock
                locked = True
            elif status == SampleCore.BLOCKED:
                # Wait here and call again, so that a woken sampler takes the short path.
                self._wait_unblocked(n, channel, deadline, timeout)
            else:  # SLOW: nothing done; a partial allowance, a structure to repair
                return self._sample_python(n, out, channel, timeout, partial, deadline)
        info = SampleInfo(key, probability, priority, times_sampled, table_size)
        if status == SampleCore.SAMPLED and freed >= 0 and taken == n_intact == n:
            if (wake or freed) and self.events is not None:
                # Samples made room for blocked writers, or freed slots for their leases.
                self.events.daemon.post(1)
            return Sample(out, info)
        return self._sample_rest(
            n,
            status,
            (taken, n_exhausted, freed),
            wake,
            out,
            info,
            channel,
            timeout,
            partial,
            deadline,
        )

    @functools.cached_property  # fixed for the table's life
    def _one_call(self) -> bool:
        """Whether the engine draws for this table's sampler (the random kinds); the
        deterministic ones draw in Python (Deterministic.sample)."""
        return self.spec.sampler.kind in ("uniform", "prioritized")

    _engine_rng: np.random.Generator | None = None  # the rng the engine draws from

    def _sample_rest(
        self,
        n: int,
        status: int,
        counts: tuple[int, int, int],
        wake: bool,
        out: dict[str, np.ndarray],
        info: SampleInfo,
        channel: int,
        timeout: float | None,
        partial: bool,
        deadline: float | None,
    ) -> Sample:
        """After SampleCore.sample booked a selection it could not finish alone: items it
        exhausted to release (or, UNREMOVED, still to remove from the selectors, lock held),
        draws dropped by max_times_sampled, rows recycled during the copy. ``counts``: its
        taken, n_exhausted and freed."""
        taken, n_exhausted, freed = counts
        slots, gen = np.empty(taken, np.int64), np.empty(taken, np.int64)
        releasing, intact = np.empty(n_exhausted, np.int64), np.empty(taken, np.bool_)
        self._engine.last_selection(slots, gen, releasing, intact)
        sel = _Selection(
            slots,
            info.probability[:taken],
            info.key[:taken],
            info.priority[:taken],
            info.times_sampled[:taken],
            gen,
            info.table_size[:taken],
            releasing,
        )
        if status == SampleCore.UNREMOVED:
            try:  # a selector refused the removal: repair, remove (TableCore._remove)
                self._remove(releasing, releasing_owner=channel)
            finally:
                self.mutex.release()
            self._wake_blocked_writers()
            # Not copied yet: _deliver copies, checks and releases.
            return self._sample_slowly(n, sel, None, out, channel, timeout, partial, deadline)
        if freed == SampleCore.RELEASE_OWNER_DIED:  # we hold the lock: repair, then release
            self.mutex.recover_from_dead_owner()  # a failed repair unlocks and raises
            try:
                freed = self._engine.release(releasing, channel)
            finally:
                self.mutex.release()
        elif freed == SampleCore.RELEASE_PENDING:
            self._release(releasing, channel)  # posts the daemon if it freed any
            freed = 0
        if (wake or freed) and self.events is not None:
            self.events.daemon.post(1)
        if taken == n and intact.all():
            return Sample(out, info)
        return self._sample_slowly(n, sel, intact, out, channel, timeout, partial, deadline)

    def _sample_python(
        self,
        n: int,
        out: dict[str, np.ndarray],
        channel: int,
        timeout: float | None,
        partial: bool,
        deadline: float | None = None,
    ) -> Sample:
        """The sample path in Python steps (the lock, _select, _gather): deterministic
        samplers, and what the one-call path hands over."""
        if deadline is None and timeout is not None:
            deadline = time.monotonic() + timeout
        while True:
            # A holder that is stopped, not dead, keeps the lock: waiting for it honours the
            # timeout and names its pid (LockTimeout).
            self.mutex.acquire(
                _lock_wait(None if deadline is None else deadline - time.monotonic())
            )
            try:
                self.chan[channel, Chan.WAIT_SAMPLE] = 0
                sel = self._select(n, channel, count_samples=True)
                if sel is None:
                    self.chan[channel, Chan.WAIT_SAMPLE] = 1  # registered before we unlock
                    self.ctrl[Ctrl.SAMPLER_WAITING] = 1
            finally:
                self.mutex.release()
            if sel is not None:
                break
            # Blocked with nothing taken: wait here and draw again, so that a woken sampler
            # takes the short path below (the wake-to-sample latency is mostly Python run cold).
            self._wait_unblocked(n, channel, deadline, timeout)
        self._wake_blocked_writers()
        if len(sel.slots) == n:
            # The common case: one draw, copied intact. Its arrays become the sample info.
            if before_copy_hook is not None:
                before_copy_hook(self, sel.slots)
            intact = np.empty(n, np.bool_)
            copied = self._gather(sel, out, None, intact)
            if len(sel.releasing):
                self._release(sel.releasing, channel)
            if copied == n:
                info = SampleInfo(
                    sel.key,
                    sel.probability,
                    sel.priority,
                    sel.times_sampled,
                    sel.table_size,
                )
                return Sample(out, info)
        else:
            intact = None
        return self._sample_slowly(n, sel, intact, out, channel, timeout, partial, deadline)

    def _wait_unblocked(
        self, n: int, channel: int, deadline: float | None, timeout: float | None
    ) -> None:
        """Blocked with nothing taken, registered as waiting (WAIT_SAMPLE, under the lock): wait
        for the sample event until ``deadline``; RateLimiterTimeout once it has passed."""
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            self.chan[channel, Chan.WAIT_SAMPLE] = 0
            raise RateLimiterTimeout(self._blocked_message("sample", n, 0, timeout))
        self.events.sample.wait(0.5 if wait is None else wait)
        self.check_open()

    def _sample_slowly(
        self,
        n: int,
        first: _Selection | None,
        first_intact: np.ndarray | None,
        out: dict[str, np.ndarray],
        channel: int,
        timeout: float | None,
        partial: bool,
        deadline: float | None = None,
    ) -> Sample:
        """Blocking, short draws and recycled rows. ``first`` is the draw already made (None if
        blocked); ``first_intact`` says which of its rows were copied intact, if it was;
        ``deadline`` (time.monotonic) the end of ``timeout`` if the call already waited."""
        info = SampleInfo(
            key=np.empty(n, np.uint64),
            probability=np.empty(n, np.float64),
            priority=np.empty(n, np.float64),
            times_sampled=np.empty(n, np.int32),
            table_size=np.empty(n, np.int64),
        )
        if deadline is None and timeout is not None:
            deadline = time.monotonic() + timeout
        filled = self._take_carry(out, info, n)
        if first is not None:
            self._deliver(first, out, info, 0, channel, first_intact)
            filled = len(first.slots)
        while filled < n:
            self.mutex.acquire(
                _lock_wait(None if deadline is None else deadline - time.monotonic())
            )
            try:
                self.chan[channel, Chan.WAIT_SAMPLE] = 0
                sel = self._select(n - filled, channel, count_samples=True)
                if sel is None:
                    self.chan[channel, Chan.WAIT_SAMPLE] = 1  # registered before we unlock
                    self.ctrl[Ctrl.SAMPLER_WAITING] = 1
            finally:
                self.mutex.release()
            if sel is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self.chan[channel, Chan.WAIT_SAMPLE] = 0
                    if partial and filled > 0:
                        break
                    message = self._blocked_message("sample", n, filled, timeout)
                    if filled:  # already counted as sampled: the next call delivers them
                        self._carry.append(
                            (
                                {k: v[:filled].copy() for k, v in out.items()},
                                SampleInfo(*(getattr(info, f)[:filled] for f in _INFO_FIELDS)),
                            )
                        )
                    raise RateLimiterTimeout(message)
                self.events.sample.wait(0.5 if remaining is None else remaining)
                self.check_open()
                continue
            self._wake_blocked_writers()
            self._deliver(sel, out, info, filled, channel)
            filled += len(sel.slots)
        if filled < n:
            out = {k: v[:filled] for k, v in out.items()}
            info = SampleInfo(*(getattr(info, f)[:filled] for f in _INFO_FIELDS))
        return Sample(out, info)

    def _take_carry(self, out: dict[str, np.ndarray], info: SampleInfo, n: int) -> int:
        """Put up to ``n`` items left over by a timed-out call first in the batch."""
        filled = 0
        while self._carry and filled < n:
            data, carried = self._carry[0]
            k = min(n - filled, len(carried.key))
            for name, column in data.items():
                out[name][filled : filled + k] = column[:k]
            for f in _INFO_FIELDS:
                getattr(info, f)[filled : filled + k] = getattr(carried, f)[:k]
            if k == len(carried.key):
                self._carry.pop(0)
            else:
                self._carry[0] = (
                    {name: column[k:] for name, column in data.items()},
                    SampleInfo(*(getattr(carried, f)[k:] for f in _INFO_FIELDS)),
                )
            filled += k
        return filled

    def _wake_blocked_writers(self) -> None:
        """Samples make room under a ratio limiter: have the daemon lease to blocked writers."""
        if self.limiter.blocks_inserts and self.chan[:, Chan.WAIT_INSERT].any():
            self.events.daemon.post(1)

    def _deliver(
        self,
        sel: _Selection,
        out: dict[str, np.ndarray],
        info: SampleInfo,
        start: int,
        channel: int,
        intact: np.ndarray | None = None,
    ) -> None:
        """Copy the selected rows (unless ``intact`` says they were copied already), re-drawing
        those whose slot was recycled during the copy."""
        todo = np.arange(start, start + len(sel.slots))
        for _ in range(MAX_REDRAW_ROUNDS):
            positions, todo = todo[: len(sel.slots)], todo[len(sel.slots) :]
            if intact is None:
                if before_copy_hook is not None:
                    before_copy_hook(self, sel.slots)
                intact = np.empty(len(sel.slots), np.bool_)
                self._gather(sel, out, positions, intact)
                self._release(sel.releasing, channel)
            done = positions[intact]
            info.key[done] = sel.key[intact]
            info.probability[done] = sel.probability[intact]
            info.priority[done] = sel.priority[intact]
            info.times_sampled[done] = sel.times_sampled[intact]
            info.table_size[done] = sel.table_size[intact]
            todo = np.concatenate([positions[~intact], todo])
            if len(todo) == 0:
                return
            sel = self._reselect(len(todo), channel)
            intact = None
        raise RuntimeError(
            f"table {self.name!r}: rows kept changing during {MAX_REDRAW_ROUNDS} copies"
        )

    def _reselect(self, n: int, channel: int) -> _Selection:
        """Draw replacements for recycled rows (already counted by the rate limiter)."""
        while True:
            with self.mutex:
                sel = self._select(n, channel, count_samples=False)
            if sel is not None:
                return sel
            self.events.sample.wait(0.05)  # the table emptied meanwhile
            self.check_open()

    def _gather(
        self,
        sel: _Selection,
        out: dict[str, np.ndarray],
        positions: np.ndarray | None,
        intact: np.ndarray,
    ) -> int:
        """Copy rows ``sel.slots`` to ``out[...][positions]`` (None: to the first len(slots)
        rows), GIL released, then check their generations against the selection's snapshot
        (the seqlock read): ``intact`` says which rows were copied intact; returns how many."""
        outs = tuple([out[name] for name in self.data])
        if positions is not None:  # the rare path (_deliver): arange/concatenate, int64
            positions = np.ascontiguousarray(positions, np.int64)
        return self._engine.gather(sel.slots, sel.gen, outs, positions, intact)

    def _check_batch_fits(self, n: int) -> None:
        """Refuse a batch whose rows and info cannot be held in this machine's memory."""
        item_bytes, have = self._batch_limits
        need = n * item_bytes
        if n > MAX_BATCH_SIZE:
            raise InvalidArgumentError(
                f"table {self.name!r}: batch_size {n:,} is above the largest batch, "
                f"{MAX_BATCH_SIZE:,} items; sample smaller batches"
            )
        if have is not None and need > have:
            raise InvalidArgumentError(
                f"table {self.name!r}: a batch of {n:,} items needs {need:,} bytes for its rows "
                f"and info, more than this machine's {have:,} bytes of memory; sample smaller "
                "batches"
            )

    @functools.cached_property  # fixed for the table's life; read on every sample()
    def _batch_limits(self) -> tuple[int, int | None]:
        """(bytes of one sampled item's row and info, this machine's memory)."""
        return self.spec.row_bytes + SAMPLE_INFO_BYTES, physical_memory()

    def _output_buffers(self, n: int, out: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        if out is None:
            try:
                return {
                    name: np.empty((n, *shape), dtype=dtype)
                    for name, shape, dtype in self._out_fields
                }
            except MemoryError:
                raise InvalidArgumentError(
                    f"table {self.name!r}: cannot allocate a batch of {n} items "
                    f"({n * self.spec.row_bytes:,} bytes of rows); sample smaller batches"
                ) from None
        for name, shape, dtype in self._out_fields:
            buf = out.get(name)
            if buf is None or buf.shape != (n, *shape) or buf.dtype != dtype:
                raise InvalidArgumentError(
                    f"out[{name!r}] must be a {dtype} array of shape {(n, *shape)}, "
                    f"got {None if buf is None else (buf.dtype, buf.shape)}"
                )
            flags = buf.flags
            if not (flags.c_contiguous and flags.writeable):
                raise InvalidArgumentError(f"out[{name!r}] must be C-contiguous and writable")
        return out

    @functools.cached_property  # fixed for the table's life; checked on every sample(out=...)
    def _out_fields(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        return [(f.name, tuple(f.shape), f.np_dtype) for f in self.spec.signature]

    def _blocked_message(self, side: str, n: int, filled: int, timeout: float | None) -> str:
        lim = self.limiter.info()
        return (
            f"table {self.name!r}: {side} blocked by the rate limiter for {timeout} s "
            f"({filled} of {n} items obtained; size {int(self.ctrl[Ctrl.SIZE])}, "
            f"min_size_to_sample {lim.min_size_to_sample}, inserts {lim.inserts}, "
            f"samples {lim.samples}, deletes {lim.deletes}); pass a longer timeout, "
            f"or partial=True to accept a short batch"
        )

    # -- mutations -----------------------------------------------------------------------------

    @functools.cached_property  # fixed for the table's life; read on every insert
    def max_priority(self) -> float:
        """The largest priority the table accepts: the smaller of its sampler's and remover's
        limits (a prioritized selector's weights must not overflow; else the largest float)."""
        return min(self.sampler.max_priority, self.remover.max_priority)

    def update_priorities(
        self,
        keys: np.ndarray,
        priorities: np.ndarray,
        deletes: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> int:
        """Set priorities of present items (duplicates: last wins); return how many were missing.

        ``deletes`` are deleted first, in the same critical section (Reverb's order). Like every
        mutation here, waits at most ``timeout`` s for the table lock (LockTimeout names the
        holder: a stopped process keeps it until it is continued or dies). Raises
        InvalidArgumentError, changing nothing, unless every priority is a number with
        0 <= p <= :attr:`max_priority` (one per key)."""
        priorities = check_priorities(priorities, len(keys), self.max_priority, self.name)
        keys = np.require(keys, np.uint64, "C")
        priorities = np.require(priorities, np.float64, "C")
        n = len(keys)
        slots, stored = np.empty(n, np.int64), np.empty(n, np.float64)
        deleted = 0
        with self.mutex.held(_lock_wait(timeout)):
            if deletes is not None and len(deletes):
                deleted = self._delete_present(deletes)
            # In C: key -> slot lookup, duplicates last-wins, the priority stores; the present
            # items' (slot, priority) in call order for the selectors.
            present, missing = self._engine.update(keys, priorities, slots, stored)
            if present:
                s, p = slots[:present], stored[:present]
                try:
                    self.sampler.update(s, p)
                    self.remover.update(s, p)
                except CorruptStructure as exc:
                    # The priorities are stored already: rebuilding the selectors from the
                    # per-slot metadata applies the update too.
                    self._repair_counts(str(exc))
        if deleted and self.events is not None:
            self.events.daemon.post(1)  # deletions may let blocked inserts in
        return missing

    def delete(self, keys: np.ndarray, timeout: float | None = None) -> int:
        """Delete present items. Returns how many keys were missing."""
        with self.mutex.held(_lock_wait(timeout)):
            deleted = self._delete_present(keys)
        if self.events is not None and deleted:
            self.events.daemon.post(1)
        return int(len(keys) - deleted)

    def _delete_present(self, keys: np.ndarray) -> int:
        """Delete the items of ``keys`` still present; how many there were. Mutex held."""
        keys = np.require(keys, np.uint64, "C")
        victims = np.empty(len(keys), np.int64)
        k = self._engine.present(keys, victims)  # distinct slots of present keys, ascending
        self._remove(victims[:k])
        return k

    def set_rate_limiter(self, spec: RateLimiterSpec, timeout: float | None = None) -> None:
        """Replace the limiter's parameters (counters stay); every waiter re-checks at once.
        Waits at most ``timeout`` seconds (None: forever) for the table lock (LockTimeout)."""
        with self.mutex.held(_lock_wait(timeout)):
            RateLimiter.initialize(spec, self.params)
        if self.events is not None:
            waiting = self.chan[:, Chan.WAIT_SAMPLE] | self.chan[:, Chan.WAIT_INSERT]
            self.events.sample.post(int(np.count_nonzero(self.chan[:, Chan.WAIT_SAMPLE])))
            self.events.insert.post(int(np.count_nonzero(self.chan[:, Chan.WAIT_INSERT])))
            if waiting.any():
                self.events.daemon.post(1)

    def reset(self, timeout: float | None = None) -> None:
        """Remove every item and zero the rate-limiter counters (writers' leases stay)."""
        with self.mutex.held(_lock_wait(timeout)):
            ready = np.flatnonzero(self.state == SlotState.READY)
            self.state[ready] = SlotState.FREE
            self._free_push(ready)
            self.sampler.clear()
            self.remover.clear()
            for c in (
                Ctrl.INSERTS,
                Ctrl.SAMPLES,
                Ctrl.DELETES,
                Ctrl.SIZE,
                Ctrl.UNIQUE_SAMPLED,
                Ctrl.EPISODES,
            ):
                self.ctrl[c] = 0
            self.ctrl[Ctrl.RESETS] += 1
        if self.events is not None:
            self.events.daemon.post(1)

    # -- statistics ----------------------------------------------------------------------------

    def info(self, timeout: float | None = None, max_age: float | None = None) -> TableInfo:
        """The table's statistics. Counters are read together under the table lock (waiting at
        most ``timeout`` seconds, None: forever, then LockTimeout), which costs O(1). The
        priority extremes and episode counts need a scan of every slot (~5-30 ms per million
        items): with ``max_age``, the scan this process made of a table of SCAN_REUSE_SLOTS
        slots or more is reused for ``max_age`` seconds, so that frequent callers (the daemon's
        ``info``, metrics scrapes) cost O(1) and at most one scan per ``max_age``; those three
        values are then up to ``max_age`` seconds old. A smaller table is always scanned."""
        # Under the lock: a consistent snapshot (a commit briefly holds max_size + k items).
        with self.mutex.held(_lock_wait(timeout)):
            c = self.ctrl.copy()
            limiter = self.limiter.info()
        layout = self.segment.layout
        scan = self._scan
        now = time.monotonic()
        if (
            max_age is None
            or scan is None
            or self.num_slots < SCAN_REUSE_SLOTS  # cheaper to scan again than to be stale
            or now - scan[0] > max_age
        ):
            ready = self.state == SlotState.READY
            present = self.priority[ready]
            episodes = self.episode[ready]
            extremes = (
                float(present.max()) if len(present) else None,
                float(present.min()) if len(present) else None,
                len(np.unique(episodes[episodes != 0])),
            )
            scan = self._scan = (now, *extremes)
        _, max_priority, min_priority, num_episodes = scan
        return TableInfo(
            name=self.name,
            max_size=self.spec.max_size,
            current_size=int(c[Ctrl.SIZE]),
            max_times_sampled=self.spec.max_times_sampled,
            sampler=self.sampler.options(),
            remover=self.remover.options(),
            rate_limiter=limiter,
            signature=self.spec.signature,
            num_unique_samples=int(c[Ctrl.UNIQUE_SAMPLED]),
            total_inserted=int(c[Ctrl.TOTAL_INSERTED]),
            total_sampled=int(c[Ctrl.TOTAL_SAMPLED]),
            total_evicted=int(c[Ctrl.TOTAL_EVICTED]),
            resets=int(c[Ctrl.RESETS]),
            repairs=int(c[Ctrl.REPAIRS]),
            clients=int(np.count_nonzero(self.chan[:, Chan.PID])),
            max_priority=max_priority,
            min_priority=min_priority,
            num_episodes=num_episodes,
            num_deleted_episodes=max(0, int(c[Ctrl.EPISODES]) - num_episodes),
            segment_bytes=layout.total_size,
            data_bytes=layout.data_bytes,
        )
