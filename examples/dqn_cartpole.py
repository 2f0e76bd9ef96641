"""Distributed double DQN on CartPole-v1 over shmreplay: 4 actors, 1 learner, one command.

Run it (``pip install -e '.[examples]'``: gymnasium, torch, matplotlib)::

    python examples/dqn_cartpole.py                  # train until solved: ~1-3 min on 2 cores,
                                                     # writes docs/dqn_cartpole.csv and .png
    python examples/dqn_cartpole.py --smoke          # ~10 s: a few hundred steps, JSON line
    python examples/dqn_cartpole.py --compare-queue 10   # env steps/s: shmreplay vs mp.Queue
    python examples/dqn_cartpole.py --help           # every hyperparameter

Architecture (every box is a process; tables live in /dev/shm)::

                 ┌─────────────────────────── main process ────────────────────────────┐
                 │ starts the daemon (shmreplay.Server), the learner and the actors;   │
                 │ every --eval-every updates plays 10 greedy episodes with the newest │
                 │ weights; prints live lines; stops everything; writes CSV and PNG    │
                 └─────────────────────────────────────────────────────────────────────┘
    actor 0 (ε=0.4)    ─┐ one n-step transition ┌──────────────────────┐  prioritized batches
    actor 1 (ε=0.047)  ─┼─ per env step through ▶ table "replay"       ├─▶ learner (torch):
    actor 2 (ε=0.0056) ─┤ NStepTransitionAdder  │ prioritized, Fifo,   │   double DQN, target
    actor 3 (ε=0.00066)─┘                       │ SampleToInsertRatio  │◀─ net, IS weights,
          ▲                                     └──────────────────────┘   update_priorities
          │ sample_nowait(1) every --sync-every steps                              │ every
          └───────────── table "params": Lifo, max_size 1 ◀────────────────────────┘ --publish-
                         (flattened float32 weights + version)                       every

- Actors step their own ``gym.make("CartPole-v1")``, act ε-greedily with Ape-X's per-actor
  epsilons (ε_i = 0.4^(1 + 7·i/(N−1))) through a numpy copy of the Q-network (a 4→128→128→2
  MLP costs ~12 µs per step in numpy, several times more in torch, and torch would add
  ~200 MB and seconds of import to each actor), and write one n-step transition per step with
  :class:`shmreplay.NStepTransitionAdder`. The time limit at 500 steps is
  ``done=True, discount=1`` (bootstrapped from s'), a fallen pole ``discount=0``.
- The learner samples prioritized batches (priority exponent α in tables.toml), weighs each
  item by ``(table_size · probability)^-β / max`` (β annealed to 1), takes one Adam step on the
  Huber loss against the double-DQN target ``R + D · Q_target(s', argmax_a Q(s', a))`` (the
  adder's D already holds γ^m and the terminal factor), and writes ``|TD error| + 0.001`` back
  as the items' priorities. New items enter with priority 1.
- The SampleToInsertRatio limiter keeps ``samples ≈ --samples-per-insert × inserts``: actors
  block in the adder when they run ahead of the learner, the learner blocks when it would
  over-sample. The replay ratio is a setting instead of an accident of CPU scheduling (here
  16 samples per insert, batches of 128: one update per 8 env steps, however busy the machine).
- Weights travel through shmreplay too: the learner inserts its flattened parameters into a
  Lifo table of one item; actors and the evaluator ``sample_nowait(1)`` the newest.
- Solved: --solved-evals (2) consecutive evaluations with a mean of at least 475 over 10
  episodes (one lucky evaluation happens early and is followed by a collapse).
- Stopping (solved, budget spent, Ctrl-C, SIGTERM or an exception): set the stop event, switch
  the replay table's limiter to ``min_size`` so that actors blocked on inserts wake up, join
  every process, stop the daemon (it unlinks its segments), check /dev/shm. Children start
  with SIGINT blocked, so a Ctrl-C reaches only the main process, and die with it
  (PR_SET_PDEATHSIG) if it is killed.

``--compare-queue SECONDS`` runs the same actor function (env step, ε-greedy numpy forward
pass, ``sink.add``) with each sink, back to back, in rotated rounds: no sink (one actor alone:
the reference), then 4 actors + the learner with shmreplay's adder, with plain
``insert_batch`` of 64-transition chunks (the same n-step code as the Queue's), and with a
``multiprocessing.Queue`` of 64-transition chunks feeding a numpy ring buffer in the learner
(prioritized sampling in numpy, the same torch update). Inserts are not rate-limited in that
mode, so each figure is what the sink lets the actors reach; ``actor µs/step`` (the actors' CPU
time per env step) is the sink's cost, whatever else the machine is running.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import random
import secrets
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

ENV_ID = "CartPole-v1"
OBS_DIM, NUM_ACTIONS = 4, 2
DOCS = Path(__file__).resolve().parent.parent / "docs"
CHUNK = 64  # transitions per Queue message or insert_batch: one pickle or call per 64 steps
TRANSITION_FIELDS = ("observation", "action", "reward", "discount", "next_observation")
EVAL_SEED = 10_000  # evaluation episode k always starts from seed EVAL_SEED + k

# Per-process statistics, one float64 array shared by all (actors write their own row, the
# learner its own; 8-byte aligned stores, no lock needed for monotone counters).
A_STEPS, A_EPISODES, A_RETURN, A_READY = range(4)  # columns of an actor's row
L_UPDATES, L_PRIORITIES = range(2)  # the learner's row (the last one)


@dataclass(frozen=True)
class Config:
    """Every hyperparameter of a run; the defaults are those of the committed result."""

    seed: int = 0
    actors: int = 4
    hidden: int = 128
    n_step: int = 3
    gamma: float = 0.99
    batch_size: int = 128
    lr: float = 5e-4
    replay_size: int = 100_000
    min_replay: int = 1_000
    samples_per_insert: float = 16.0
    priority_exponent: float = 0.6
    beta0: float = 0.4
    beta_updates: int = 20_000
    priority_eps: float = 1e-3
    target_every: int = 250
    publish_every: int = 50
    sync_every: int = 100
    eps_base: float = 0.4
    eps_alpha: float = 7.0
    grad_clip: float = 10.0

    @property
    def layer_sizes(self) -> list[int]:
        return [OBS_DIM, self.hidden, self.hidden, NUM_ACTIONS]

    @property
    def num_params(self) -> int:
        s = self.layer_sizes
        return sum(i * o + o for i, o in zip(s[:-1], s[1:], strict=True))


# -- processes: common setup ---------------------------------------------------------------------


def _child_setup() -> None:
    """In every child: Ctrl-C is the parent's business (it stops us in order), and we die with
    the parent (PR_SET_PDEATHSIG) so a parent killed with -9 leaves no process behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    parent = mp.parent_process()
    if parent is not None and not parent.is_alive():  # it died before prctl
        sys.exit(1)


