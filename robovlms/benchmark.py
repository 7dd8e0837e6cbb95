"""The benchmark interface: what a policy observes, how an evaluation episode runs, and how episodes are scored.

Meta-World (embedded), CALVIN and SimplerEnv implement `Benchmark`. Single-task benchmarks score per-task success;
chain benchmarks (CALVIN) override `run_episode` to run several subtasks in a row and `score` to report how many
in a row succeeded.

A split (ABC->D) has two sets of evaluation episodes, its evaluation splits: the test episodes
(`evaluation_episodes`), which results are reported on, and the validation episodes (`validation_episodes`), which
settings are chosen on. They never share an episode.
"""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from robovlms.errors import ConfigError, MissingDependencyError, UnknownNameError
from robovlms.registry import BENCHMARKS

if TYPE_CHECKING:
    from robovlms.sim_to_real import PublishedAgreement


EVALUATION_SPLITS = ("validation", "test")  # validation: for choosing settings; test: for reporting them
# how to choose settings where a benchmark has no validation episodes: its trials are then evaluated on the test
# episodes, by name, and only reported
VAL_LOSS_SEARCH = ("search: {objective: val_loss} with train.validation_fraction > 0, and evaluation: {split: test} "
                   "so that its trials are evaluated on the test episodes by name, reported but not selected on")


@dataclass
class Observation:
    images: dict[str, np.ndarray]  # camera name -> (H, W, 3) uint8, upright
    state: np.ndarray  # proprioception (S,) float32
    instruction: str
    privileged_state: np.ndarray | None = None  # full simulator state, for scripted experts only


@dataclass(frozen=True)
class EpisodeSpec:
    """Everything that decides an episode's initial state and goal: rerunning a spec reruns the episode."""

    task: str
    scene: str
    instruction: str
    seed: int
    subtasks: tuple[str, ...] = ()  # chain benchmarks: the subtasks in order (task names the chain)


@dataclass
class EpisodeRecord:
    task: str
    scene: str
    instruction: str
    seed: int
    success: bool
    steps: int
    seconds: float
    subtasks_completed: int | None = None  # chain benchmarks only
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trajectory:
    """The frames a policy saw and the actions it took, as stored in an episode store."""

    images: dict[str, list[np.ndarray]] = field(default_factory=dict)
    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)

    def append(self, observation: Observation, action: np.ndarray) -> None:
        for camera, image in observation.images.items():
            self.images.setdefault(camera, []).append(image)
        self.states.append(observation.state)
        self.actions.append(action)

    def __len__(self) -> int:
        return len(self.actions)


class Policy(Protocol):
    def reset(self, spec: EpisodeSpec) -> None:
        """Start an episode. Learned policies may read only `spec.instruction`; baselines may read the task."""

    def step(self, observation: Observation) -> np.ndarray:
        """One action (A,), or a chunk (k, A) executed open-loop before the policy observes again."""


@dataclass
class Installation:
    """Where a benchmark's simulator runs and what it needs there: `python` the interpreter (this process's, or that
    of the simulator's own environment), `modules` where each needed module is found (None: missing), `install`
    what to run to install the rest."""

    python: str
    modules: dict[str, str | None] = field(default_factory=dict)
    install: str = ""
    own_environment: bool = False  # the simulator runs in a subprocess of `python`

    @property
    def missing(self) -> list[str]:
        return [name for name, where in self.modules.items() if where is None]


class Environment(ABC):
    """One simulator instance, owned by one process."""

    @abstractmethod
    def reset(self, spec: EpisodeSpec) -> Observation: ...

    @abstractmethod
    def step(self, action: np.ndarray, observe: bool) -> tuple[Observation | None, bool]:
        """Apply one action; return (observation if `observe` else None, whether the task is now solved)."""

    def close(self) -> None:
        pass


