"""CALVIN (ABC->D and friends) through the benchmark's real packages: `calvin_env` for the simulator and the task
oracle, the `calvin` repository's configuration for the task definitions and the evaluation instructions.

The protocol is the benchmark's own: chains of 5 subtasks from its sequence generator (ported in
`calvin_sequences`), each chain starting from the initial state the benchmark derives for it with the robot at its
neutral pose, at most 360 steps per subtask, success judged by the task oracle at every step, the instruction of a
subtask the first of its validation annotations, the policy reset before each subtask, and a chain stopping at its
first failure. Scores: the share of chains completing at least 1..5 subtasks and the average length.

Neither package installs from a registry: the adapter imports them only when an environment is built.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from robovlms.benchmark import (VAL_LOSS_SEARCH, Benchmark, EpisodeRecord, EpisodeSpec, Environment, Installation,
                                Observation, Policy, Trajectory, square_image)
from robovlms.benchmarks.calvin_sequences import (CHAIN_LENGTH, SUBTASKS, get_sequences, initial_condition_seed,
                                                   initial_conditions, sample_chains)
from robovlms.errors import ConfigError, MissingDependencyError, UnknownNameError
from robovlms.simulators import calvin_play_table
from robovlms.simulators.calvin_play_table import ANNOTATIONS_FILE, CAMERA_SIZES, PlayTable

CALVIN_ENV_COMMIT = "797142c"  # the calvin_env commit robovlms is checked with (the calvin repository pins 1431a46)
INSTALL_STEPS = ("Install it from its repository (it is not on PyPI), best into an environment of its own:\n"
                 "  git clone --recurse-submodules https://github.com/mees/calvin.git\n"
                 f"  git -C calvin/calvin_env checkout {CALVIN_ENV_COMMIT}\n"
                 "  python3 -m venv calvin-venv && calvin-venv/bin/pip install pybullet gym hydra-core hydra-colorlog "
                 "omegaconf opencv-python-headless numpy-quaternion gitpython cloudpickle scipy\n"
                 "  calvin-venv/bin/pip install --no-deps -e calvin/calvin_env\n"
                 "then set benchmark option python (or ROBOVLMS_CALVIN_PYTHON) to calvin-venv/bin/python and "
                 "calvin_conf to calvin/calvin_models/conf (editable installs: calvin_env finds its assets relative to "
                 "its source tree)")
INSTALL = f"CALVIN's simulator is not installed. {INSTALL_STEPS}"
SPLITS = ("ABC->D", "ABCD->D", "D->D")  # every split evaluates on scene D
STEPS_PER_SUBTASK = 360
NUM_CHAINS = 1000
# Validation chains, for choosing settings where the test scene is trained on (D->D, ABCD->D): drawn by the
# benchmark's own sampler from other seeds, none of them a test chain; their spec seeds start here.
VALIDATION_SPLITS = ("D->D", "ABCD->D")
VALIDATION_SEED_OFFSET = 1_000_000
VALIDATION_SAMPLER_SEED = 10_000  # condition i draws with seed 10_000 + i (the test chains: seed i)
PYTHON_VARIABLE = "ROBOVLMS_CALVIN_PYTHON"  # the interpreter of CALVIN's own environment, when not given
CONF_VARIABLE = "ROBOVLMS_CALVIN_CONF"  # the calvin repository's calvin_models/conf, when not given
PLAY_TABLE_MODULE = Path(calvin_play_table.__file__)

# The robot's neutral pose in every evaluation chain (tcp xyz, tcp euler, gripper width, 7 joints, gripper open).
NEUTRAL_ROBOT_OBS = np.array([0.02586889, -0.2313129, 0.5712808, 3.09045411, -0.02908596, 1.50013585, 0.07999963,
                              -1.21779124, 1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928,
                              1.0])
SLIDER_POSITIONS = {"slider_left": [-0.240851662, 0.0924044687, 0.460990009],
                    "slider_right": [0.070341633, 0.0924044687, 0.460990009]}
TABLE_POSITIONS = [[0.0500000896, -0.120000177, 0.459990009], [0.229995412, -0.11999514, 0.45999001]]
BLOCK_YAW_RANGE = (np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)


def evaluation_chains(count: int) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """The first `count` of the benchmark's 1000 evaluation chains (a quick run evaluates a prefix of the published
    protocol; the generator itself draws other chains for another total)."""
    return get_sequences(max(NUM_CHAINS, count), limit=count)


@functools.cache
def validation_chains() -> tuple[tuple[dict[str, Any], tuple[str, ...]], ...]:
    """NUM_CHAINS chains spread over the initial conditions as the test chains are, from other seeds of the same
    sampler, in an order shuffled with seed 1; no (condition, chain) of the test chains among them."""
    conditions = initial_conditions()
    test = {(json.dumps(condition, sort_keys=True), chain) for condition, chain in evaluation_chains(NUM_CHAINS)}
    base, extra = divmod(NUM_CHAINS, len(conditions))
    chains = []
    for index, condition in enumerate(conditions):
        wanted = count = base + (index < extra)
        key = json.dumps(condition, sort_keys=True)
        while True:  # a longer draw from one seed extends the shorter one
            fresh = [chain for chain in sample_chains(condition, count, VALIDATION_SAMPLER_SEED + index)
                     if (key, chain) not in test]
            if len(fresh) >= wanted:
                break
            count += wanted - len(fresh)
        chains += [(condition, chain) for chain in fresh[:wanted]]
    order = np.random.RandomState(1).permutation(len(chains))
    return tuple(chains[i] for i in order)


def chain_of(spec: EpisodeSpec) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The (initial condition, subtasks) a spec names: a test chain by its index, a validation chain by its index
    past VALIDATION_SEED_OFFSET."""
    if spec.seed >= VALIDATION_SEED_OFFSET:
        return validation_chains()[spec.seed - VALIDATION_SEED_OFFSET]
    return evaluation_chains(spec.seed + 1)[spec.seed]


