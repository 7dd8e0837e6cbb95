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
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from robovlms.benchmark import (Benchmark, EpisodeRecord, EpisodeSpec, Environment, Observation, Policy, Trajectory,
                                square_image)
from robovlms.benchmarks.calvin_sequences import CHAIN_LENGTH, SUBTASKS, get_sequences, initial_condition_seed
from robovlms.errors import ConfigError, MissingDependencyError, UnknownNameError

INSTALL = ("CALVIN's simulator is not installed. Install the benchmark from its repository (it is not on PyPI):\n"
           "  git clone --recurse-submodules https://github.com/mees/calvin.git\n"
           "  cd calvin && pip install -e calvin_env/tacto && pip install -e calvin_env && pip install -e calvin_models\n"
           "(editable installs: calvin_env finds its assets relative to its source tree)")
SPLITS = ("ABC->D", "ABCD->D", "D->D")  # every split evaluates on scene D
STEPS_PER_SUBTASK = 360
NUM_CHAINS = 1000
TASKS_FILE = Path("callbacks") / "rollout" / "tasks" / "new_playtable_tasks.yaml"
ANNOTATIONS_FILE = Path("annotations") / "new_playtable_validation.yaml"
CAMERA_SIZES = {"rgb_static": 200, "rgb_gripper": 84}  # as in the dataset

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
    numbers). `calvin_conf` is the `calvin_models/conf` folder of the calvin repository (found through the
    installed `calvin_agent` package when not given); `dataset` a CALVIN split whose `validation/.hydra/
    merged_config.yaml` defines the evaluation scene, as the benchmark's own evaluation uses (without it, scene D
    is composed from calvin_env's own configuration).
    """

    name = "calvin"
    action_dim = 7  # rel_actions: xyz, euler xyz in [-1, 1], gripper -1 (close) / 1 (open)
    state_dim = 15  # robot_obs
    max_steps = STEPS_PER_SUBTASK

    def __init__(self, image_size: int = 200, cameras: tuple[str, ...] | list[str] = tuple(CAMERA_SIZES),
                 calvin_conf: str | None = None, dataset: str | None = None, use_egl: bool = False):
        for camera in cameras:
            if camera not in CAMERA_SIZES:
                raise UnknownNameError("CALVIN camera", camera, CAMERA_SIZES)
        if not 32 <= image_size <= 400:
            raise ConfigError(f"image_size {image_size} is out of range 32 to 400")
        self.image_size, self.cameras = image_size, tuple(cameras)
        self.calvin_conf, self.dataset, self.use_egl = calvin_conf, dataset, use_egl

    def options(self) -> dict[str, Any]:
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

    def check_available(self) -> None:
        _import_calvin_env()
        find_calvin_conf(self.calvin_conf)

    def make_environment(self) -> CalvinEnvironment:
        conf = find_calvin_conf(self.calvin_conf)
        while _OPEN_ENVIRONMENTS:  # two play tables in one process clash over pybullet's client
            _OPEN_ENVIRONMENTS.pop().close()
        environment = CalvinEnvironment(build_play_table(self.cameras, self.dataset, self.use_egl), load_task_oracle(conf),
                                        load_instructions(conf), self.cameras, self.image_size)
        _OPEN_ENVIRONMENTS.append(environment)
        return environment

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
    """A `calvin_env` play table (or any object with its interface), its task oracle and instructions."""

    def __init__(self, env: Any, oracle: Any, instructions: dict[str, str], cameras: tuple[str, ...],
                 image_size: int):
        self.env, self.oracle, self.instructions = env, oracle, instructions
        self.cameras, self.image_size = cameras, image_size
        self._subtask: str | None = None
        self._start_info: dict | None = None
        self._instruction = ""

    def reset(self, spec: EpisodeSpec) -> Observation:
        condition, subtasks = evaluation_chains(spec.seed + 1)[spec.seed]
        if tuple(subtasks) != tuple(spec.subtasks):
            raise ConfigError(f"chain {spec.seed} of the benchmark is {list(subtasks)}, not {list(spec.subtasks)}")
        robot_obs, scene_obs = initial_env_state(condition)
        self._instruction = ""
        return self._observation(self.env.reset(robot_obs=robot_obs, scene_obs=scene_obs))

    def begin_subtask(self, subtask: str) -> Observation:
        """Judge success from here on against the state now, as the benchmark does at each subtask's start."""
        if subtask not in self.instructions:
            raise UnknownNameError("CALVIN subtask", subtask, self.instructions)
        self._subtask, self._instruction = subtask, self.instructions[subtask]
        self._start_info = self.env.get_info()
        return self._observation(self.env.get_obs())

    def step(self, action: np.ndarray, observe: bool) -> tuple[Observation | None, bool]:
        obs, _, _, info = self.env.step(env_action(action))
        solved = bool(self.oracle.get_task_info_for_set(self._start_info, info, {self._subtask}))
        return (self._observation(obs) if observe else None), solved

    def _observation(self, obs: dict[str, Any]) -> Observation:
        images = {camera: square_image(np.asarray(obs["rgb_obs"][camera]).astype(np.uint8), self.image_size)
                  for camera in self.cameras}
        return Observation(images=images, state=np.asarray(obs["robot_obs"], dtype=np.float32),
                           instruction=self._instruction,
                           privileged_state=np.asarray(obs["scene_obs"], dtype=np.float32))

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if close is not None:
            close()