def actor_epsilon(i: int, n: int, base: float, alpha: float) -> float:
    """Ape-X's per-actor exploration: ε_i = base^(1 + alpha · i / (n − 1))."""
    return base ** (1 + alpha * i / max(1, n - 1))


class NumpyQ:
    """The Q-network's forward pass in numpy, on a flattened torch parameter vector (the order
    of ``nn.Sequential(Linear, ReLU, Linear, ReLU, Linear).parameters()``)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.layers: list[tuple[np.ndarray, np.ndarray]] = []

    def load(self, flat: np.ndarray) -> None:
        layers, o = [], 0
        for i, out in zip(self.sizes[:-1], self.sizes[1:], strict=True):
            w = flat[o : o + i * out].reshape(out, i)
            o += i * out
            layers.append((w, flat[o : o + out]))
            o += out
        self.layers = layers

    def act(self, obs: np.ndarray) -> int:
        h = obs
        last = len(self.layers) - 1
        for k, (w, b) in enumerate(self.layers):
            h = w @ h + b
            if k < last:
                np.maximum(h, 0.0, out=h)
        return int(h.argmax())


# -- sinks: where an actor's steps go --------------------------------------------------------------


class NullSink:
    """No transport: steps are dropped; fixed random weights (the reference measurement)."""

    def __init__(self, cfg: Config) -> None:
        rng = np.random.default_rng(cfg.seed)
        self._params = (rng.standard_normal(cfg.num_params) * 0.1).astype(np.float32)

    def add(self, obs, action, reward, done, discount, next_obs) -> None:
        pass

    def fetch_params(self):
        return self._params, 0

    def close(self) -> None:
        pass


class ShmSink:
    """shmreplay: n-step transitions through the adder; weights from the ``params`` table."""

    def __init__(self, name: str, cfg: Config) -> None:
        import shmreplay
        from shmreplay import NStepTransitionAdder

        self._timeout = shmreplay.RateLimiterTimeout
        self.client = shmreplay.attach(name, timeout=30)
        self.adder = NStepTransitionAdder(self.client, "replay", n=cfg.n_step, discount=cfg.gamma)
        self.params = self.client.table("params")

    def add(self, obs, action, reward, done, discount, next_obs) -> None:
        self.adder.add(obs, action, reward, done=done, discount=discount, next_observation=next_obs)

    def fetch_params(self):
        try:
            s = self.params.sample_nowait(1)
        except self._timeout:
            return None  # nothing published yet
        return s.data["params"][0], int(s.data["version"][0])

    def close(self) -> None:
        from shmreplay import ShmReplayError

        try:
            self.adder.close(timeout=2.0)
        except ShmReplayError:
            pass  # the daemon went first (an abnormal stop): nothing left to flush into
        self.client.close(timeout=2.0)


class NStepBuffer:
    """The adder's n-step transitions, computed the same way, for the Queue transport."""

    def __init__(self, n: int, gamma: float) -> None:
        from shmreplay.client.adders import nstep_returns

        self.n, self.gamma = n, gamma
        self._returns = nstep_returns
        self.pending: deque = deque()

    def add(self, obs, action, reward, done, discount, next_obs) -> list[tuple]:
        out = []
        if len(self.pending) == self.n:  # s_{t-n} → s_t is complete
            o, a, _, _ = self.pending[0]
            ret, disc = 0.0, 1.0
            for _, _, r, d in self.pending:
                ret += disc * r
                disc *= self.gamma * d
            out.append((o, a, ret, disc, obs))
            self.pending.popleft()
        self.pending.append((obs, action, float(reward), float(discount)))
        if done:
            p = self.pending
            rets, discs = self._returns(
                np.array([s[2] for s in p]), np.array([s[3] for s in p]), self.gamma
            )
            out.extend((s[0], s[1], rets[i], discs[i], next_obs) for i, s in enumerate(p))
            p.clear()
        return out


class ChunkSink:
    """n-step transitions (an :class:`NStepBuffer`) gathered in chunks of CHUNK rows; a subclass
    says where a full chunk goes and where weights come from."""

    def __init__(self, cfg: Config) -> None:
        self.nstep = NStepBuffer(cfg.n_step, cfg.gamma)
        self._new_chunk()

    def _new_chunk(self) -> None:
        k = CHUNK
        self.o = np.empty((k, OBS_DIM), np.float32)
        self.a = np.empty(k, np.int64)
        self.r = np.empty(k, np.float32)
        self.d = np.empty(k, np.float32)
        self.o2 = np.empty((k, OBS_DIM), np.float32)
        self.k = 0

    def add(self, obs, action, reward, done, discount, next_obs) -> None:
        for o, a, r, d, o2 in self.nstep.add(obs, action, reward, done, discount, next_obs):
            k = self.k
            self.o[k], self.a[k], self.r[k], self.d[k], self.o2[k] = o, a, r, d, o2
            self.k = k + 1
            if self.k == CHUNK:
                self.send((self.o, self.a, self.r, self.d, self.o2))
                self._new_chunk()

    def send(self, chunk: tuple) -> None:
        raise NotImplementedError