def initial_env_state(condition: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(robot_obs, scene_obs) of a chain's initial condition, as the benchmark derives them: block places on the
    table and block yaws drawn from a generator seeded by the condition's hash."""
    rng = np.random.RandomState(initial_condition_seed(condition))
    table = np.array(TABLE_POSITIONS)
    rng.shuffle(table)
    scene = np.zeros(24)
    scene[0] = 0.28 if condition["slider"] == "left" else 0.0
    scene[1] = 0.22 if condition["drawer"] == "open" else 0.0
    scene[3] = 0.088 if condition["lightbulb"] == 1 else 0.0
    scene[4], scene[5] = condition["lightbulb"], condition["led"]
    on_table = {"red_block": table[0], "blue_block": table[1] if condition["red_block"] == "table" else table[0],
                "pink_block": table[1]}
    for offset, block in zip((6, 12, 18), ("red_block", "blue_block", "pink_block")):
        place = condition[block]
        scene[offset:offset + 3] = SLIDER_POSITIONS[place] if place in SLIDER_POSITIONS else on_table[block]
        scene[offset + 5] = rng.uniform(*BLOCK_YAW_RANGE)
    return NEUTRAL_ROBOT_OBS.copy(), scene


class CalvinBenchmark(Benchmark):
    """CALVIN's play table, scene D, scored by chains of 5 subtasks.

    `evaluation_episodes(split, n)` gives the first n of the benchmark's 1000 chains (n = 1000 for published
    numbers). `calvin_conf` is the `calvin_models/conf` folder of the calvin repository (default
    $ROBOVLMS_CALVIN_CONF, else found through the installed `calvin_agent` package); `dataset` a CALVIN split whose
    `validation/.hydra/merged_config.yaml` defines the evaluation scene, as the benchmark's own evaluation uses
    (without it, scene D is composed from calvin_env's own configuration). `use_egl` chooses the renderer: None
    keeps that configuration's (EGL, as CALVIN's dataset was rendered), True/False force EGL or pybullet's tiny
    renderer. `python` is the interpreter of an environment where CALVIN is installed: the simulator then runs in a
    subprocess of it (`robovlms.benchmarks.remote`); default $ROBOVLMS_CALVIN_PYTHON, else this process.
    """

    name = "calvin"
    action_dim = 7  # rel_actions: xyz, euler xyz in [-1, 1], gripper -1 (close) / 1 (open)
    state_dim = 15  # robot_obs
    max_steps = STEPS_PER_SUBTASK

    def __init__(self, image_size: int = 200, cameras: tuple[str, ...] | list[str] = tuple(CAMERA_SIZES),
                 calvin_conf: str | None = None, dataset: str | None = None, use_egl: bool | None = None,
                 python: str | None = None):
        for camera in cameras:
            if camera not in CAMERA_SIZES:
                raise UnknownNameError("CALVIN camera", camera, CAMERA_SIZES)
        if not 32 <= image_size <= 400:
            raise ConfigError(f"image_size {image_size} is out of range 32 to 400")
        self.image_size, self.cameras = image_size, tuple(cameras)
        self.calvin_conf = calvin_conf or os.environ.get(CONF_VARIABLE) or None
        self.dataset, self.use_egl = dataset, use_egl
        self.python = python or os.environ.get(PYTHON_VARIABLE) or None

    def options(self) -> dict[str, Any]:
        """Without `python`: where the simulator runs is not what it is, and shards of one evaluation may run on
        machines whose interpreters live elsewhere."""
        return {"image_size": self.image_size, "cameras": list(self.cameras), "calvin_conf": self.calvin_conf,
                "dataset": self.dataset, "use_egl": self.use_egl}

    def tasks(self) -> list[str]:
        return list(SUBTASKS)

    def splits(self) -> list[str]:
        return list(SPLITS)

    def evaluation_episodes(self, split: str, episodes_per_task: int) -> list[EpisodeSpec]:
        """The benchmark's first `episodes_per_task` chains (the count of chains: CALVIN has no per-task episodes).
        A spec's seed is the chain's index, which names its initial condition."""
        if split not in SPLITS:
            raise UnknownNameError("CALVIN split", split, SPLITS)
        return [EpisodeSpec(task="chain", scene="D", instruction="", seed=index, subtasks=tuple(subtasks))
                for index, (_, subtasks) in enumerate(evaluation_chains(episodes_per_task))]

    def validation_episodes(self, split: str, episodes_per_task: int) -> list[EpisodeSpec]:
        """The first `episodes_per_task` of NUM_CHAINS validation chains, in scene D, for the splits that train on
        it (D->D, ABCD->D): held-out chains of a training scene, with the evaluation instructions (CALVIN has one
        held-out instruction per subtask). ABC->D has none: its only held-out scene is the test scene D."""
        if split not in SPLITS:
            raise UnknownNameError("CALVIN split", split, SPLITS)
        if split not in VALIDATION_SPLITS:
            raise ConfigError(
                f"CALVIN {split} has no validation episodes: its held-out scene D is the test scene (the dataset's "
                f"validation/ folder is scene D too), and chains in the training scenes A-C would need their own "
                f"initial states, which CALVIN defines for D only. Choose on the validation loss of held-out "
                f"training windows ({VAL_LOSS_SEARCH}); D->D and ABCD->D have validation chains "
                f"(docs/calvin.md)")
        if episodes_per_task > NUM_CHAINS:
            raise ConfigError(f"CALVIN has {NUM_CHAINS} validation chains; asked for {episodes_per_task}")
        return [EpisodeSpec(task="chain", scene="D", instruction="", seed=VALIDATION_SEED_OFFSET + index,
                            subtasks=tuple(subtasks))
                for index, (_, subtasks) in enumerate(validation_chains()[:episodes_per_task])]

    def installation(self) -> Installation:
        from robovlms.benchmarks.remote import locate_modules

        needed = ["calvin_env", "hydra", "pybullet"] + (["calvin_agent"] if self.calvin_conf is None else [])
        python, modules = locate_modules(self.python, needed)
        return Installation(python, modules, INSTALL, own_environment=self.python is not None)

    def make_environment(self) -> CalvinEnvironment:
        if self.python is not None:
            return self._remote_environment()
        while _OPEN_ENVIRONMENTS:  # two play tables in one process clash over pybullet's client
            _OPEN_ENVIRONMENTS.pop().close()
        self.check_available()
        with _calvin_errors(sys.executable):
            conf = Path(calvin_play_table.find_calvin_conf(self.calvin_conf))
            table = calvin_play_table.open_play_table(list(self.cameras), self.dataset, self.use_egl, str(conf))
        environment = CalvinEnvironment(table, load_instructions(conf), self.cameras, self.image_size)
        _OPEN_ENVIRONMENTS.append(environment)
        return environment

    def _remote_environment(self) -> CalvinEnvironment:
        from robovlms.benchmarks.remote import SimulatorProcess

        process = SimulatorProcess(self.python)
        try:
            with _calvin_errors(self.python):
                conf = Path(process.call(PLAY_TABLE_MODULE, "find_calvin_conf", self.calvin_conf))
                table = process.call(PLAY_TABLE_MODULE, "open_play_table", list(self.cameras), self.dataset,
                                     self.use_egl, str(conf))
        except BaseException:
            process.close()
            raise
        return CalvinEnvironment(table, load_instructions(conf), self.cameras, self.image_size, process)

    def try_one_step(self) -> None:
        """The first chain's start and one zero action in its first subtask, judged by the task oracle."""
        environment = self.make_environment()
        try:
            spec = self.evaluation_episodes(SPLITS[0], 1)[0]
            environment.reset(spec)
            environment.begin_subtask(spec.subtasks[0])
            environment.step(np.zeros(self.action_dim, dtype=np.float32), observe=True)
        finally:
            environment.close()

    def run_episode(self, environment: CalvinEnvironment, spec: EpisodeSpec, policy: Policy,
                    trajectory: Trajectory | None = None, on_frame: Any = None) -> EpisodeRecord:
        """One chain: its subtasks in order until the first failure; the policy is reset before each."""
        started = time.perf_counter()
        observation = environment.reset(spec)
        completed, steps, outcomes = 0, 0, []
        for subtask in spec.subtasks:
            observation = environment.begin_subtask(subtask)
            policy.reset(dataclasses.replace(spec, task=subtask, instruction=observation.instruction))
            if on_frame is not None:
                on_frame(observation)
            success, used, observation = self.act_until_solved(environment, policy, observation, trajectory,
                                                               on_frame)
            steps += used
            outcomes.append(success)
            if not success:
                break
            completed += 1
        return EpisodeRecord(task=spec.task, scene=spec.scene, instruction=" | ".join(spec.subtasks), seed=spec.seed,
                             success=completed == len(spec.subtasks), steps=steps,
                             seconds=time.perf_counter() - started, subtasks_completed=completed,
                             extra={"subtasks": list(spec.subtasks), "subtask_success": outcomes})

    def score(self, records: list[EpisodeRecord]) -> dict[str, float]:
        """Share of chains completing at least 1..5 subtasks, average length, and each subtask's success rate
        over the chains that reached it."""
        completed = np.array([record.subtasks_completed for record in records])
        scores = {"success": float(np.mean(completed == CHAIN_LENGTH)) if records else float("nan"),
                  "average_length": float(completed.mean()) if records else float("nan")}
        for k in range(1, CHAIN_LENGTH + 1):
            scores[f"chain/{k}"] = float(np.mean(completed >= k)) if records else float("nan")
        attempts: dict[str, list[bool]] = {}
        for record in records:
            for subtask, success in zip(record.extra["subtasks"], record.extra["subtask_success"]):
                attempts.setdefault(subtask, []).append(success)
        for subtask in sorted(attempts):
            scores[f"success/{subtask}"] = float(np.mean(attempts[subtask]))
        return scores


_OPEN_ENVIRONMENTS: list[CalvinEnvironment] = []


class CalvinEnvironment(Environment):
    """A play table with its task oracle (`calvin_play_table.PlayTable`, here or in the simulator `process`) and
    the subtasks' instructions."""

    def __init__(self, table: PlayTable, instructions: dict[str, str], cameras: tuple[str, ...], image_size: int,
                 process: Any = None):
        self.table, self.instructions, self.process = table, instructions, process
        self.cameras, self.image_size = cameras, image_size
        self._instruction = ""
        self._gripper = 1.0

    def reset(self, spec: EpisodeSpec) -> Observation:
        condition, subtasks = chain_of(spec)
        if tuple(subtasks) != tuple(spec.subtasks):
            raise ConfigError(f"chain {spec.seed} of the benchmark is {list(subtasks)}, not {list(spec.subtasks)}")
        robot_obs, scene_obs = initial_env_state(condition)
        self._instruction = ""
        return self._observation(self.table.reset(robot_obs, scene_obs))

    def begin_subtask(self, subtask: str) -> Observation:
        """Judge success from here on against the state now, as the benchmark does at each subtask's start."""
        if subtask not in self.instructions:
            raise UnknownNameError("CALVIN subtask", subtask, self.instructions)
        self._instruction = self.instructions[subtask]
        return self._observation(self.table.begin_subtask(subtask))

    def step(self, action: np.ndarray, observe: bool) -> tuple[Observation | None, bool]:
        obs, solved = self.table.step(env_action(action, self._gripper))
        observation = self._observation(obs)
        return (observation if observe else None), solved

    def _observation(self, obs: dict[str, Any]) -> Observation:
        self._gripper = float(obs["robot_obs"][14])  # the gripper command the robot holds now
        images = {camera: square_image(np.asarray(obs["rgb_obs"][camera]).astype(np.uint8), self.image_size)
                  for camera in self.cameras}
        return Observation(images=images, state=np.asarray(obs["robot_obs"], dtype=np.float32),
                           instruction=self._instruction,
                           privileged_state=np.asarray(obs["scene_obs"], dtype=np.float32))

    def close(self) -> None:
        """Close the play table (and its simulator process) once; later calls do nothing."""
        if self.table is not None:
            table, self.table = self.table, None
            try:
                if self.process is None or not self.process.dead:  # a dead simulator holds nothing to close
                    table.close()
            finally:
                if self.process is not None:
                    self.process.close()
        if self in _OPEN_ENVIRONMENTS:
            _OPEN_ENVIRONMENTS.remove(self)


def env_action(action: np.ndarray, gripper_now: float = 1.0) -> np.ndarray:
    """A policy's 7-D relative action as `calvin_env` takes it: arm clipped to [-1, 1], gripper exactly -1 (close)
    or 1 (open) by its sign. A gripper of exactly 0 states no preference and keeps the robot's current command
    (`gripper_now`, robot_obs[14]; open at a chain's start): calvin_env accepts only -1 and 1, and mapping 0 to
    either would make a policy that outputs nothing move the gripper."""
    action = np.asarray(action, dtype=np.float64).reshape(-1)
    if action.shape != (7,):
        raise ValueError(f"CALVIN takes 7-D relative actions; got shape {action.shape}")
    gripper = np.sign(action[6]) or (1.0 if gripper_now > 0 else -1.0)
    return np.concatenate([np.clip(action[:6], -1.0, 1.0), [gripper]])


# ---- the real packages' errors --------------------------------------------------------------------------------

@contextmanager
def _calvin_errors(python: str):
    """Turns what `calvin_play_table` raises (here or in a simulator process run by `python`) into robovlms' errors:
    calvin_agent missing where the task definitions are looked up through it, anything else that fails to import
    (calvin_env or what it imports), a calvin_conf folder without the task definitions."""
    try:
        yield
    except MissingDependencyError:
        raise
    except ImportError as error:
        if "calvin_agent" in str(error):
            raise MissingDependencyError(
                f"CALVIN's task definitions and evaluation instructions live in its repository's calvin_models/conf; "
                f"install calvin_models (below) or set benchmark option calvin_conf to that folder.\n{INSTALL}\n"
                f"(import failed: {error})") from None
        raise MissingDependencyError(
            f"calvin_env fails to import in {python}: {error}. robovlms was checked with calvin_env "
            f"{CALVIN_ENV_COMMIT}, which needs only the packages below; a recursive clone of calvin checks out an "
            f"older calvin_env: run git -C calvin/calvin_env checkout {CALVIN_ENV_COMMIT} (an editable install "
            f"follows it). {INSTALL_STEPS}") from None
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None


def find_calvin_conf(calvin_conf: str | None) -> Path:
    """The calvin repository's `calvin_models/conf` folder: given, or next to the installed `calvin_agent`."""
    with _calvin_errors(sys.executable):
        return Path(calvin_play_table.find_calvin_conf(calvin_conf))


def load_instructions(conf: Path) -> dict[str, str]:
    """Each subtask's evaluation instruction: the first of its validation annotations."""
    annotations = yaml.safe_load((conf / ANNOTATIONS_FILE).read_text())
    return {task: instructions[0] for task, instructions in annotations.items()}
