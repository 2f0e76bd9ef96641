"""Reference model of the daemon's commit round (shmreplay/engine/csrc/commit.c).

The numpy code TableCore and the daemon ran before the round moved to C: the publish-run check
(check_published), the commit's metadata (commit, _count_episodes), the free-ring pop with its
checks (lease, _all_free, _repeated), and the daemon's per-round drain / finish / lease on the
channels' rings. It works on a dict of plain numpy arrays (the segment's, or copies), so a test
can run the engine on one set and the model on an identical copy and compare them all.

Differences from the old code, made so that results are exactly comparable: the drain copies
all channels' runs into one output (the daemon concatenated them), episode owners outside
0..max_clients-1 are not counted (numpy wrapped negative ones), and the selectors are left to
the caller (as in the engine: the seam where a later step inserts from C).
"""

from __future__ import annotations

import numpy as np

from shmreplay.engine.layout import LEASE_CAPACITY, PUBLISH_CAPACITY, Chan, Ctrl, SlotState
from shmreplay.engine.rings import ring_get, ring_put

SLOT_MASK = np.uint64(0xFFFFFFFF)
TAG_SHIFT = np.uint64(32)


class CommitModel:
    """``a``: ctrl [Ctrl.COUNT] (column 0 of the lines), key, state, priority, times_sampled,
    seq, gen, owner, episode, free, chan [clients, Chan.COUNT], lease [clients, LEASE_CAPACITY],
    publish [clients, PUBLISH_CAPACITY]; plus the daemon's private active, pub_head, lease_tail,
    outstanding, last_episode (numpy arrays, modified in place)."""

    def __init__(self, a: dict[str, np.ndarray], max_priority: float) -> None:
        self.a = a
        self.num_slots = len(a["key"])
        self.max_priority = max_priority
        self.drained: dict[int, int] = {}

    # -- the checks ---------------------------------------------------------------------------

    def repeated(self, slots: np.ndarray) -> int | None:
        """The first slot of ``slots`` (in range) listed again later, or None."""
        if len(slots) < 2:
            return None
        scratch = np.empty(self.num_slots, np.int64)
        positions = np.arange(len(slots))
        scratch[slots] = positions  # the last write wins
        lost = scratch[slots] != positions
        if not np.count_nonzero(lost):
            return None
        return int(slots[np.argmax(lost)])

    def check_published(
        self, channel: int, head: int, tail: int, held: int
    ) -> tuple[np.ndarray, np.ndarray] | str:
        a = self.a
        n = tail - head
        if n < 0:
            return f"its publish ring's tail ({tail}) is behind its head ({head})"
        if n > min(PUBLISH_CAPACITY, held):
            return (
                f"its publish ring's tail ({tail}) is {n} ahead of its head ({head}), but it "
                f"holds {held} leased slot(s) (ring capacity {PUBLISH_CAPACITY})"
            )
        slots = ring_get(a["publish"][channel], head, n)
        if n == 0:
            return slots, a["priority"][slots]
        outside = (slots < 0) | (slots >= self.num_slots)
        if outside.any():
            return (
                f"it published slot index {int(slots[np.argmax(outside)])}, outside "
                f"0..{self.num_slots - 1}"
            )
        foreign = (a["owner"][slots] != channel) | (a["state"][slots] != SlotState.LEASED)
        if foreign.any():
            s = int(slots[np.argmax(foreign)])
            return (
                f"it published slot {s}, which is not leased to it (state "
                f"{int(a['state'][s])}, owner channel {int(a['owner'][s])})"
            )
        twice = self.repeated(slots)
        if twice is not None:
            return f"it published slot {twice} twice"
        priorities = a["priority"][slots]
        limit = self.max_priority
        bad = ~((priorities >= 0) & (priorities <= limit))  # NaN is bad
        if bad.any():
            i = int(np.argmax(bad))
            return (
                f"it published priority {float(priorities[i])!r} for slot {int(slots[i])}; "
                f"priorities must be finite, >= 0 and at most {limit!r}"
            )
        return slots, priorities

    # -- the daemon's round -------------------------------------------------------------------

    def pending(self) -> bool:
        a = self.a
        return bool((a["active"] & (a["chan"][:, Chan.PUB_TAIL] != a["pub_head"])).any())

    def drain(self) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """(slots, priorities, refused): every active channel's checked run, in channel order."""
        a = self.a
        self.drained = {}
        parts, prios, refused = [], [], []
        for c in range(len(a["active"])):
            tail, head = int(a["chan"][c, Chan.PUB_TAIL]), int(a["pub_head"][c])
            if not a["active"][c] or tail == head:
                continue
            checked = self.check_published(c, head, tail, int(a["outstanding"][c]))
            if isinstance(checked, str):
                refused.append((c, checked))
                continue
            parts.append(checked[0])
            prios.append(checked[1])
            self.drained[c] = tail
        if not parts:
            return np.empty(0, np.int64), np.empty(0, np.float64), refused
        return np.concatenate(parts), np.concatenate(prios), refused

    def finish(self) -> int:
        a = self.a
        for c, tail in self.drained.items():
            a["outstanding"][c] -= tail - a["pub_head"][c]
            a["pub_head"][c] = tail
            a["chan"][c, Chan.PUB_HEAD] = tail
        done, self.drained = len(self.drained), {}
        return done

    def round_lease(self, c: int, n: int) -> int:
        a = self.a
        slots = self.lease_pop(c, min(n, LEASE_CAPACITY))
        if slots is None:
            return -1
        k = len(slots)
        if k:
            tail = int(a["lease_tail"][c])
            ring_put(a["lease"][c], tail, slots)
            a["lease_tail"][c] = tail + k
            a["outstanding"][c] += k
            a["chan"][c, Chan.LEASE_TAIL] = tail + k
        return k

    # -- the table's metadata -----------------------------------------------------------------

    def count_episodes(self, slots: np.ndarray) -> None:
        a = self.a
        episodes = a["episode"][slots]
        channels = a["owner"][slots].astype(np.int64)
        counted = (episodes != 0) & (channels >= 0) & (channels < len(a["last_episode"]))
        new = 0
        for c in np.unique(channels[counted]):
            ids = episodes[(channels == c) & counted]
            new += int(np.count_nonzero(np.unique(ids) != a["last_episode"][c]))
            a["last_episode"][c] = ids[-1]
        a["ctrl"][Ctrl.EPISODES] += new

    def commit_meta(self, slots: np.ndarray, priorities: np.ndarray) -> tuple[np.ndarray, ...]:
        """(kept slots, their priorities), metadata and counters committed."""
        a = self.a
        keep = (a["state"][slots] == SlotState.LEASED) & (a["gen"][slots] % 2 == 0)
        slots, priorities = slots[keep], priorities[keep]
        k = len(slots)
        if k == 0:
            return slots, priorities
        a["priority"][slots] = priorities
        self.count_episodes(slots)
        seq0 = int(a["ctrl"][Ctrl.SEQ])
        a["seq"][slots] = np.arange(seq0, seq0 + k)
        a["ctrl"][Ctrl.SEQ] = seq0 + k
        a["times_sampled"][slots] = 0
        a["owner"][slots] = -1
        a["state"][slots] = SlotState.READY
        a["ctrl"][Ctrl.INSERTS] += k
        a["ctrl"][Ctrl.TOTAL_INSERTED] += k
        a["ctrl"][Ctrl.SIZE] += k
        a["ctrl"][Ctrl.COMMITS] += 1
        return slots, priorities

    def all_free(self, slots: np.ndarray) -> bool:
        if int(slots.min()) < 0 or int(slots.max()) >= self.num_slots:
            return False
        if np.count_nonzero(self.a["state"][slots] != SlotState.FREE):
            return False
        return self.repeated(slots) is None

    def lease_pop(self, channel: int, n: int) -> np.ndarray | None:
        """Up to ``n`` free slots with fresh keys, or None if the free ring makes no sense
        (nothing changed then)."""
        a = self.a
        head, tail = int(a["ctrl"][Ctrl.FREE_HEAD]), int(a["ctrl"][Ctrl.FREE_TAIL])
        if head < 0 or tail < head or tail - head > self.num_slots:
            return None
        k = min(n, tail - head)
        if k <= 0:
            return np.empty(0, np.int64)
        slots = ring_get(a["free"], head, k)
        if not self.all_free(slots):
            return None
        a["ctrl"][Ctrl.FREE_HEAD] = head + k
        tags = (a["key"][slots] >> TAG_SHIFT) + np.uint64(1)
        a["key"][slots] = (tags << TAG_SHIFT) | slots.astype(np.uint64)
        a["owner"][slots] = channel
        a["state"][slots] = SlotState.LEASED
        return slots


