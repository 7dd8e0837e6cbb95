"""Policies that learn nothing from images, reported beside every trained model so success can be trusted."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from robovlms.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:  # the command line reads BASELINES for its help without importing a store's libraries
    from robovlms.benchmark import Benchmark, EpisodeSpec, Observation

BASELINES = ("zero", "mean", "replay")

CONSTANT_CHUNK = 10_000  # a constant policy needs no observation: one chunk covers the episode, with one render


class ZeroPolicy:
    """Does nothing: the arm stays where it is."""

    def __init__(self, action_dim: int):
        self.action_dim = action_dim

    def reset(self, spec: EpisodeSpec) -> None:
        pass

    def step(self, observation: Observation) -> np.ndarray:
        return np.zeros((CONSTANT_CHUNK, self.action_dim), dtype=np.float32)


class MeanActionPolicy:
    """Repeats the mean action of the task's training demonstrations: solves tasks that need no perception."""

    def __init__(self, store_path: str):
        from robovlms.data.store import EpisodeStore

        store = EpisodeStore(store_path)
        frame_tasks = np.repeat(store.episodes["task"].to_numpy(), store.episodes["length"].to_numpy())
        actions = np.asarray(store.actions)
        self.mean_actions = {task: actions[frame_tasks == task].mean(axis=0) for task in store.tasks()}
        self._action = None

    def reset(self, spec: EpisodeSpec) -> None:
        self._action = self.mean_actions[spec.task]

    def step(self, observation: Observation) -> np.ndarray:
        return np.broadcast_to(self._action, (CONSTANT_CHUNK, len(self._action)))


class ReplayPolicy:
    """Replays, open-loop, the actions of a random training demonstration of the task, then holds still."""

    def __init__(self, store_path: str, seed: int = 0):
        from robovlms.data.store import EpisodeStore

        self.store = EpisodeStore(store_path)
        self.seed = seed
        self._plan: np.ndarray | None = None

    def reset(self, spec: EpisodeSpec) -> None:
        candidates = self.store.episodes.index[self.store.episodes["task"] == spec.task].to_numpy()
        chosen = np.random.default_rng([self.seed, spec.seed]).choice(candidates)
        row = self.store.episodes.loc[chosen]
        self._plan = np.asarray(self.store.actions[row["start"]: row["start"] + row["length"]])

    def step(self, observation: Observation) -> np.ndarray:
        if self._plan is None:
            return np.zeros(self.store.layout.action_dim, dtype=np.float32)
        plan, self._plan = self._plan, None
        return plan


def check_baseline_data(name: str, benchmark: Benchmark, store: str | Path | None) -> None:
    """The mean and replay baselines act from the store's demonstrations of each evaluated task."""
    if name not in BASELINES:
        raise UnknownNameError("baseline", name, BASELINES)
    if name == "zero":
        return
    if store is None:
        raise ConfigError(f"the {name} baseline needs the training store (its demonstrations)")
    from robovlms.data.store import EpisodeStore

    stored = EpisodeStore(store).tasks()
    missing = sorted(set(benchmark.tasks()) - set(stored))
    if missing:
        raise ConfigError(f"the {name} baseline acts from demonstrations of each evaluated task, but {store} has none "
                          f"of {missing} (its tasks: {stored[:5]}{' ...' if len(stored) > 5 else ''}); datasets that "
                          f"name tasks by instruction (Open-X) cannot back it: keep only the zero baseline")


def baseline_factory(name: str, benchmark: Benchmark, store: str | Path | None, seed: int = 0):
    """A picklable factory of a baseline policy, for `robovlms.rollout.evaluate`."""
    check_baseline_data(name, benchmark, store)
    if name == "zero":
        return functools.partial(ZeroPolicy, benchmark.action_dim)
    return functools.partial(MeanActionPolicy, str(store)) if name == "mean" else functools.partial(
        ReplayPolicy, str(store), seed)
