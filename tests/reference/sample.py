"""Reference model of the sample concern (csrc/sample.c): the numpy code TableCore ran before
the engine, written over plain arrays so that a differential test can run it side by side.

Differences from that code, so that results compare exactly: one path for every draw (the old
fast path for draws without repeats kept a draw of an item already at max_times_sampled, which
only a corrupt count can produce; the general path drops it), and exhausted items come in the
order of their first draw in the batch (the old general path sorted them by slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SLOT_MASK = np.uint64(0xFFFFFFFF)
READY = 2


@dataclass
class Table:
    """The per-slot arrays and counters a selection reads and writes."""

    times_sampled: np.ndarray  # int32
    key: np.ndarray  # uint64
    priority: np.ndarray  # float64
    gen: np.ndarray  # int64
    state: np.ndarray  # uint8
    owner: np.ndarray  # int32
    max_times_sampled: int
    size: int = 0
    deletes: int = 0
    free: np.ndarray | None = None  # int64 ring of len(key) entries
    free_tail: int = 0
    samples: int = 0
    total_sampled: int = 0
    unique_sampled: int = 0


@dataclass
class Selection:
    slots: np.ndarray
    probability: np.ndarray
    key: np.ndarray
    priority: np.ndarray
    times_sampled: np.ndarray
    gen: np.ndarray
    table_size: np.ndarray
    exhausted: np.ndarray


def select(
    t: Table, slots: np.ndarray, probability: np.ndarray, size: int, count_samples: bool
) -> Selection:
    """The bookkeeping of draws ``slots``, as if drawn one at a time (sample.h)."""
    slots = np.asarray(slots, np.int64)
    k = len(slots)
    if ((slots < 0) | (slots >= len(t.key))).any():
        raise ValueError("corrupt: a slot index outside the table")
    # Rank of each draw among the draws of the same item.
    order = np.argsort(slots, kind="stable")
    s_sorted = slots[order]
    first = np.ones(k, dtype=bool)
    first[1:] = s_sorted[1:] != s_sorted[:-1]
    starts = np.flatnonzero(first)
    group = np.cumsum(first) - 1
    before = t.times_sampled[s_sorted].astype(np.int64)
    times_sorted = before + (np.arange(k) - starts[group]) + 1
    mts = t.max_times_sampled
    keep_sorted = times_sorted <= mts if mts > 0 else np.ones(k, bool)
    keep = np.empty(k, dtype=bool)
    keep[order] = keep_sorted
    kept_counts = np.add.reduceat(keep_sorted.astype(np.int64), starts) if k else starts
    new_times = (before[starts] + kept_counts).astype(np.int32)
    uniq = s_sorted[starts]
    # Items in the order of their first draw.
    first_draw = order[starts]
    by_first = np.argsort(first_draw, kind="stable")
    exhausted = uniq[by_first][new_times[by_first] >= mts] if mts > 0 else uniq[:0]
    times = np.empty(k, dtype=np.int32)
    times[order] = times_sorted.astype(np.int32)
    t.unique_sampled += int(np.count_nonzero(before[starts] == 0))
    t.times_sampled[uniq] = new_times
    slots, probability, times = slots[keep], probability[keep], times[keep]
    taken = len(slots)
    if count_samples:
        t.samples += taken
    t.total_sampled += taken
    if mts > 0:
        ends = (times == mts).astype(np.int64)
        table_size = size - (np.cumsum(ends) - ends)
    else:
        table_size = np.full(taken, size, dtype=np.int64)
    return Selection(
        slots=slots,
        probability=probability,
        key=t.key[slots],
        priority=t.priority[slots],
        times_sampled=times,
        gen=t.gen[slots],
        table_size=table_size,
        exhausted=exhausted.astype(np.int64),
    )


def gather(
    data: list[np.ndarray],
    gen: np.ndarray,
    slots: np.ndarray,
    gen_snapshot: np.ndarray,
    out: list[np.ndarray],
    positions: np.ndarray | None,
) -> np.ndarray:
    """Copy rows ``slots`` to ``out[f][positions]``; the mask of rows whose generation did not
    move."""
    for array, dest in zip(data, out, strict=True):
        if positions is None:
            dest[: len(slots)] = array[slots]
        else:
            dest[positions] = array[slots]
    return gen[slots] == gen_snapshot


def last_wins(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All but the last of repeated keys dropped, the last occurrences in call order."""
    if len(keys) < 2:
        return keys, values
    _, first_from_end = np.unique(keys[::-1], return_index=True)
    keep = np.sort(len(keys) - 1 - first_from_end)
    return keys[keep], values[keep]


def slots_of(t: Table, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slots, mask of keys whose item is in the table)."""
    slots = (keys & SLOT_MASK).astype(np.int64)
    inrange = slots < len(t.key)
    safe = np.where(inrange, slots, 0)
    present = inrange & (t.key[safe] == keys) & (t.state[safe] == READY)
    return safe, present


def update(
    t: Table, keys: np.ndarray, priorities: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """update_priorities' stores: (slots, priorities) of the present keys, and the missing."""
    keys, priorities = last_wins(keys, priorities)
    slots, present = slots_of(t, keys)
    s, p = slots[present], priorities[present]
    t.priority[s] = p
    return s, p, int(len(keys) - np.count_nonzero(present))


def present(t: Table, keys: np.ndarray) -> np.ndarray:
    """delete's victims: the distinct slots of present keys, ascending."""
    slots, mask = slots_of(t, keys)
    return np.unique(slots[mask])


def removed(t: Table, slots: np.ndarray, releasing_owner: int | None) -> None:
    """The bookkeeping of removing distinct READY items (TableCore._remove, after the
    selectors): state, owner, then the counters."""
    if releasing_owner is None:
        t.state[slots] = 0  # FREE
    else:
        t.owner[slots] = releasing_owner
        t.state[slots] = 3  # RELEASING
    t.unique_sampled -= int(np.count_nonzero(t.times_sampled[slots]))
    t.size -= len(slots)
    t.deletes += len(slots)


def release(t: Table, slots: np.ndarray, channel: int) -> int:
    """After the copy (TableCore._release): slots still RELEASING for ``channel`` become FREE
    and go on the free ring at free_tail (rings.ring_put); how many."""
    mine = slots[(t.state[slots] == 3) & (t.owner[slots] == channel)]
    t.state[mine] = 0
    t.owner[mine] = -1
    size = len(t.free)
    for j, s in enumerate(mine):
        t.free[(t.free_tail + j) % size] = s
    t.free_tail += len(mine)
    return len(mine)