class FullCommitModel:
    """TableCore.commit as one step (the engine's CommitTable.commit_all): the count checks,
    the metadata (``model``), the sampler's and the remover's insert, the eviction of what
    exceeds ``max_size``. ``sampler``/``remover``: reference selectors (tests/reference/
    random_selectors.py takes uniforms, ordered_selectors.py n); ``rng``: an engine Rng
    seeded like the engine's, drawn only when the remover is random (one uniform per victim),
    as the engine does."""

    def __init__(self, model: CommitModel, sampler, remover, rng, max_size: int) -> None:
        self.m = model
        self.sampler, self.remover, self.rng, self.max_size = sampler, remover, rng, max_size

    @staticmethod
    def draws(selector) -> bool:
        return not hasattr(selector, "_first")

    def check(self, selector_arrays: list[dict[str, np.ndarray]], kinds: list[str]) -> bool:
        """Whether the counts and each selector's O(1) state make sense (check_counts)."""
        a, n = self.m.a, self.m.num_slots
        size = int(a["ctrl"][Ctrl.SIZE])
        head, tail = int(a["ctrl"][Ctrl.FREE_HEAD]), int(a["ctrl"][Ctrl.FREE_TAIL])
        if not 0 <= size <= n or head < 0 or not 0 <= tail - head <= n - size:
            return False
        for arr, kind in zip(selector_arrays, kinds, strict=True):
            if kind == "uniform" and int(arr["count"][0]) != size:
                return False
            if kind == "prioritized":
                total = float(arr["tree"][1])
                if not 0.0 <= total < np.inf or int(arr["all.count"][0]) != size:
                    return False
            if kind in ("fifo", "lifo"):
                h, t = int(arr["ends"][0, 0]), int(arr["ends"][1, 0])
                if h < 0 or not size <= t - h <= len(arr["order"]):
                    return False
            if kind in ("min_heap", "max_heap") and not 0 <= int(arr["clock"][0]) <= 1 << 62:
                return False
        return True

    def commit(self, slots: np.ndarray, priorities: np.ndarray) -> int:
        slots, priorities = self.m.commit_meta(slots, priorities)
        k = len(slots)
        if k == 0:
            return 0
        self.sampler.insert(slots, priorities)
        self.remover.insert(slots, priorities)
        self.evict()
        return k

    def evict(self) -> int:
        a = self.m.a
        excess = int(a["ctrl"][Ctrl.SIZE]) - self.max_size
        if excess <= 0:
            return 0
        if self.draws(self.remover):
            victims = self.remover.victims(np.asarray(self.rng.random(excess)))
        else:
            victims = self.remover.victims(excess, None)
        n = len(victims)
        if n == 0:
            return 0
        self.sampler.remove(victims)
        self.remover.remove(victims)
        a["state"][victims] = SlotState.FREE
        a["ctrl"][Ctrl.UNIQUE_SAMPLED] -= int(np.count_nonzero(a["times_sampled"][victims]))
        a["ctrl"][Ctrl.SIZE] -= n
        a["ctrl"][Ctrl.DELETES] += n
        tail = int(a["ctrl"][Ctrl.FREE_TAIL])
        ring_put(a["free"], tail, victims)
        a["ctrl"][Ctrl.FREE_TAIL] = tail + n
        a["ctrl"][Ctrl.TOTAL_EVICTED] += n
        return n