class QueueSink(ChunkSink):
    """multiprocessing.Queue: one message per chunk; weights from a queue of one per actor."""

    def __init__(self, out: mp.Queue, params_in: mp.Queue, cfg: Config, stop) -> None:
        super().__init__(cfg)
        self.out, self.params_in, self.stop = out, params_in, stop

    def send(self, chunk: tuple) -> None:
        while not self.stop.is_set():  # a full queue is the learner's back-pressure
            try:
                self.out.put(chunk, timeout=0.5)
                return
            except queue_mod.Full:
                pass

    def fetch_params(self):
        try:
            return self.params_in.get_nowait()
        except queue_mod.Empty:
            return None

    def close(self) -> None:
        self.out.cancel_join_thread()  # the learner may be gone: do not wait to flush the pipe


class ShmChunkSink(ChunkSink):
    """shmreplay without the adder: the Queue sink's chunks, each one ``insert_batch`` (this
    separates the cost of the transport from the cost of the trajectory writer)."""

    def __init__(self, name: str, cfg: Config) -> None:
        import shmreplay

        self._timeout = shmreplay.RateLimiterTimeout
        super().__init__(cfg)
        self.client = shmreplay.attach(name, timeout=30)
        self.replay = self.client.table("replay")
        self.params = self.client.table("params")

    def send(self, chunk: tuple) -> None:
        self.replay.insert_batch(dict(zip(TRANSITION_FIELDS, chunk, strict=True)))

    fetch_params = ShmSink.fetch_params

    def close(self) -> None:
        self.client.close(timeout=2.0)


def run_actor(index: int, sink, cfg: Config, stop, stats) -> None:
    """One actor, whatever the sink: env step, ε-greedy numpy forward pass, ``sink.add``."""
    import gymnasium as gym

    env = gym.make(ENV_ID)
    rng = random.Random(cfg.seed * 1000 + index)
    eps = actor_epsilon(index, cfg.actors, cfg.eps_base, cfg.eps_alpha)
    q = NumpyQ(cfg.layer_sizes)
    have_params = False
    row = stats[index]
    obs, _ = env.reset(seed=cfg.seed * 1000 + index)
    steps, episodes, ep_return = 0, 0, 0.0
    row[A_READY] = 1
    while True:
        if steps % cfg.sync_every == 0:
            if stop.is_set():
                break
            got = sink.fetch_params()
            if got is not None:
                q.load(got[0])
                have_params = True
        if not have_params or rng.random() < eps:
            action = rng.randrange(NUM_ACTIONS)
        else:
            action = q.act(obs)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
        sink.add(obs, action, reward, done, 0.0 if terminated else 1.0, next_obs)
        ep_return += reward
        steps += 1
        row[A_STEPS] = steps
        if done:
            episodes += 1
            row[A_EPISODES], row[A_RETURN] = episodes, ep_return
            obs, _ = env.reset()
            ep_return = 0.0
        else:
            obs = next_obs
    sink.close()


def _exit_if_daemon_gone(who: str):
    """A daemon that went away (stopped by a Ctrl-C in the terminal, or crashed) ends this
    process with one line instead of a traceback; the parent reports it."""
    import shmreplay

    exc = sys.exc_info()[1]
    if isinstance(exc, shmreplay.DaemonNotRunning):
        print(f"{who}: the daemon is gone; exiting", file=sys.stderr, flush=True)
        sys.exit(3)


def _actor_main(index: int, transport: str, args: tuple, cfg: Config, stop, stats_buf) -> None:
    _child_setup()
    stats = _stats_view(stats_buf, cfg.actors)
    try:
        if transport == "shm":
            sink = ShmSink(args[0], cfg)
        elif transport == "shm-chunks":
            sink = ShmChunkSink(args[0], cfg)
        elif transport == "queue":
            sink = QueueSink(args[0], args[1], cfg, stop)
        else:
            sink = NullSink(cfg)
        run_actor(index, sink, cfg, stop, stats)
    except Exception:
        _exit_if_daemon_gone(f"actor-{index}")
        raise


# -- the learner ---------------------------------------------------------------------------------


@dataclass
class Batch:
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    discount: np.ndarray
    next_obs: np.ndarray
    keys: np.ndarray
    probability: np.ndarray
    table_size: np.ndarray


class ShmSource:
    """The learner's side of shmreplay: prioritized samples, priority updates, weights out."""

    def __init__(self, name: str, cfg: Config) -> None:
        import shmreplay

        self._timeout = shmreplay.RateLimiterTimeout
        self.client = shmreplay.attach(name, timeout=30, seed=cfg.seed)
        self.replay = self.client.table("replay")
        self.params = self.client.table("params")

    def sample(self, batch_size: int, timeout: float) -> Batch | None:
        try:
            s = self.replay.sample(batch_size, timeout=timeout)
        except self._timeout:
            return None
        d, i = s.data, s.info
        return Batch(
            d["observation"],
            d["action"],
            d["reward"],
            d["discount"],
            d["next_observation"],
            i.key,
            i.probability,
            i.table_size,
        )

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        return len(keys) - self.replay.update_priorities(keys, priorities)

    def publish(self, flat: np.ndarray, version: int) -> None:
        self.params.insert({"params": flat, "version": version})

    def close(self) -> None:
        self.client.close(timeout=2.0)


