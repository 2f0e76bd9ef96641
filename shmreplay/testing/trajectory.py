"""Helpers for trajectory tests: stamped steps, a sequence checker, writer and learner processes.

A stamped step carries who wrote it and when (``writer``, ``episode``, ``t`` within the episode,
``g`` over the writer's life) and data derived from those stamps (``obs``, ``check``), so a
reader can tell, for every sampled sequence, that it is exactly the steps one writer appended,
in order, and whether it stays within one episode. The worker functions live at module level so
that the ``spawn`` start method can import them.
"""

from __future__ import annotations

import numpy as np

SEQ_LEN = 16
OBS_DIM = 6
STEP_FIELDS = ("writer", "episode", "t", "g", "obs", "check")


def sequence_signature(length: int = SEQ_LEN) -> str:
    """``[table.signature]`` of items made of ``length`` stamped steps."""
    return (
        "[table.signature]\n"
        f'writer = {{ shape = [{length}], dtype = "int32" }}\n'
        f'episode = {{ shape = [{length}], dtype = "int64" }}\n'
        f't = {{ shape = [{length}], dtype = "int64" }}\n'
        f'g = {{ shape = [{length}], dtype = "int64" }}\n'
        f'obs = {{ shape = [{length}, {OBS_DIM}], dtype = "float32" }}\n'
        f'check = {{ shape = [{length}], dtype = "uint32" }}\n'
    )


def _derived(writer, episode, t, g) -> tuple[np.ndarray, np.ndarray]:
    """obs and check of stamped steps (arrays of stamps broadcast together)."""
    writer, episode, t, g = (np.asarray(x, np.int64) for x in (writer, episode, t, g))
    # below 2**24, so exact in float32
    base = (g * 7 + writer * 1_000_003) % (1 << 20)
    obs = (base[..., None] + np.arange(OBS_DIM)).astype(np.float32)
    check = (writer * 2_654_435_761 + episode * 40_503 + t * 97 + g * 31) & 0xFFFFFFFF
    return obs, check.astype(np.uint32)


def stamped_step(writer: int, episode: int, t: int, g: int) -> dict[str, np.ndarray]:
    obs, check = _derived(writer, episode, t, g)
    return {
        "writer": np.int32(writer),
        "episode": np.int64(episode),
        "t": np.int64(t),
        "g": np.int64(g),
        "obs": obs,
        "check": check[()],
    }


def check_sequences(data: dict[str, np.ndarray], cross_episode_writers=()) -> dict[str, int]:
    """Count, over a batch of sequences ``[B, T]``, those that are not intact consecutive steps
    of one writer (``bad``), those that mix episodes (``mixed``; allowed only for
    ``cross_episode_writers``, counted in ``crossing`` then), vectorised over the batch."""
    w, e, t, g = data["writer"], data["episode"], data["t"], data["g"]
    obs, check = _derived(w, e, t, g)
    intact = (data["obs"] == obs).all(axis=(1, 2)) & (data["check"] == check).all(axis=1)
    one_writer = (w == w[:, :1]).all(axis=1)
    consecutive = (np.diff(g, axis=1) == 1).all(axis=1)
    same_episode = np.diff(e, axis=1) == 0
    # within an episode t goes up by one; at an episode boundary the next episode starts at 0
    steps_ok = np.where(
        same_episode, np.diff(t, axis=1) == 1, (np.diff(e, axis=1) == 1) & (t[:, 1:] == 0)
    )
    mixes = ~same_episode.all(axis=1)
    allowed = np.isin(w[:, 0], list(cross_episode_writers))
    bad = ~(intact & one_writer & consecutive & steps_ok.all(axis=1))
    return {
        "bad": int(bad.sum()),
        "mixed": int((mixes & ~allowed).sum()),
        "crossing": int((mixes & allowed).sum()),
    }


def sequence_writer(
    instance: str,
    table: str,
    writer_id: int,
    steps: int,
    seed: int,
    cross_episode: bool,
    results,
) -> None:
    """Append ``steps`` stamped steps in episodes of random length (2..60), some steps in two
    partial calls, and make a SEQ_LEN-step item of the newest steps whenever there are that
    many in the history: within the episode, or across episodes if ``cross_episode`` (the
    history is then kept by ``end_episode(clear_buffers=False)``). Puts (writer_id, items)."""
    import shmreplay
    from shmreplay.client.trajectory import TrajectoryWriter

    rng = np.random.default_rng(seed)
    client = shmreplay.attach(instance, timeout=10)
    items = 0
    with TrajectoryWriter(client, SEQ_LEN + 2) as writer:
        g = episode = 0
        while g < steps:
            length = int(rng.integers(2, 61))
            for t in range(length):
                step = stamped_step(writer_id, episode, t, g)
                if rng.random() < 0.3:
                    first = {k: step.pop(k) for k in ("obs", "writer")}
                    writer.append(first, partial_step=True)
                writer.append(step)
                g += 1
                if len(writer.history["g"]) >= SEQ_LEN:
                    h = writer.history
                    writer.create_item(
                        table,
                        float(rng.random()) + 0.1,
                        {f: h[f][-SEQ_LEN:] for f in STEP_FIELDS},
                    )
                    items += 1
            writer.end_episode(clear_buffers=not cross_episode)
            episode += 1
    client.close()
    results.put((writer_id, items))


def sequence_learner(
    instance: str, table: str, batch_size: int, cross_episode_writers, stop, results
) -> None:
    """Sample until ``stop`` is set (and once more after), checking every sequence; puts
    (batches, totals of check_sequences, writers seen)."""
    import shmreplay

    client = shmreplay.attach(instance, timeout=10)
    t = client.table(table)
    totals = {"bad": 0, "mixed": 0, "crossing": 0}
    writers: set[int] = set()
    batches = 0
    last = False
    while True:
        last = stop.is_set()
        try:
            s = t.sample(batch_size, timeout=0.2)
        except shmreplay.RateLimiterTimeout:
            if last:
                break
            continue
        for k, v in check_sequences(s.data, cross_episode_writers).items():
            totals[k] += v
        writers.update(np.unique(s.data["writer"][:, 0]).tolist())
        batches += 1
        if last:
            break
    client.close()
    results.put((batches, totals, sorted(writers)))