def refill(m: CommitModel, params: np.ndarray, headroom: int, state: dict[str, int]) -> int | None:
    """The daemon's lease refill (Daemon._refill, the engine's loop_refill in csrc/commit.c):
    lease free slots to the active channels whose WANT_LEASE is not 0. ``params``: the
    limiter's parameter lines (column 0); ``state``: the daemon's ``rotation`` and ``starved``
    (updated). Returns how many slots were leased, or None where the engine hands the refill to
    Python (a want below 0, a lease head out of range, limiter numbers that make no sense, a
    free ring that does not hold free slots: Daemon._refill cuts off, repairs or raises)."""
    from tests.reference import ratelimit

    a = m.a
    ctrl = a["ctrl"]
    state["starved"] = 0
    limited = ratelimit.blocks_inserts(params)
    ok = []
    for c in range(len(a["active"])):
        want = int(a["chan"][c, Chan.WANT_LEASE])
        if a["active"][c] and want != 0:
            have = int(a["lease_tail"][c]) - int(a["chan"][c, Chan.LEASE_HEAD])
            ok.append((c, want, have))
    if not ok:
        return 0
    if any(w < 0 or not 0 <= h <= LEASE_CAPACITY for _, w, h in ok):
        return None
    pending = int(a["outstanding"].sum())
    if limited:
        one = ratelimit.insert_allowance(params, ctrl, 1, pending)
        if one is None:
            return None
        if one == 0:
            state["starved"] = 1
            return 0
    share = min(max(headroom // (2 * len(ok)), 1), LEASE_CAPACITY)
    if not limited:
        ok = [(c, w, h, share - h if h <= share // 2 else 0) for c, w, h in ok]
        if not any(x[3] for x in ok):
            return 0
    if len(ok) > 1:
        state["rotation"] += 1
        shift = state["rotation"] % len(ok)
        ok = ok[shift:] + ok[:shift]
    if limited:
        free = ratelimit.insert_allowance(params, ctrl, LEASE_CAPACITY * len(ok), pending)
        if free is None:
            return None
        ahead = min(share, free // (4 * len(ok)))
        ok = [
            (c, w, h, min(max(max(min(w, LEASE_CAPACITY), ahead) - h, 0), LEASE_CAPACITY))
            for c, w, h, *_ in ok
        ]
    need = sum(x[3] for x in ok)
    budget = ratelimit.insert_allowance(params, ctrl, need, pending)
    if budget is None:
        return None
    state["starved"] = int(limited and budget <= 0 < need)
    total = 0
    for c, _, _, n in ok:
        n = min(n, budget)
        if n <= 0:
            continue
        k = m.round_lease(c, n)
        if k < 0:
            return None
        if k == 0:
            break
        budget -= k
        total += k
    return total