class QueueSource:
    """The Queue transport's learner side: drains the queue into a numpy ring buffer and samples
    it with the table's prioritized distribution (p^α / Σ p^α, by cumsum and searchsorted)."""

    def __init__(self, inbox: mp.Queue, params_out: list, cfg: Config) -> None:
        self.inbox, self.params_out = inbox, params_out
        self.alpha, self.min_size = cfg.priority_exponent, cfg.min_replay
        c = cfg.replay_size
        self.o = np.zeros((c, OBS_DIM), np.float32)
        self.a = np.zeros(c, np.int64)
        self.r = np.zeros(c, np.float32)
        self.d = np.zeros(c, np.float32)
        self.o2 = np.zeros((c, OBS_DIM), np.float32)
        self.pa = np.zeros(c)  # priority ** alpha
        self.cap, self.size, self.head = c, 0, 0
        self.rng = np.random.default_rng(cfg.seed)

    def _drain(self, timeout: float) -> None:
        block = self.size < self.min_size
        while True:
            try:
                chunk = self.inbox.get(timeout=timeout) if block else self.inbox.get_nowait()
            except queue_mod.Empty:
                return
            block = False
            k = len(chunk[1])
            idx = (self.head + np.arange(k)) % self.cap
            for arr, col in zip((self.o, self.a, self.r, self.d, self.o2), chunk, strict=True):
                arr[idx] = col
            self.pa[idx] = 1.0  # new items: priority 1, as the adder writes them
            self.head = (self.head + k) % self.cap
            self.size = min(self.cap, self.size + k)

    def sample(self, batch_size: int, timeout: float) -> Batch | None:
        self._drain(timeout)
        if self.size < self.min_size:
            return None
        c = np.cumsum(self.pa[: self.size])
        idx = np.searchsorted(c, self.rng.random(batch_size) * c[-1], side="right")
        idx = np.minimum(idx, self.size - 1)
        return Batch(
            self.o[idx],
            self.a[idx],
            self.r[idx],
            self.d[idx],
            self.o2[idx],
            idx,
            self.pa[idx] / c[-1],
            np.full(batch_size, self.size),
        )

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        self.pa[keys] = priorities**self.alpha
        return len(keys)

    def publish(self, flat: np.ndarray, version: int) -> None:
        for q in self.params_out:
            try:
                q.get_nowait()  # drop the weights this actor has not taken yet
            except queue_mod.Empty:
                pass
            try:
                q.put_nowait((flat, version))
            except queue_mod.Full:
                pass

    def close(self) -> None:
        for q in self.params_out:
            q.cancel_join_thread()


def run_learner(source, cfg: Config, stop, row) -> None:
    """Double DQN with a target network and prioritized replay, until ``stop`` is set."""
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    s = cfg.layer_sizes
    net = nn.Sequential(
        nn.Linear(s[0], s[1]), nn.ReLU(), nn.Linear(s[1], s[2]), nn.ReLU(), nn.Linear(s[2], s[3])
    )
    target = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    params = list(net.parameters())

    def flat() -> np.ndarray:
        return nn.utils.parameters_to_vector(params).detach().numpy()

    source.publish(flat(), 0)
    updates, prioritized = 0, 0
    while not stop.is_set():
        b = source.sample(cfg.batch_size, timeout=0.5)
        if b is None:
            continue
        beta = min(1.0, cfg.beta0 + (1.0 - cfg.beta0) * updates / cfg.beta_updates)
        w = (b.table_size * b.probability) ** -beta
        w = torch.from_numpy((w / w.max()).astype(np.float32))
        obs, next_obs = torch.from_numpy(b.obs), torch.from_numpy(b.next_obs)
        action = torch.from_numpy(b.action).long()
        q = net(obs).gather(1, action[:, None]).squeeze(1)
        with torch.no_grad():
            best = net(next_obs).argmax(1, keepdim=True)
            y = torch.from_numpy(b.reward) + torch.from_numpy(b.discount) * target(next_obs).gather(
                1, best
            ).squeeze(1)
        td = y - q
        loss = (w * nn.functional.smooth_l1_loss(q, y, reduction="none")).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        prioritized += source.update_priorities(
            b.keys, np.abs(td.detach().numpy()).astype(np.float64) + cfg.priority_eps
        )
        updates += 1
        row[L_UPDATES], row[L_PRIORITIES] = updates, prioritized
        if updates % cfg.target_every == 0:
            target.load_state_dict(net.state_dict())
        if updates % cfg.publish_every == 0:
            source.publish(flat(), updates)
    source.close()


def _learner_main(transport: str, args: tuple, cfg: Config, stop, stats_buf) -> None:
    _child_setup()
    import torch  # noqa: F401  (seconds on a busy machine: before attaching to anything)

    stats = _stats_view(stats_buf, cfg.actors)
    try:
        if transport == "shm":
            source = ShmSource(args[0], cfg)
        else:
            source = QueueSource(args[0], args[1], cfg)
        run_learner(source, cfg, stop, stats[cfg.actors])
    except Exception:
        _exit_if_daemon_gone("learner")
        raise


# -- the main process: daemon, processes, evaluation, reports -------------------------------------


def _stats_buffer(ctx, actors: int):
    return ctx.RawArray(ctypes.c_double, (actors + 1) * 4)


def _stats_view(buf, actors: int) -> np.ndarray:
    return np.frombuffer(buf, np.float64).reshape(actors + 1, 4)


def tables_toml(name: str, cfg: Config, rate_limited: bool) -> str:
    """The instance's tables: n-step transitions, and the learner's newest weights."""
    from shmreplay import NStepTransitionAdder

    if rate_limited:
        spi = cfg.samples_per_insert
        # Actors may run ahead of the learner by one batch of inserts, the learner ahead of
        # them by spi batches of samples; wider only adds staleness, narrower adds wake-ups.
        err = cfg.batch_size * max(1.0, spi)
        limiter = (
            f'{{ kind = "sample_to_insert_ratio", samples_per_insert = {spi}, '
            f"min_size_to_sample = {cfg.min_replay}, error_buffer = {err} }}"
        )
    else:
        limiter = f'{{ kind = "min_size", min_size = {cfg.min_replay} }}'
    signature = NStepTransitionAdder.signature_toml(observation_shape=[OBS_DIM])
    return f"""
[server]
name = "{name}"
max_clients = 16

[[table]]
name = "replay"
max_size = {cfg.replay_size}
sampler = {{ kind = "prioritized", priority_exponent = {cfg.priority_exponent} }}
remover = {{ kind = "fifo" }}
rate_limiter = {limiter}
{signature}
[[table]]
name = "params"
max_size = 1
sampler = {{ kind = "lifo" }}
remover = {{ kind = "fifo" }}
rate_limiter = {{ kind = "min_size", min_size = 1 }}
[table.signature]
params = {{ shape = [{cfg.num_params}], dtype = "float32" }}
version = {{ dtype = "int64" }}
"""