class Benchmark(ABC):
    """A family of tasks, scenes and splits, an environment to run them in, and a scoring protocol."""

    name: str
    action_dim: int  # continuous arm dimensions + one gripper dimension (last)
    state_dim: int
    cameras: tuple[str, ...]
    image_size: int
    max_steps: int

    @abstractmethod
    def tasks(self) -> list[str]: ...

    @abstractmethod
    def splits(self) -> list[str]: ...

    @abstractmethod
    def evaluation_episodes(self, split: str, episodes_per_task: int) -> list[EpisodeSpec]:
        """The test episodes of a split: scenes, instructions and seeds never used for training."""

    def validation_episodes(self, split: str, episodes_per_task: int) -> list[EpisodeSpec]:
        """The validation episodes of a split, for choosing settings: never a test episode nor a training one, and
        held out from training as the test episodes are, so that success on them predicts success on the test
        episodes without reading them. ConfigError where the benchmark's protocol allows none (say why)."""
        raise ConfigError(f"{self.name} defines no validation episodes, so settings cannot be chosen on them. Choose "
                          f"on the validation loss of held-out training windows ({VAL_LOSS_SEARCH}), or name the "
                          f"test episodes knowing that results chosen on them are not test results")

    def split_episodes(self, split: str, evaluation_split: str, episodes_per_task: int) -> list[EpisodeSpec]:
        """The episodes of one evaluation split of `split`: "validation" or "test"."""
        if evaluation_split not in EVALUATION_SPLITS:
            raise UnknownNameError("evaluation split", evaluation_split, EVALUATION_SPLITS)
        episodes = self.validation_episodes if evaluation_split == "validation" else self.evaluation_episodes
        return episodes(split, episodes_per_task)

    @abstractmethod
    def make_environment(self) -> Environment:
        """Build the simulator; called once per worker process."""

    def installation(self) -> Installation:
        """Where the simulator runs and which of the modules it needs are found there (`robovlms doctor`)."""
        return Installation(python=sys.executable)

    def check_available(self) -> None:
        """Raise MissingDependencyError, saying what to install, when the simulator cannot be built here."""
        installation = self.installation()
        if installation.missing:
            where = f"{installation.python} (benchmark option python)" if installation.own_environment else \
                "this Python environment"
            raise MissingDependencyError(f"{self.name}: {where} cannot import {', '.join(installation.missing)}.\n"
                                         f"{installation.install}")

    def try_one_step(self) -> None:
        """Build the simulator, reset it to the first evaluation episode and take one zero action: whether it runs
        (`robovlms doctor`). Raises what an evaluation would raise."""
        environment = self.make_environment()
        try:
            environment.reset(self.evaluation_episodes(self.splits()[0], 1)[0])
            environment.step(np.zeros(self.action_dim, dtype=np.float32), observe=True)
        finally:
            environment.close()

    def check_frames(self, cameras: Sequence[str], image_size: int, action_dim: int, source: str) -> None:
        """Raise ConfigError unless policies trained on frames of this kind (`source`: a store) can act here: the
        same cameras at the same size, and actions of this benchmark's dimension."""
        if tuple(cameras) != tuple(self.cameras) or image_size != self.image_size:
            raise ConfigError(f"{self.name} is set to observe cameras {list(self.cameras)} at {self.image_size} px; "
                              f"{source} holds {list(cameras)} at {image_size} px (set benchmark options cameras and "
                              f"image_size to match)")
        if action_dim != self.action_dim:
            raise ConfigError(f"{self.name} takes {self.action_dim}-D actions (arm and gripper); {source} holds "
                              f"{action_dim}-D actions")

    @classmethod
    def published_agreement(cls, split: str, tasks: Sequence[str]) -> PublishedAgreement | None:
        """The sim-to-real agreement (robovlms.sim_to_real) published for the benchmark's own reference policies on
        these tasks under `split`, which reports show as the yardstick; None where nothing is published."""
        return None

    def options(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this benchmark (stored with the data it produced)."""
        return {}

    def scripted_expert(self) -> Callable[[], Policy]:
        """A picklable factory of the benchmark's scripted expert, for generating demonstrations."""
        raise NotImplementedError(f"{self.name} ships no scripted experts: import its dataset instead")

    def demonstration_episodes(self, split: str, episodes_per_scene: int, attempt: int = 0,
                               scenes: str | None = None) -> list[EpisodeSpec]:
        """Training episodes of a split (or of `scenes`) for the scripted expert; `attempt` k draws fresh seeds."""
        raise NotImplementedError(f"{self.name} ships no scripted experts: import its dataset instead")

    def run_episode(self, environment: Environment, spec: EpisodeSpec, policy: Policy,
                    trajectory: Trajectory | None = None,
                    on_frame: Any = None) -> EpisodeRecord:
        """Run one episode until success or `max_steps`.

        Frames are rendered only where the policy observes: after the last action of each chunk. When a
        `trajectory` is given every step is observed and recorded; `on_frame(observation)` sees every observation.
        """
        started = time.perf_counter()
        observation = environment.reset(spec)
        policy.reset(spec)
        if on_frame is not None:
            on_frame(observation)
        success, steps, _ = self.act_until_solved(environment, policy, observation, trajectory, on_frame)
        return EpisodeRecord(task=spec.task, scene=spec.scene, instruction=spec.instruction, seed=spec.seed,
                             success=success, steps=steps, seconds=time.perf_counter() - started)

    def act_until_solved(self, environment: Environment, policy: Policy, observation: Observation,
                         trajectory: Trajectory | None = None, on_frame: Any = None,
                         max_steps: int | None = None) -> tuple[bool, int, Observation]:
        """Step the policy from `observation` until the environment says solved or `max_steps` (default: the
        benchmark's) pass; returns (solved, steps taken, last observation)."""
        max_steps = max_steps or self.max_steps
        observe_every_step = trajectory is not None or on_frame is not None
        steps, success = 0, False
        while steps < max_steps and not success:
            chunk = np.atleast_2d(np.asarray(policy.step(observation), dtype=np.float32))
            if chunk.shape[-1] != self.action_dim:
                raise ValueError(f"policy returned actions of dimension {chunk.shape[-1]}; "
                                 f"{self.name} takes {self.action_dim}")
            chunk = chunk[: max_steps - steps]
            for index, action in enumerate(chunk):
                if trajectory is not None:
                    trajectory.append(observation, action)
                observe = observe_every_step or index == len(chunk) - 1
                next_observation, success = environment.step(action, observe=observe)
                steps += 1
                if next_observation is not None:
                    observation = next_observation
                    if on_frame is not None:
                        on_frame(observation)
                if success:
                    break
        return success, steps, observation

    def score(self, records: Sequence[EpisodeRecord]) -> dict[str, float]:
        """Success rate overall and per task."""
        scores = {"success": float(np.mean([r.success for r in records])) if records else float("nan")}
        for task in sorted({r.task for r in records}):
            scores[f"success/{task}"] = float(np.mean([r.success for r in records if r.task == task]))
        return scores


def square_image(image: np.ndarray, size: int) -> np.ndarray:
    """An (H, W, 3) uint8 image as (size, size, 3), resized bilinearly: how every simulator's camera and every
    imported dataset's frames become a store's or an observation's square images."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def create_benchmark(name: str, **options: Any) -> Benchmark:
    return BENCHMARKS.create(name, **options)
