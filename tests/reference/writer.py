"""Reference model of a client's insert path (shmreplay.engine._native.Writer).

The numpy write path client.Table had before the engine, on plain arrays shaped as a table
segment's: take leased slots from the channel's lease ring, write a row under the slot's
seqlock (generation odd, row, priority, episode, generation even), publish the slot indices on
the publish ring, and the wake rule. Ring positions grow without bound; entry i is at i % size.

Conventions the engine follows exactly (so that results compare with np.array_equal):
- abandoned reservations' slots are taken before the lease ring, the last abandoned first;
- LEASE_TAIL is re-read only when the local copy says the ring is empty, PUB_HEAD only when the
  local copy says the publish ring has no room; the local PUB_HEAD starts a whole ring behind
  PUB_TAIL (the first publication that needs room re-reads it);
- a ring position out of range or a leased slot outside the table is ``Corrupt`` with nothing
  taken.
"""

from __future__ import annotations

import numpy as np

from shmreplay.engine.layout import (
    LEASE_CAPACITY,
    LEASE_LOW_WATER,
    PUBLISH_CAPACITY,
    Chan,
    Ctrl,
    Sleep,
)


class Corrupt(Exception):
    """Shared memory holds an impossible ring position or slot index."""


class RefWriter:
    def __init__(self, chan, ctrl, lease, publish, gen, priority, episode, steps, key, columns):
        # chan: (Chan.COUNT, LINE) int64; ctrl: (Ctrl.COUNT, LINE) int64 (word = column 0)
        self.chan, self.ctrl = chan[:, 0], ctrl[:, 0]
        self.lease, self.publish = lease, publish
        self.gen, self.priority, self.episode, self.steps, self.key = (
            gen,
            priority,
            episode,
            steps,
            key,
        )
        self.columns = columns
        self.num_slots = len(gen)
        self.lease_head = int(self.chan[Chan.LEASE_HEAD])
        self.lease_tail = self.lease_head
        self.pub_tail = int(self.chan[Chan.PUB_TAIL])
        self.pub_head = self.pub_tail - PUBLISH_CAPACITY
        self.spare: list[int] = []

    # -- leases --------------------------------------------------------------------------------

    def poll_lease(self) -> None:
        tail = int(self.chan[Chan.LEASE_TAIL])
        if tail < self.lease_head or tail - self.lease_head > LEASE_CAPACITY:
            raise Corrupt("lease tail")
        self.lease_tail = tail

    def take(self, n: int) -> list[int] | None:
        """Up to n slots, or None when none is leased."""
        if self.spare:
            out = []
            while len(out) < n and self.spare:
                out.append(self.spare.pop())
            return out
        head = self.lease_head
        if head == self.lease_tail:
            self.poll_lease()
            if head == self.lease_tail:
                return None
        k = min(n, self.lease_tail - head)
        slots = [int(self.lease[(head + i) % LEASE_CAPACITY]) for i in range(k)]
        if any(not 0 <= s < self.num_slots for s in slots):
            raise Corrupt("slot")
        self.lease_head = head + k
        self.chan[Chan.LEASE_HEAD] = head + k
        return slots

    # -- publication ---------------------------------------------------------------------------

    def poll_committed(self) -> None:
        head = int(self.chan[Chan.PUB_HEAD])
        if head > self.pub_tail or self.pub_tail - head > PUBLISH_CAPACITY:
            raise Corrupt("publish head")
        self.pub_head = head

    def room(self, k: int) -> bool:
        if self.pub_tail + k - self.pub_head <= PUBLISH_CAPACITY:
            return True
        self.poll_committed()
        return self.pub_tail + k - self.pub_head <= PUBLISH_CAPACITY

    def publish_slots(self, slots) -> bool:
        """False (nothing published) when the ring has no room."""
        if not self.room(len(slots)):
            return False
        for i, s in enumerate(slots):
            self.publish[(self.pub_tail + i) % PUBLISH_CAPACITY] = s
        self.pub_tail += len(slots)
        self.chan[Chan.PUB_TAIL] = self.pub_tail
        return True

    def lease_low(self) -> bool:
        """At most LEASE_LOW_WATER leased slots left: the cached tail, then LEASE_TAIL re-read
        before saying so (a garbage tail counts as low, the cache kept for take to report)."""
        if self.lease_tail - self.lease_head > LEASE_LOW_WATER:
            return False
        try:
            self.poll_lease()
        except Corrupt:
            return True
        return self.lease_tail - self.lease_head <= LEASE_LOW_WATER

    def wake(self, force: bool = False) -> bool:
        sleeping = int(self.ctrl[Ctrl.DAEMON_SLEEPING])
        if (
            force
            or sleeping == Sleep.IDLE
            or (
                sleeping != Sleep.AWAKE
                and (self.lease_low() or self.ctrl[Ctrl.SAMPLER_WAITING] != 0)
            )
        ):
            self.ctrl[Ctrl.DAEMON_SLEEPING] = Sleep.AWAKE
            return True
        return False

    # -- writing -------------------------------------------------------------------------------

    def insert(self, row, priority: float, episode=(0, 0, 0)):
        """(key, wake), or "empty" / "full" with nothing taken."""
        if not self.room(1):
            return "full"
        slots = self.take(1)
        if slots is None:
            return "empty"
        slot = slots[0]
        self.gen[slot] += 1
        for column, value in zip(self.columns, row, strict=True):
            column[slot] = value
        self.priority[slot] = priority
        self.episode[slot] = episode[0]
        self.steps[slot] = episode[1:]
        self.gen[slot] += 1
        key = int(self.key[slot])
        self.publish_slots([slot])
        return key, self.wake()

    def write_batch(self, slots, cols, priorities, episodes) -> np.ndarray:
        slots = np.asarray(slots, np.int64)
        self.gen[slots] += 1
        for column, col in zip(self.columns, cols, strict=True):
            column[slots] = col
        self.priority[slots] = priorities
        self.episode[slots] = episodes[:, 0]
        self.steps[slots] = episodes[:, 1:]
        self.gen[slots] += 1
        return self.key[slots].copy()

    def insert_batch(
        self, cols, priorities, keys: np.ndarray, start: int, episodes=None
    ) -> tuple[int, bool]:
        """Items [start, n) in chunks of at most half the publish ring (room first, then up to
        that many slots), episodes (n, 3) or 0; stops after a chunk whose wake rule fires, or
        when no slot is leased or no room is left. (new start, wake)."""
        n, done = len(keys), start
        prios = np.broadcast_to(np.asarray(priorities, np.float64), (n,))
        while done < n:
            want = min(n - done, PUBLISH_CAPACITY // 2)
            if not self.room(want):
                break
            slots = self.take(want)
            if slots is None:
                break
            end = done + len(slots)
            part = [c[done:end] for c in cols]
            eps = np.zeros((len(slots), 3), np.int64) if episodes is None else episodes[done:end]
            keys[done:end] = self.write_batch(slots, part, prios[done:end], eps)
            self.publish_slots(slots)
            done = end
            if self.wake():
                return done, True
        return done, False

    def begin(self, slot: int) -> int:
        g = int(self.gen[slot])
        self.gen[slot] = g + 1
        return g

    def end(self, slot: int, g: int, priority: float, episode=(0, 0, 0)) -> None:
        self.priority[slot] = priority
        self.episode[slot] = episode[0]
        self.steps[slot] = episode[1:]
        self.gen[slot] = g + 2

    def abandon(self, slot: int, g: int) -> None:
        self.gen[slot] = g + 2
        self.spare.append(slot)