@contextlib.contextmanager
def _sigint_blocked():
    """Processes started in this block inherit a blocked SIGINT (the signal mask survives fork
    and exec): a Ctrl-C in the terminal, sent to the whole process group, reaches only this
    process, which then stops the others in order (actors, learner, daemon last)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start_server(name: str, toml_text: str):
    """The daemon, as a child process (``python -m shmreplay serve``); its log goes to a private
    file, quoted if it fails to start. Returns once it serves."""
    import shmreplay

    with _sigint_blocked():
        return shmreplay.Server(toml_text, name)


def shm_leftovers(name: str) -> list[str]:
    from shmreplay.engine.instance import shm_objects

    return shm_objects(name)


class Run:
    """The processes of one run and their orderly shutdown (also on errors and Ctrl-C)."""

    def __init__(self, name: str, cfg: Config) -> None:
        self.name, self.cfg = name, cfg
        self.ctx = mp.get_context("spawn")
        self.stop_event = self.ctx.Event()
        self.stats_buf = _stats_buffer(self.ctx, cfg.actors)
        self.stats = _stats_view(self.stats_buf, cfg.actors)
        self.procs: list = []
        self.client = None

    def start(self, target, *args, name: str) -> None:
        p = self.ctx.Process(
            target=target, args=(*args, self.cfg, self.stop_event, self.stats_buf), name=name
        )
        with _sigint_blocked():
            p.start()
        self.procs.append(p)

    def check_alive(self) -> None:
        for p in self.procs:
            if p.exitcode is not None:
                raise RuntimeError(f"{p.name} exited with status {p.exitcode} (see its traceback)")

    def steps(self) -> int:
        return int(self.stats[: self.cfg.actors, A_STEPS].sum())

    def updates(self) -> int:
        return int(self.stats[self.cfg.actors, L_UPDATES])

    def stop(self, release_table: str | None = "replay") -> None:
        """Stop every process: set the event, release writers blocked by the limiter, join."""
        self.stop_event.set()
        if self.client is not None and release_table is not None:
            import shmreplay

            try:
                self.client.set_rate_limiter(release_table, shmreplay.RateLimiterSpec.min_size(1))
            except shmreplay.ShmReplayError:
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                print(f"  {p.name} did not stop within 10 s: terminating it", flush=True)
                p.terminate()
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
                    p.join()
        self.procs = []


def _sigterm_to_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def evaluate(env, q: NumpyQ, episodes: int) -> list[float]:
    """Greedy episodes from fixed seeds (EVAL_SEED + k): the same start states every time."""
    returns = []
    for k in range(episodes):
        obs, _ = env.reset(seed=EVAL_SEED + k)
        total, done = 0.0, False
        while not done:
            obs, r, term, trunc, _ = env.step(q.act(obs))
            total += r
            done = term or trunc
        returns.append(total)
    return returns


def train(cfg: Config, args) -> dict:
    """The training run: returns the summary printed as the final JSON line."""
    import gymnasium as gym

    import shmreplay

    name = f"dqn-{os.getpid()}-{secrets.token_hex(2)}"
    run = Run(name, cfg)
    records: list[dict] = []
    summary: dict = {"mode": "smoke" if args.smoke else "train", "seed": cfg.seed, "instance": name}
    daemon = start_server(name, tables_toml(name, cfg, rate_limited=True))
    t0 = time.monotonic()
    interrupted = False
    try:
        run.client = shmreplay.attach(name, timeout=30)
        params = run.client.table("params")
        replay = run.client.table("replay")
        run.start(_learner_main, "shm", (name,), name="learner")
        for i in range(cfg.actors):
            run.start(_actor_main, i, "shm", (name,), name=f"actor-{i}")
        eps = [actor_epsilon(i, cfg.actors, cfg.eps_base, cfg.eps_alpha) for i in range(cfg.actors)]
        print(
            f"instance {name}: {cfg.actors} actors (ε = "
            + ", ".join(f"{e:.3g}" for e in eps)
            + f"), 1 learner (batch {cfg.batch_size}, {cfg.samples_per_insert:g} samples per "
            f"insert), {cfg.num_params} parameters",
            flush=True,
        )
        env = gym.make(ENV_ID)
        q = NumpyQ(cfg.layer_sizes)
        t0 = time.monotonic()
        last = (t0, 0, 0)  # time, steps, updates at the previous record
        last_log = (t0, 0, 0)
        next_eval = args.eval_every
        last_eval = float("nan")
        streak = 0  # consecutive evaluations at or above the target
        while True:
            time.sleep(0.05)
            run.check_alive()
            if not daemon.running():
                raise RuntimeError(
                    f"the daemon exited with status {daemon.proc.returncode}:\n{daemon.log(20)}"
                )
            now = time.monotonic()
            steps, updates = run.steps(), run.updates()
            budget_spent = steps >= args.max_env_steps or now - t0 >= args.max_seconds
            if updates >= next_eval or budget_spent:
                next_eval = updates + args.eval_every
                try:
                    s = params.sample_nowait(1)
                except shmreplay.RateLimiterTimeout:
                    print("  no weights published yet: nothing to evaluate", flush=True)
                    break
                q.load(s.data["params"][0])
                version = int(s.data["version"][0])
                rets = evaluate(env, q, args.eval_episodes)
                last_eval = float(np.mean(rets))
                dt = now - last[0]
                records.append(
                    {
                        "wall_s": round(now - t0, 2),
                        "env_steps": steps,
                        "learner_updates": version,
                        "eval_return_mean": last_eval,
                        "eval_return_min": float(np.min(rets)),
                        "env_steps_per_s": round((steps - last[1]) / dt, 1) if dt > 0 else 0.0,
                        "updates_per_s": round((updates - last[2]) / dt, 1) if dt > 0 else 0.0,
                    }
                )
                last = (now, steps, updates)
                print(
                    f"  eval after {version:>6,} updates, {steps:>8,} env steps: "
                    f"mean return {last_eval:6.1f} (min {min(rets):.0f}) over {len(rets)} episodes",
                    flush=True,
                )
                streak = streak + 1 if last_eval >= args.target_return else 0
                if streak >= args.solved_evals and not args.smoke:
                    summary["solved"] = records[-1]
                    break
            if budget_spent:
                break
            if now - last_log[0] >= args.log_every:
                dt = now - last_log[0]
                actor_ret = run.stats[: cfg.actors, A_RETURN].mean()
                size = replay.info().current_size
                sps, ups = (steps - last_log[1]) / dt, (updates - last_log[2]) / dt
                print(
                    f"t {now - t0:6.1f} s  env steps {steps:>9,} ({sps:>6,.0f}/s)  "
                    f"updates {updates:>7,} ({ups:>5,.0f}/s)  "
                    f"table {size:>7,}  actors' last return {actor_ret:5.1f}  "
                    f"eval {last_eval:5.1f}",
                    flush=True,
                )
                last_log = (now, steps, updates)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: stopping", flush=True)
    finally:
        summary["wall_s"] = round(time.monotonic() - t0, 1)
        summary["cpu_s"] = {k: round(v, 1) for k, v in cpu_seconds(run, daemon).items()}
        run.stop()
        summary["env_steps"] = run.steps()
        summary["learner_updates"] = run.updates()
        summary["priority_updates"] = int(run.stats[cfg.actors, L_PRIORITIES])
        if run.client is not None:
            try:
                info = run.client.table("replay").info()
                summary["replay"] = {
                    "size": info.current_size,
                    "total_inserted": info.total_inserted,
                    "total_sampled": info.total_sampled,
                    "max_priority": info.max_priority,
                    "min_priority": info.min_priority,
                }
            except shmreplay.ShmReplayError:
                pass
            run.client.close(timeout=2.0)
        summary["daemon_exit"] = daemon.stop()
        summary["shm_leftovers"] = shm_leftovers(name)
    summary["interrupted"] = interrupted
    summary["eval_returns"] = [r["eval_return_mean"] for r in records]
    summary.setdefault("solved", None)
    summary["records"] = records
    return summary


# -- throughput comparison -------------------------------------------------------------------------


def cpu_seconds(run: Run, daemon=None) -> dict[str, float]:
    """CPU time (user + system) used so far by each role's processes."""
    import psutil

    pids = {"actors": [p.pid for p in run.procs if p.name.startswith("actor")]}
    pids["learner"] = [p.pid for p in run.procs if p.name == "learner"]
    pids["daemon"] = [] if daemon is None else [daemon.pid]
    pids["main"] = [os.getpid()]
    out = {}
    for role, ps in pids.items():
        total = 0.0
        for pid in ps:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        out[role] = total
    return out


