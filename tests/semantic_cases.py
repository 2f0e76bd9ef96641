"""Reverb's table semantics as named cases: a table, operations in, expected results out.

Each case is run against a real table by tests/test_semantics.py. Items are named by a uid
(an int stamped into the row); operations:

- ``("insert", uid, priority)``: must succeed (then flushed, so it is committed);
- ``("insert_blocked", uid)``: the rate limiter must hold it back (a short timeout expires);
- ``("sample", n, expect)``: ``expect`` maps info fields to lists (``uid``, ``probability``,
  ``times_sampled``, ``table_size``, ``priority``) or gives ``uid_in`` (a set the draws must
  come from);
- ``("sample_blocked", n)``: the rate limiter must hold the sample back;
- ``("sample_partial", n, expect)``: ``sample(n, partial=True)`` with a short timeout returns
  what the limiter allows (``expect`` as for ``sample``; ``{"uid": []}`` means it must raise);
- ``("update", {uid: priority, ...})``, ``("delete", [uid, ...])``;
- ``("expect", {"size": n, "inserts": i, "samples": s, "deletes": d, "uids": [...]})``: table
  state (``uids`` = the set of items present).
"""

from __future__ import annotations

QUEUE = 'kind = "queue"'
STACK = 'kind = "stack"'


def table(
    sampler: str = "fifo",
    remover: str = "fifo",
    max_size: int = 100,
    max_times_sampled: int = 0,
    rate_limiter: str = '{ kind = "min_size", min_size = 1 }',
    alpha: float | None = None,
    remover_alpha: float | None = None,
) -> str:
    """The body of a ``[[table]]`` (name and signature are added by the runner). ``alpha`` and
    ``remover_alpha`` make the sampler or the remover prioritized with that exponent."""
    sel = f'{{ kind = "{sampler}" }}'
    if alpha is not None:
        sel = f'{{ kind = "prioritized", priority_exponent = {alpha} }}'
    rem = f'{{ kind = "{remover}" }}'
    if remover_alpha is not None:
        rem = f'{{ kind = "prioritized", priority_exponent = {remover_alpha} }}'
    return (
        f"max_size = {max_size}\nsampler = {sel}\nremover = {rem}\n"
        f"max_times_sampled = {max_times_sampled}\nrate_limiter = {rate_limiter}\n"
    )


def queue(max_size: int) -> str:
    return f"{QUEUE}\nmax_size = {max_size}\n"


def stack(max_size: int) -> str:
    return f"{STACK}\nmax_size = {max_size}\n"


def custom(spi: float, min_size: int, min_diff: float, max_diff: float) -> str:
    return (
        f'{{ kind = "custom", samples_per_insert = {spi}, min_size_to_sample = {min_size}, '
        f"min_diff = {min_diff}, max_diff = {max_diff} }}"
    )