def env_action(action: np.ndarray) -> np.ndarray:
    """A policy's 7-D relative action as `calvin_env` takes it: arm clipped to [-1, 1], gripper exactly -1 or 1."""
    action = np.asarray(action, dtype=np.float64).reshape(-1)
    if action.shape != (7,):
        raise ValueError(f"CALVIN takes 7-D relative actions; got shape {action.shape}")
    return np.concatenate([np.clip(action[:6], -1.0, 1.0), [1.0 if action[6] > 0 else -1.0]])


# ---- the real packages, imported only here ------------------------------------------------------------------


def _import_calvin_env():
    try:
        import calvin_env
        import hydra  # noqa: F401 - calvin_env's dependency, used to build from its configuration
    except ImportError as error:
        raise MissingDependencyError(f"{INSTALL}\n(import failed: {error})") from None
    return calvin_env


def find_calvin_conf(calvin_conf: str | None) -> Path:
    """The calvin repository's `calvin_models/conf` folder: given, or next to the installed `calvin_agent`."""
    if calvin_conf is None:
        try:
            import calvin_agent
        except ImportError:
            raise MissingDependencyError(
                f"CALVIN's task definitions and evaluation instructions live in its repository's calvin_models/conf; "
                f"install calvin_models (below) or set benchmark option calvin_conf to that folder.\n{INSTALL}"
            ) from None
        conf = Path(calvin_agent.__file__).resolve().parents[1] / "conf"
    else:
        conf = Path(calvin_conf)
    for needed in (TASKS_FILE, ANNOTATIONS_FILE):
        if not (conf / needed).is_file():
            raise ConfigError(f"{conf / needed} is missing: calvin_conf must be the calvin repository's "
                              f"calvin_models/conf folder")
    return conf


def load_instructions(conf: Path) -> dict[str, str]:
    """Each subtask's evaluation instruction: the first of its validation annotations."""
    annotations = yaml.safe_load((conf / ANNOTATIONS_FILE).read_text())
    return {task: instructions[0] for task, instructions in annotations.items()}


def load_task_oracle(conf: Path):
    _import_calvin_env()
    import hydra
    from omegaconf import OmegaConf

    return hydra.utils.instantiate(OmegaConf.load(conf / TASKS_FILE))


def build_play_table(cameras: tuple[str, ...], dataset: str | None, use_egl: bool):
    """calvin_env's play table in scene D, headless (pybullet DIRECT), with the static and gripper cameras."""
    calvin_env = _import_calvin_env()
    import hydra
    import calvin_env.envs.play_table_env as play_table_env
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    # calvin_env logs its git commit at start-up and fails outside a git checkout (a pip install).
    play_table_env.get_git_commit_hash = lambda *args, **kwargs: "unknown"
    names = [camera.removeprefix("rgb_") for camera in cameras]
    merged = Path(dataset) / "validation" / ".hydra" / "merged_config.yaml" if dataset else None
    if merged is not None and not merged.is_file():
        warnings.warn(f"{merged} is missing; scene D is composed from calvin_env's own configuration instead")
        merged = None
    if merged is not None:
        config = OmegaConf.load(merged)
        config.cameras = {name: camera for name, camera in config.cameras.items() if name in names}
        config.env.use_egl = use_egl
    else:
        conf = Path(calvin_env.__file__).resolve().parents[1] / "conf"
        sizes = [f"cameras.{name}.{side}={CAMERA_SIZES['rgb_' + name]}" for name in names for side in ("width", "height")]
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            config = compose("config_data_collection", overrides=[
                "cameras=static_and_gripper", "scene=calvin_scene_D", "use_vr=false", f"env.use_egl={use_egl}",
                *sizes])
    return hydra.utils.instantiate(config.env, show_gui=False, use_vr=False, use_scene_info=True)