def _measure(run: Run, seconds: float, daemon=None) -> dict:
    """Env steps/s, learner updates/s and each role's share of a core over ``seconds``, from
    one second after every process is ready (and the learner, if any, has started updating)."""
    deadline = time.monotonic() + 120
    while not run.stats[: run.cfg.actors, A_READY].all() or (
        len(run.procs) > run.cfg.actors and not run.stats[run.cfg.actors, L_UPDATES]
    ):
        run.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError("processes did not become ready within 120 s")
        time.sleep(0.05)
    time.sleep(1.0)
    t, s, u, c = time.monotonic(), run.steps(), run.updates(), cpu_seconds(run, daemon)
    time.sleep(seconds)
    run.check_alive()
    dt = time.monotonic() - t
    c2 = cpu_seconds(run, daemon)
    steps = run.steps() - s
    return {
        "env_steps_per_s": round(steps / dt, 1),
        # actors' CPU time per env step: what the sink costs, whatever else the machine runs
        "actor_us_per_step": round(1e6 * (c2["actors"] - c["actors"]) / max(1, steps), 2),
        "updates_per_s": round((run.updates() - u) / dt, 1),
        "cpu_percent": {k: round(100 * (c2[k] - c[k]) / dt, 1) for k in c},
    }


def _phase_line(label: str, m: dict) -> str:
    cpu = ", ".join(f"{k} {v:.0f}" for k, v in m["cpu_percent"].items() if v >= 0.5)
    return (
        f"  {label:<34} {m['env_steps_per_s']:>7,.0f} env steps/s  "
        f"{m['updates_per_s']:>4,.0f} updates/s  {m['actor_us_per_step']:>5.1f} actor µs/step  "
        f"(CPU % of a core: {cpu})"
    )


def _shm_phase(cfg: Config, seconds: float, transport: str, result: dict) -> dict:
    """4 actors with ``transport`` ("shm": the adder, "shm-chunks": insert_batch) + learner,
    on a daemon of their own."""
    import shmreplay

    name = f"dqn-cmp-{os.getpid()}-{secrets.token_hex(2)}"
    result["instances"].append(name)
    daemon = start_server(name, tables_toml(name, cfg, rate_limited=False))
    run = Run(name, cfg)
    try:
        run.client = shmreplay.attach(name, timeout=30)
        run.start(_learner_main, "shm", (name,), name="learner")
        for i in range(cfg.actors):
            run.start(_actor_main, i, transport, (name,), name=f"actor-{i}")
        return _measure(run, seconds, daemon)
    finally:
        run.stop()
        if run.client is not None:
            run.client.close(timeout=2.0)
        result["daemon_exit"].append(daemon.stop())
        result["shm_leftovers"].extend(shm_leftovers(name))