CASES: dict[str, tuple[str, list]] = {
    # -- selectors ---------------------------------------------------------------------------
    "fifo sampler returns the oldest, probability 1": (
        table("fifo"),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 5.0),
            ("insert", 3, 0.5),
            ("sample", 3, {"uid": [1, 1, 1], "probability": [1.0] * 3, "times_sampled": [1, 2, 3]}),
        ],
    ),
    "lifo sampler returns the newest": (
        table("lifo"),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("insert", 3, 1.0),
            ("sample", 2, {"uid": [3, 3], "probability": [1.0, 1.0]}),
        ],
    ),
    "min_heap sampler returns the lowest priority": (
        table("min_heap"),
        [
            ("insert", 1, 3.0),
            ("insert", 2, 1.0),
            ("insert", 3, 2.0),
            ("sample", 1, {"uid": [2], "probability": [1.0], "priority": [1.0]}),
            ("update", {2: 9.0}),
            ("sample", 1, {"uid": [3]}),
        ],
    ),
    "max_heap sampler returns the highest priority": (
        table("max_heap"),
        [
            ("insert", 1, 3.0),
            ("insert", 2, 1.0),
            ("insert", 3, 2.0),
            ("sample", 1, {"uid": [1], "priority": [3.0]}),
            ("update", {3: 7.0}),
            ("sample", 1, {"uid": [3], "priority": [7.0]}),
        ],
    ),
    "heap ties go to the least recently inserted": (
        table("min_heap"),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("insert", 3, 1.0),
            ("sample", 1, {"uid": [1]}),
        ],
    ),
    "heap ties go to the least recently updated": (
        table("max_heap"),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("insert", 3, 1.0),
            ("update", {1: 1.0}),  # same priority, but touched: now the most recent
            ("sample", 1, {"uid": [2]}),
        ],
    ),
    "uniform reports 1/N": (
        table("uniform"),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 9.0),
            ("insert", 3, 0.0),
            ("insert", 4, 1.0),
            ("sample", 50, {"uid_in": {1, 2, 3, 4}, "probability": [0.25] * 50}),
        ],
    ),
    "prioritized reports p^a / sum p^a, zero priority never drawn": (
        table(alpha=1.0),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 3.0),
            ("insert", 3, 0.0),
            ("sample", 40, {"uid_in": {1, 2}}),
            ("update", {1: 0.0, 2: 0.0, 3: 0.0}),
            ("sample", 30, {"uid_in": {1, 2, 3}, "probability": [1 / 3] * 30}),  # all zero
        ],
    ),
    "prioritized with exponent 0: zero priority keeps weight 0": (
        table(alpha=0.0),
        [
            ("insert", 1, 5.0),
            ("insert", 2, 0.0),
            ("insert", 3, 0.1),
            ("sample", 40, {"uid_in": {1, 3}, "probability": [0.5] * 40}),
        ],
    ),
    # -- removal and max_size ---------------------------------------------------------------
    "full table evicts the oldest (fifo remover)": (
        table("fifo", "fifo", max_size=3),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("insert", 3, 1.0),
            ("insert", 4, 1.0),
            ("expect", {"size": 3, "uids": [2, 3, 4], "inserts": 4, "deletes": 1}),
        ],
    ),
    "lifo remover evicts the item just inserted": (
        table("fifo", "lifo", max_size=3),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("insert", 3, 1.0),
            ("insert", 4, 1.0),
            ("expect", {"size": 3, "uids": [1, 2, 3], "deletes": 1}),
        ],
    ),
    "min_heap remover evicts the lowest, the new item included": (
        table("fifo", "min_heap", max_size=3),
        [
            ("insert", 1, 5.0),
            ("insert", 2, 1.0),
            ("insert", 3, 4.0),
            ("insert", 4, 3.0),
            ("expect", {"uids": [1, 3, 4]}),
            ("insert", 5, 0.5),  # the lowest: evicted at once
            ("expect", {"uids": [1, 3, 4], "inserts": 5, "deletes": 2}),
        ],
    ),
    "prioritized remover evicts the only weighted item, the new one included": (
        # Mutation proof: Prioritized.victims ignoring the weights (a uniform choice) fails
        # this case and the next one unless its unseeded draws hit the right item each time
        # (1 in 64 here); test_mutation_guards has the cases that cannot pass by luck.
        table("fifo", max_size=3, remover_alpha=1.0),
        [
            ("insert", 1, 0.0),
            ("insert", 2, 0.0),
            ("insert", 3, 5.0),
            ("insert", 4, 0.0),
            ("expect", {"size": 3, "uids": [1, 2, 4], "inserts": 4, "deletes": 1}),
            ("update", {1: 2.0}),
            ("insert", 5, 0.0),
            ("expect", {"uids": [2, 4, 5], "deletes": 2}),
            ("insert", 6, 7.0),  # the new item is the only weighted one: evicted at once
            ("expect", {"uids": [2, 4, 5], "deletes": 3}),
        ],
    ),
    "prioritized remover with exponent 0: every positive priority weighs 1, zero stays 0": (
        table("fifo", max_size=2, remover_alpha=0.0),
        [
            ("insert", 1, 0.0),
            ("insert", 2, 9.0),
            ("insert", 3, 0.0),
            ("expect", {"uids": [1, 3], "deletes": 1}),
        ],
    ),
    "uniform remover keeps max_size items and counts its evictions": (
        # which items it evicts is a distribution: test_mutation_guards checks it
        table("fifo", "uniform", max_size=3),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("insert", 3, 1.0),
            ("insert", 4, 1.0),
            ("insert", 5, 1.0),
            ("expect", {"size": 3, "inserts": 5, "deletes": 2}),
        ],
    ),
    "max_times_sampled deletes with the N-th sample, which is still delivered": (
        table("fifo", max_times_sampled=2),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            # table_size is per draw: the third comes after item 1's deletion
            ("sample", 3, {"uid": [1, 1, 2], "times_sampled": [1, 2, 1], "table_size": [2, 2, 1]}),
            ("expect", {"size": 1, "uids": [2], "deletes": 1, "samples": 3}),
            ("sample", 1, {"uid": [2], "times_sampled": [2], "table_size": [1]}),
            ("expect", {"size": 0, "deletes": 2}),
        ],
    ),
    "delete and update ignore missing items": (
        table("fifo"),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("delete", [1]),
            ("delete", [1]),
            ("update", {1: 3.0}),
            ("expect", {"size": 1, "uids": [2], "deletes": 1}),
            ("sample", 1, {"uid": [2]}),
        ],
    ),
    # -- rate limiters ------------------------------------------------------------------------
    "min_size blocks samples until reached": (
        table("fifo", rate_limiter='{ kind = "min_size", min_size = 3 }'),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("sample_blocked", 1),
            ("insert", 3, 1.0),
            ("sample", 1, {"uid": [1]}),
        ],
    ),
    "deletes can block samples (size below min_size_to_sample)": (
        table("fifo", rate_limiter='{ kind = "min_size", min_size = 3 }'),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("insert", 3, 1.0),
            ("sample", 1, {"uid": [1]}),
            ("delete", [3]),
            ("sample_blocked", 1),
        ],
    ),
    "queue worked example": (
        queue(3),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("insert", 3, 1.0),
            ("insert_blocked", 4),
            ("sample", 1, {"uid": [1], "times_sampled": [1], "table_size": [3]}),
            ("expect", {"size": 2, "inserts": 3, "samples": 1, "deletes": 1}),
            ("insert", 4, 1.0),
            ("insert_blocked", 5),
            ("sample", 3, {"uid": [2, 3, 4]}),
            ("sample_blocked", 1),
            ("expect", {"size": 0, "inserts": 4, "samples": 4, "deletes": 4}),
        ],
    ),
    "stack returns the newest first": (
        stack(3),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("insert", 3, 1.0),
            ("insert_blocked", 4),
            ("sample", 2, {"uid": [3, 2]}),
            ("insert", 4, 1.0),
            ("sample", 2, {"uid": [4, 1]}),
        ],
    ),
    "deletes unblock inserts only below min_size_to_sample": (
        table("fifo", rate_limiter=custom(1.0, 3, 0.0, 3.0)),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("insert", 3, 1.0),
            ("insert_blocked", 4),  # 4·1 − 0 > max_diff 3
            ("delete", [1]),
            ("insert", 4, 1.0),  # inserts + 1 − deletes = 3 ≤ min_size_to_sample
            ("insert_blocked", 5),
        ],
    ),
    "deletes do not unblock inserts above min_size_to_sample": (
        table("fifo", rate_limiter=custom(1.0, 1, 0.0, 3.0)),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("insert", 3, 1.0),
            ("insert_blocked", 4),
            ("delete", [1]),
            ("insert_blocked", 4),  # size stays above 1: only samples make room
            ("sample", 1, {"uid": [2]}),
            ("insert", 4, 1.0),
        ],
    ),
    "sample_to_insert_ratio: samples wait for inserts, inserts wait for samples": (
        table(
            "fifo",
            rate_limiter='{ kind = "sample_to_insert_ratio", samples_per_insert = 2.0, '
            "min_size_to_sample = 2, error_buffer = 2.0 }",  # min_diff 2, max_diff 6
        ),
        [
            ("insert", 1, 1.0),
            ("sample_blocked", 1),  # below min_size_to_sample
            ("insert", 2, 1.0),  # cursor 4
            ("sample", 2, {"uid": [1, 1]}),  # cursor 2 = min_diff
            ("sample_blocked", 1),
            ("insert", 3, 1.0),  # 3·2 − 2 = 4 ≤ max_diff 6
            ("insert", 4, 1.0),  # 4·2 − 2 = 6 ≤ 6
            ("insert_blocked", 5),  # 5·2 − 2 = 8 > 6
            ("sample", 2, {"uid": [1, 1]}),  # cursor 8 − 4 = 4
            ("insert", 5, 1.0),  # 10 − 4 = 6 ≤ 6
            ("expect", {"inserts": 5, "samples": 4, "deletes": 0}),
        ],
    ),
    # -- fractional samples_per_insert: every allowance is rounded down ----------------------
    # Mutation proof (ratelimit.py, applied by hand and reverted): insert_allowance with
    # math.ceil instead of math.floor fails the 0.3 and 2.5 cases; sample_allowance with
    # math.ceil fails all three.
    "samples_per_insert 0.3: inserts stop at floor(max_diff / spi), samples at floor(cursor)": (
        # (1 + 0)/0.3 = 3.33 inserts fit, 3 * 0.3 = 0.9 samples: rounding up would allow a 4th
        # insert and a first sample
        table("fifo", rate_limiter=custom(0.3, 1, 0.0, 1.0)),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("insert", 3, 1.0),
            ("insert_blocked", 4),
            ("sample_blocked", 1),
            ("sample_partial", 2, {"uid": []}),
            ("expect", {"inserts": 3, "samples": 0}),
        ],
    ),
    "samples_per_insert 2.5: each insert pays for 2.5 samples, never 3": (
        table("fifo", rate_limiter=custom(2.5, 1, 0.0, 5.0)),
        [
            ("insert", 1, 1.0),  # below min_size_to_sample
            ("insert", 2, 1.0),  # 2 * 2.5 - 0 = 5 <= 5
            ("insert_blocked", 3),
            ("sample", 5, {"uid": [1] * 5}),  # cursor 5 - 5 = 0 = min_diff
            ("sample_blocked", 1),
            ("insert", 3, 1.0),  # 7.5 - 5 = 2.5
            ("sample_partial", 4, {"uid": [1, 1]}),  # cursor 2.5: floor -> 2 of the 4
            ("insert", 4, 1.0),  # 4 * 2.5 - 7 = 3 <= 5
            ("insert_blocked", 5),  # 12.5 - 7 = 5.5 > 5: floor(12 / 2.5 - 4) = floor(0.8) = 0
            ("expect", {"inserts": 4, "samples": 7}),
        ],
    ),
    "samples_per_insert 0.5 with partial=True returns the floor of the cursor": (
        table("fifo", rate_limiter=custom(0.5, 1, 0.0, 10.0)),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("insert", 3, 1.0),
            ("insert", 4, 1.0),
            ("insert", 5, 1.0),  # cursor 2.5
            ("sample_partial", 4, {"uid": [1, 1], "times_sampled": [1, 2]}),
            ("sample_partial", 1, {"uid": []}),  # cursor 0.5: nothing
            ("insert", 6, 1.0),  # cursor 1.0
            ("sample_partial", 3, {"uid": [1]}),
            ("expect", {"inserts": 6, "samples": 3}),
        ],
    ),
    # -- partial=True -------------------------------------------------------------------------
    "partial=True returns the items the limiter allows, raises when there are none": (
        queue(5),
        [
            ("insert", 1, 1.0),
            ("insert", 2, 1.0),
            ("sample_partial", 5, {"uid": [1, 2], "table_size": [2, 1]}),
            ("sample_partial", 5, {"uid": []}),
            ("insert", 3, 1.0),
            ("sample_partial", 2, {"uid": [3]}),
            ("expect", {"size": 0, "inserts": 3, "samples": 3, "deletes": 3}),
        ],
    ),
}
