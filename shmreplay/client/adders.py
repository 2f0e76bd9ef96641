"""Adders: the usual ways of turning an agent's steps into replay items, on the trajectory writer.

:class:`NStepTransitionAdder` writes n-step transitions, the items of the DQN family::

    adder = NStepTransitionAdder(client, "replay", n=3, discount=0.99)
    for episode in range(num_episodes):
        obs, done = env.reset(), False
        while not done:
            action = policy(obs)
            next_obs, reward, done = env.step(action)
            adder.add(obs, action, reward, done=done, next_observation=next_obs)
            obs = next_obs
    adder.close()      # or use it as a context manager: a clean exit flushes
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..engine import _native
from ..errors import InvalidArgumentError, SignatureError
from .trajectory import ColumnHistory, TrajectoryWriter

if TYPE_CHECKING:
    from .client import Client

__all__ = ["NStepTransitionAdder", "nstep_returns"]

TRANSITION_FIELDS = ("observation", "action", "reward", "discount", "next_observation")


def nstep_returns(
    rewards: np.ndarray, discounts: np.ndarray, gamma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Returns and bootstrap discounts of every suffix of a window of L steps.

    For ``i`` in 0..L-1, with ``g_j = gamma * discounts[j]``::

        R[i] = sum_{k=i}^{L-1} (prod_{j=i}^{k-1} g_j) * rewards[k]
        D[i] = prod_{j=i}^{L-1} g_j                 (= gamma^(L-i) * prod d_j)

    By the backward recursion R[i] = r_i + g_i R[i+1], D[i] = g_i D[i+1], in plain Python: a
    window holds at most n steps, too few for numpy's per-call cost to pay off; a discount of 0
    inside the window (a life lost) is exact, with no division.
    """
    r = [float(x) for x in np.asarray(rewards, np.float64).reshape(-1)]
    g = [gamma * float(x) for x in np.asarray(discounts, np.float64).reshape(-1)]
    n = len(r)
    ret, disc = np.empty(n), np.empty(n)
    acc_r, acc_d = 0.0, 1.0
    for i in range(n - 1, -1, -1):
        acc_r = r[i] + g[i] * acc_r
        acc_d *= g[i]
        ret[i], disc[i] = acc_r, acc_d
    return ret, disc