def _queue_phase(cfg: Config, seconds: float, transport: str, result: dict) -> dict:
    """4 actors putting chunks on one multiprocessing.Queue + the learner draining it."""
    run = Run("queue", cfg)
    inbox = run.ctx.Queue(maxsize=256)
    params_qs = [run.ctx.Queue(maxsize=1) for _ in range(cfg.actors)]
    try:
        run.start(_learner_main, "queue", (inbox, params_qs), name="learner")
        for i in range(cfg.actors):
            run.start(_actor_main, i, "queue", (inbox, params_qs[i]), name=f"actor-{i}")
        return _measure(run, seconds)
    finally:
        run.stop(release_table=None)


TRANSPORTS = {  # result key: (label, phase function, actor transport)
    "shmreplay": ("shmreplay, NStepTransitionAdder", _shm_phase, "shm"),
    "shmreplay_insert_batch": (f"shmreplay, insert_batch({CHUNK} rows)", _shm_phase, "shm-chunks"),
    "queue": (f"multiprocessing.Queue ({CHUNK} rows)", _queue_phase, "queue"),
}


def compare(cfg: Config, seconds: float, rounds: int) -> dict:
    """The same actor code with no transport, shmreplay (the adder, then plain insert_batch of
    the Queue's chunks) and multiprocessing.Queue: ``rounds`` rounds, each in a rotated order
    (the machine's speed drifts), medians reported."""
    result: dict = {"mode": "compare", "seconds": seconds, "rounds": rounds, "seed": cfg.seed}
    result.update(instances=[], daemon_exit=[], shm_leftovers=[])
    print(
        f"{cfg.actors} actors + learner per transport, {seconds:g} s each from 1 s after every "
        f"process is ready, {rounds} round(s); inserts are not rate-limited in this mode",
        flush=True,
    )
    run = Run("reference", replace(cfg, actors=1))
    try:
        run.start(_actor_main, 0, "none", (), name="actor-0")
        ref = result["reference"] = _measure(run, seconds)
    finally:
        run.stop(release_table=None)
    print(_phase_line("reference: 1 actor alone, no sink", ref), flush=True)
    keys = list(TRANSPORTS)
    runs: dict[str, list[dict]] = {k: [] for k in keys}
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            label, phase, transport = TRANSPORTS[key]
            m = phase(cfg, seconds, transport, result)
            runs[key].append(m)
            print(_phase_line(label, m), flush=True)
    for key in keys:
        result[key] = {
            k: float(np.median([m[k] for m in runs[key]]))
            for k in ("env_steps_per_s", "updates_per_s", "actor_us_per_step")
        }
        result[key]["runs"] = runs[key]
    q = result["queue"]["env_steps_per_s"]
    result["ratio"] = result["shmreplay"]["env_steps_per_s"] / q if q else math.inf
    result["ratio_insert_batch"] = result["shmreplay_insert_batch"]["env_steps_per_s"] / q
    print(f"medians over {rounds} round(s):", flush=True)
    for key in keys:
        m = result[key]
        print(
            f"  {TRANSPORTS[key][0]:<34} {m['env_steps_per_s']:>7,.0f} env steps/s  "
            f"{m['actor_us_per_step']:>5.1f} actor µs/step",
            flush=True,
        )
    print(
        f"env steps/s relative to multiprocessing.Queue: adder {result['ratio']:.2f}×, "
        f"insert_batch {result['ratio_insert_batch']:.2f}×; the lone actor: "
        f"{ref['env_steps_per_s']:,.0f} env steps/s, {ref['actor_us_per_step']:.1f} µs/step",
        flush=True,
    )
    return result


# -- outputs ------------------------------------------------------------------------------------


CSV_COLUMNS = (
    "wall_s",
    "env_steps",
    "learner_updates",
    "eval_return_mean",
    "eval_return_min",
    "env_steps_per_s",
    "updates_per_s",
)