class NStepTransitionAdder:
    """Writes one n-step transition per environment step into ``table``, via a trajectory
    writer (each observation is copied once into the writer's history, however large n).

    The item for step t, with m = min(n, T − t) steps (T: the episode's length)::

        observation      = s_t
        action           = a_t
        reward           = R_t = r_t + γ d_t r_{t+1} + ... + γ^{m-1} d_t···d_{t+m-2} r_{t+m-1}
        discount         = D_t = γ^m · d_t · d_{t+1} ··· d_{t+m-1}
        next_observation = s_{t+m}

    where r_t is the reward after a_t and d_t the environment's discount after it (0 when
    s_{t+1} is terminal, 1 otherwise). A learner's target is ``R_t + D_t · V(s_{t+m})``:
    D_t includes every factor of γ (and is 0 when the episode terminated within the m steps).

    Timeline (n = 3, episode of T = 5 steps, s_5 the final observation)::

        add(s_0 .. s_2)      nothing yet
        add(s_3)             (s_0 → s_3), m = 3
        add(s_4, done=True)  (s_1 → s_4), m = 3, then at the episode's end, with s_5:
                             (s_2 → s_5) m = 3, (s_3 → s_5) m = 2, (s_4 → s_5) m = 1

    Every step gets exactly one item. This differs from Acme's NStepTransitionAdder in two
    ways, on purpose: Acme stores D_t = γ^(m-1) · d_t···d_{t+m-1} (its learners apply the last
    γ themselves), and Acme also writes the short transitions (s_0 → s_1) ... (s_0 → s_{n-1})
    at an episode's start, so that s_0 appears n times in the table. A time-limit truncation
    is ``done=True, discount=1.0``: the episode ends but its last items bootstrap from s_T.

    The table's signature (``signature_toml()`` writes it for given shapes)::

        [table.signature]
        observation      = { shape = [8], dtype = "float32" }   # any shape and dtype ...
        next_observation = { shape = [8], dtype = "float32" }   # ... the same as observation
        action           = { dtype = "int64" }                  # any shape and dtype
        reward           = { dtype = "float32" }                # R_t: float32 or float64
        discount         = { dtype = "float32" }                # D_t: float32 or float64

    ``priority_fn(transition)`` receives the item as a dict of numpy values and returns its
    priority (default: 1.0 for every item; building the dict costs a copy of the item).
    Items are written as the trajectory writer writes them (small ones in batches);
    :meth:`flush` waits until they are in the table. An episode's end does not wait (with
    short episodes a commit round trip at each end would cost more than the steps):
    ``wait_at_episode_end=True`` makes it wait, as Acme's adder over Reverb does.
    """

    def __init__(
        self,
        client: Client,
        table: str,
        n: int,
        discount: float,
        priority_fn: Callable[[dict[str, np.ndarray]], float] | None = None,
        *,
        wait_at_episode_end: bool = False,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InvalidArgumentError(f"n must be an integer >= 1, got {n!r}")
        try:
            gamma = float(discount)
        except (TypeError, ValueError):
            gamma = math.nan
        if not 0.0 <= gamma <= 1.0:
            raise InvalidArgumentError(f"discount must be a number in [0, 1], got {discount!r}")
        spec = client.table(table).spec
        fields = {f.name: f for f in spec.signature}
        ok = set(fields) == set(TRANSITION_FIELDS) and all(
            fields[k].shape == () and fields[k].np_dtype.kind == "f" for k in ("reward", "discount")
        )
        if ok:
            o, no = fields["observation"], fields["next_observation"]
            ok = o.shape == no.shape and o.dtype == no.dtype
        if not ok:
            have = ", ".join(f"{f.name}: {f.dtype}{list(f.shape)}" for f in spec.signature)
            raise SignatureError(
                f"table {table!r} cannot hold n-step transitions: it has {have}; it needs "
                "observation and next_observation (same shape and dtype), action, and scalar "
                "float reward and discount (see NStepTransitionAdder.signature_toml())"
            )
        self.table = table
        self.n = int(n)
        self.discount = gamma
        self.priority_fn = priority_fn
        self.wait_at_episode_end = bool(wait_at_episode_end)
        self._reward_type = fields["reward"].np_dtype.type
        self._discount_type = fields["discount"].np_dtype.type
        # The oldest step an item references is n+1 steps back in the middle of an episode;
        # at its end, the shorter transitions add up to n-1 steps after the final observation.
        self._writer = TrajectoryWriter(client, num_keep_alive_refs=2 * self.n + 1)
        self._t = 0  # steps added in this episode
        # The newest n rewards and discounts; its sum is one compiled call per step.
        self._window = _native.NStepWindow(self.n, gamma)
        # The histories an item is made of, once the writer has them (see _histories).
        self._hist: tuple[ColumnHistory, ...] | None = None

    @staticmethod
    def signature_toml(
        observation_shape: Sequence[int] = (),
        observation_dtype: str = "float32",
        action_shape: Sequence[int] = (),
        action_dtype: str = "int64",
        float_dtype: str = "float32",
    ) -> str:
        """The ``[table.signature]`` section of a tables.toml table for these transitions."""
        obs = f'{{ shape = {list(observation_shape)}, dtype = "{observation_dtype}" }}'
        return (
            "[table.signature]\n"
            f"observation = {obs}\n"
            f'action = {{ shape = {list(action_shape)}, dtype = "{action_dtype}" }}\n'
            f'reward = {{ dtype = "{float_dtype}" }}\n'
            f'discount = {{ dtype = "{float_dtype}" }}\n'
            f"next_observation = {obs}\n"
        )

    @property
    def episode_id(self) -> int:
        """The current episode's id (that of the writer)."""
        return self._writer.episode_id

    def add(
        self,
        observation: Any,
        action: Any,
        reward: float,
        *,
        done: bool = False,
        discount: float | None = None,
        next_observation: Any = None,
    ) -> None:
        """Record one step: in ``observation`` the agent took ``action`` and got ``reward``.

        ``discount`` is the environment's discount d_t after this step (default: 0.0 when
        ``done``, a terminal step, else 1.0). ``done=True`` ends the episode here; then
        ``next_observation`` (the final observation) is required and the episode's last items
        are written (the call waits until they are in the table only with
        ``wait_at_episode_end=True``; :meth:`flush` does it on demand). At other steps
        ``next_observation`` may be given and is not used (the next call's observation is it).
        """
        if discount is None:
            d = 0.0 if done else 1.0
        else:
            d = float(discount)
            if not 0.0 <= d <= 1.0:
                raise InvalidArgumentError(f"discount must be in [0, 1], got {discount!r}")
        r = float(reward)
        if not math.isfinite(r):
            raise InvalidArgumentError(f"reward must be finite, got {reward!r}")
        if done and next_observation is None:
            raise InvalidArgumentError(
                "add(..., done=True) needs next_observation: the episode's final observation"
            )
        n = self.n
        if self._t >= n:
            # The window holds r_{t-n} .. r_{t-1}: the transition from s_{t-n} arrives here.
            ret, disc = self._window.full()
            hist = self._hist
            if hist is None:  # the first full window: the fields' first values set their dtypes
                ret, disc = self._reward_type(ret), self._discount_type(disc)
            w = self._writer
            w.append(
                {
                    "observation": observation,
                    "action": action,
                    "n_step_return": ret,
                    "n_step_discount": disc,
                }
            )
            if hist is None or self.priority_fn is not None:
                self._create(hist or self._histories(), -n - 1, -1)
            else:  # _create's common case, inline: one Python call less per step
                obs, act, rets, discs = hist
                first = -n - 1
                w.create_item(
                    self.table,
                    1.0,
                    {
                        "observation": obs[first],
                        "action": act[first],
                        "reward": rets[-1],
                        "discount": discs[-1],
                        "next_observation": obs[-1],
                    },
                )
        else:
            self._writer.append({"observation": observation, "action": action})
        self._window.push(r, d)
        self._t += 1
        if done:
            self._end(next_observation)

    def _histories(self) -> tuple[ColumnHistory, ...]:
        """The writer's histories of observation, action, return and discount (they last as
        long as the writer), kept once the return's exists: an item costs no dict lookups."""
        h = self._writer.history
        hist = (h["observation"], h["action"], h["n_step_return"], h["n_step_discount"])
        self._hist = hist
        return hist

    def _create(self, hist: tuple[ColumnHistory, ...], first: int, last: int) -> None:
        """The item from history step ``first`` (observation, action) to ``last`` (the arrival
        observation; reward and discount were appended with the newest step)."""
        obs, action, ret, disc = hist
        trajectory = {
            "observation": obs[first],
            "action": action[first],
            "reward": ret[-1],
            "discount": disc[-1],
            "next_observation": obs[last],
        }
        priority = 1.0
        if self.priority_fn is not None:
            priority = self.priority_fn({k: v.numpy() for k, v in trajectory.items()})
        self._writer.create_item(self.table, priority, trajectory)

    def _end(self, final_observation: Any) -> None:
        """Write the episode's remaining transitions, all arriving at ``final_observation``."""
        w = self._writer
        big_t = self._t  # steps in the episode; history index T is the final observation
        window = len(self._window)  # min(n, T) transitions still to write
        rets, discs = nstep_returns(
            np.array(self._window.rewards(), np.float64),
            np.array(self._window.discounts(), np.float64),
            self.discount,
        )
        rtype, dtype = self._reward_type, self._discount_type
        first = big_t - window
        w.append(
            {
                "observation": final_observation,
                "n_step_return": rtype(rets[0]),
                "n_step_discount": dtype(discs[0]),
            }
        )
        hist = self._hist or self._histories()
        self._create(hist, first, big_t)
        for i in range(1, window):  # at most n-1 shorter transitions, once per episode
            w.append({"n_step_return": rtype(rets[i]), "n_step_discount": dtype(discs[i])})
            self._create(hist, first + i, big_t)
        self._new_episode()

    def _new_episode(self) -> None:
        self._writer.end_episode(clear_buffers=True, flush=self.wait_at_episode_end)
        self._t = 0
        self._window.clear()

    def reset(self) -> None:
        """Abandon the current episode: its transitions not written yet are dropped (there is
        no final observation to end them with); flushes what was written."""
        self._new_episode()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every item written so far is in the table (see TrajectoryWriter.flush)."""
        self._writer.flush(timeout=timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush and close; the unfinished episode's pending transitions are dropped."""
        self._writer.close(timeout=timeout)

    def __enter__(self) -> NStepTransitionAdder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.__exit__(exc_type, exc, tb)