def write_csv(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(",".join(CSV_COLUMNS) + "\n")
        for r in records:
            f.write(",".join(str(r[c]) for c in CSV_COLUMNS) + "\n")


def plot(
    records: list[dict], path: Path, title: str, target: float, steps_per_update: float
) -> None:
    """Evaluation return against env steps; below it, env steps/s and learner updates/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([r["env_steps"] for r in records])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[2, 1])
    ax1.plot(steps, [r["eval_return_mean"] for r in records], "o-", ms=3, label="mean of 10")
    ax1.plot(steps, [r["eval_return_min"] for r in records], ":", lw=1, label="worst of 10")
    ax1.axhline(target, color="grey", lw=0.8, ls="--", label=f"target {target:g}")
    ax1.set_ylabel("greedy evaluation return")
    ax1.set_title(title, fontsize=10)
    ax1.legend(loc="upper left")
    ax1.grid(alpha=0.3)
    l1 = ax2.plot(steps, [r["env_steps_per_s"] for r in records], "-", label="env steps/s")
    ax2.set_ylabel("env steps/s (4 actors)")
    ax2.set_xlabel("environment steps")
    ax2.grid(alpha=0.3)
    ax3 = ax2.twinx()
    l2 = ax3.plot(
        steps, [r["updates_per_s"] for r in records], "-", color="C1", label="updates/s (right)"
    )
    ax3.set_ylabel("learner updates/s", color="C1")
    ax2.legend(l1 + l2, [x.get_label() for x in l1 + l2], loc="upper right", fontsize=8)
    ax2.set_title(
        "throughput between evaluations (the rate limiter keeps env steps/s = "
        f"{steps_per_update:g} × updates/s)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = Config()
    p = argparse.ArgumentParser(
        description="Double DQN on CartPole-v1: 4 actor processes write n-step transitions "
        "into a shmreplay table, one PyTorch learner samples it with priorities. Starts the "
        "daemon, the actors and the learner, and stops them all.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="a few hundred env steps and a few learner updates (≤ ~30 s), no files written",
    )
    mode.add_argument(
        "--compare-queue",
        type=float,
        metavar="SECONDS",
        help="instead of training, measure env steps/s for SECONDS each: one actor with no "
        "transport, then 4 actors + learner over shmreplay (the adder, then insert_batch of "
        "64-row chunks), then over multiprocessing.Queue (64-row chunks)",
    )
    p.add_argument(
        "--compare-rounds",
        type=_positive_int,
        default=3,
        help="with --compare-queue: rounds of the three transports, in rotated order (medians)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of actors, learner and nets")
    p.add_argument("--actors", type=_positive_int, default=d.actors, help="actor processes")
    p.add_argument(
        "--hidden", type=_positive_int, default=d.hidden, help="units in each of 2 hidden layers"
    )
    p.add_argument("--n-step", type=_positive_int, default=d.n_step, help="steps per transition")
    p.add_argument("--gamma", type=float, default=d.gamma, help="discount per step")
    p.add_argument(
        "--batch-size", type=_positive_int, default=d.batch_size, help="learner batch size"
    )
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument(
        "--replay-size", type=_positive_int, default=d.replay_size, help="replay table max_size"
    )
    p.add_argument(
        "--min-replay",
        type=_positive_int,
        default=d.min_replay,
        help="items before the first sample",
    )
    p.add_argument(
        "--samples-per-insert",
        type=float,
        default=d.samples_per_insert,
        help="SampleToInsertRatio: times each transition is sampled on average",
    )
    p.add_argument("--priority-exponent", type=float, default=d.priority_exponent, help="PER's α")
    p.add_argument(
        "--beta0", type=float, default=d.beta0, help="PER's importance-sampling β at the start"
    )
    p.add_argument(
        "--beta-updates",
        type=_positive_int,
        default=d.beta_updates,
        help="updates over which β reaches 1",
    )
    p.add_argument(
        "--target-every",
        type=_positive_int,
        default=d.target_every,
        help="updates between target copies",
    )
    p.add_argument(
        "--publish-every",
        type=_positive_int,
        default=d.publish_every,
        help="updates between weight publishes",
    )
    p.add_argument(
        "--sync-every",
        type=_positive_int,
        default=d.sync_every,
        help="actor steps between weight fetches",
    )
    p.add_argument(
        "--eps-base", type=float, default=d.eps_base, help="Ape-X ε: the most exploring actor's"
    )
    p.add_argument(
        "--eps-alpha", type=float, default=d.eps_alpha, help="Ape-X α: how fast ε falls by actor"
    )
    p.add_argument(
        "--eval-every", type=_positive_int, default=500, help="learner updates between evals"
    )
    p.add_argument(
        "--eval-episodes", type=_positive_int, default=10, help="greedy episodes per eval"
    )
    p.add_argument(
        "--target-return", type=float, default=475.0, help="stop once an eval's mean reaches it"
    )
    p.add_argument(
        "--solved-evals",
        type=_positive_int,
        default=2,
        help="solved once this many consecutive evals reach --target-return",
    )
    p.add_argument("--max-seconds", type=float, default=600.0, help="wall-time budget of training")
    p.add_argument("--max-env-steps", type=_positive_int, default=2_000_000, help="env-step budget")
    p.add_argument("--log-every", type=float, default=2.0, help="seconds between live lines")
    p.add_argument(
        "--out", type=Path, default=DOCS / "dqn_cartpole", help="CSV and PNG path (no suffix)"
    )
    p.add_argument("--no-plot", action="store_true", help="write the CSV but not the PNG")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_env_steps, args.max_seconds = 400, 25.0
        args.eval_episodes, args.eval_every = 2, 10**9
        args.min_replay, args.batch_size, args.samples_per_insert = 64, 32, 4.0
        args.publish_every = 10
    return args


def config_from(args: argparse.Namespace) -> Config:
    fields = Config.__dataclass_fields__
    return Config(**{k: getattr(args, k) for k in fields if hasattr(args, k)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from(args)
    # One thread per process for numpy's BLAS and torch: 6 processes share 2 cores.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    if args.compare_queue is not None:
        result = compare(cfg, args.compare_queue, args.compare_rounds)
        print(json.dumps(result))
        ok = not result["shm_leftovers"] and not any(result["daemon_exit"])
        return 0 if ok else 1
    summary = train(cfg, args)
    records = summary.pop("records")
    if not args.smoke and records:
        write_csv(records, args.out.with_suffix(".csv"))
        if not args.no_plot:
            solved = summary["solved"]
            title = (
                f"DQN CartPole-v1 over shmreplay, seed {cfg.seed}: "
                + (
                    f"solved after {solved['env_steps']:,} env steps, {solved['wall_s']:.0f} s"
                    if solved
                    else f"not solved in {summary['wall_s']:.0f} s"
                )
                + f"\n{cfg.actors} actors + learner + daemon on {os.cpu_count()} cores"
            )
            per_update = cfg.batch_size / cfg.samples_per_insert
            plot(records, args.out.with_suffix(".png"), title, args.target_return, per_update)
        print(f"wrote {args.out.with_suffix('.csv')}" + ("" if args.no_plot else " and .png"))
    summary["config"] = asdict(cfg)
    print(json.dumps(summary))
    ok = summary["daemon_exit"] == 0 and not summary["shm_leftovers"]
    if summary["interrupted"]:
        return 130  # as a shell reports a Ctrl-C
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
