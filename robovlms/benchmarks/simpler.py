"""SimplerEnv (Li et al. 2024) through its real package `simpler_env` and the ManiSkill2_real2sim environments under it:
Google robot and WidowX tasks, evaluated by visual matching and (Google robot) variant aggregation.

The protocol is SimplerEnv's own: the episodes its scripts run (`simpler_episodes`), each in an environment built
with the scripts' arguments and reset with their options, at 3 Hz (Google robot) or 5 Hz (WidowX), for the task's
whole step limit. Every episode gets a freshly built environment, as in SimplerEnv's scripts: a ManiSkill2_real2sim
reset keeps the robot's joint drive targets and leaves the arm where the last episode left it while the objects
settle, so a reused environment's episode can start from another scene (measured: 355 pixels of pick coke can's
first image at 224 x 224 after a 12-step episode that moved the arm), and a reset that rebuilds the scene costs what
a rebuild costs (docs/simpler.md). As simpler_env's evaluator does, an episode is not stopped when the task is first
solved: success is the environment's `success` at its last step (a coke can lifted and dropped again is a failure),
and the instruction is the environment's own. A policy's raw action is converted the
way SimplerEnv's Octo and OpenVLA policies convert theirs (`SimplerActionConverter`). A task's score is the mean over
its variants of each variant's success rate.

Neither package installs from a registry, and their dependencies (numpy<2, gymnasium<1.0) cannot share robovlms'
environment: they live in an environment of their own, whose interpreter the benchmark option `python` (default
$ROBOVLMS_SIMPLER_PYTHON) names, and the environment runs there (`robovlms.simulators.simpler_scene` behind
`robovlms.benchmarks.remote`). Without it, the adapter imports them in this process.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from robovlms.benchmark import (VAL_LOSS_SEARCH, Benchmark, EpisodeRecord, EpisodeSpec, Environment, Installation,
                                Observation, Policy, Trajectory, square_image)
from robovlms.benchmarks.simpler_episodes import (TASKS, SimplerEpisode, check_task, episodes, evenly_spread,
                                                   find_episode, protocols, step_limit)
from robovlms.benchmarks.simpler_metrics import PUBLISHED_SIM_SUCCESS, published_agreement
from robovlms.errors import ConfigError, MissingDependencyError, UnknownNameError
from robovlms.sim_to_real import PublishedAgreement
from robovlms.simulators import simpler_scene
from robovlms.simulators.simpler_scene import SimplerScene

INSTALL = ("SimplerEnv is not installed. Install it from its repository (neither simpler_env nor ManiSkill2_real2sim "
           "is on PyPI) into an environment of its own (it needs numpy<2 and gymnasium<1.0):\n"
           "  git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules\n"
           "  python3 -m venv simpler-venv && simpler-venv/bin/pip install 'numpy<2' 'gymnasium<1.0' sapien==2.2.2 "
           "'setuptools<80' 'opencv-python<4.12' 'pandas<3' 'pyarrow<=22'\n"
           "  simpler-venv/bin/pip install -e SimplerEnv/ManiSkill2_real2sim && simpler-venv/bin/pip install --no-deps "
           "-e SimplerEnv\n"
           "then set benchmark option python (or ROBOVLMS_SIMPLER_PYTHON) to simpler-venv/bin/python. Its renderer, "
           "SAPIEN, draws with Vulkan: an NVIDIA GPU and its driver, or Mesa's lavapipe on a CPU (docs/simpler.md); "
           "see "
           "https://maniskill.readthedocs.io/en/latest/user_guide/getting_started/installation.html#vulkan")
PYTHON_VARIABLE = "ROBOVLMS_SIMPLER_PYTHON"  # the interpreter of SimplerEnv's own environment, when not given
SCENE_MODULE = Path(simpler_scene.__file__)
ROBOTS = ("google_robot", "widowx")
CAMERAS = ("rgb_static",)  # the robot's default camera: the Google robot's overhead camera, WidowX's 3rd-view camera
ASSETS_HINT = ("Point MS2_ASSET_DIR (MS2_REAL2SIM_ASSET_DIR in later versions) at the data folder of a complete "
               "ManiSkill2_real2sim checkout (git clone --recurse-submodules, with git LFS).")
VULKAN_HINT = ("SAPIEN, SimplerEnv's renderer, draws with Vulkan: on a GPU machine, NVIDIA's driver with its Vulkan "
               "ICD; without a GPU, the Vulkan loader (Debian: libvulkan1) and Mesa's lavapipe from bookworm-backports "
               "with the semaphore shim, named by VK_ICD_FILENAMES and LD_PRELOAD in a wrapper script that the python "
               "option names (docs/simpler.md, Vulkan)")

# A fresh environment is built with seed 2022 (ManiSkill2's BaseEnv) and simpler_env's evaluator resets it once
# without a seed, so every episode it runs draws the first number of that generator as its episode seed (it decides
# distractor placements, for one). The adapter passes that seed explicitly.
EPISODE_SEED = int(np.random.RandomState(2022).randint(2**32))

# Objects are dropped from 0.5 m above the table at reset; one found this far below the table top fell through it.
FALLEN_BELOW_TABLE_M = 0.5
# Bridge's end-effector rotation is relative to a top-down gripper pose (bridge_data_robot's widowx_controller).
BRIDGE_TOP_DOWN = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])


def euler_to_axis_angle(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """transforms3d.euler.euler2axangle(roll, pitch, yaw) (axes 'sxyz': static x, y, z) as one vector, axis * angle;
    as there, the angle is 2 acos(w) of euler2quat's quaternion."""
    (cr, sr), (cp, sp), (cy, sy) = ((np.cos(a / 2), np.sin(a / 2)) for a in (roll, pitch, yaw))
    w = cp * cr * cy + sp * sr * sy
    xyz = np.array([cp * sr * cy - sp * cr * sy, cp * sr * sy + sp * cr * cy, cp * cr * sy - sp * sr * cy])
    length = np.linalg.norm(xyz)
    if length < 3 * np.finfo(float).eps:
        return np.zeros(3)
    return xyz / length * 2 * np.arccos(np.clip(w, -1.0, 1.0))


class SimplerActionConverter:
    """A policy's raw 7-D action -> the 7-D action simpler_env steps with (xyz, axis-angle rotation, gripper), as
    SimplerEnv's Octo and OpenVLA policies convert theirs (simpler_env/policies/{octo/octo_model,openvla/
    openvla_model}.py, action_scale 1 as every script runs them).

    The raw action is in the units of robovlms' Open-X stores: xyz delta, roll/pitch/yaw delta, gripper +1 open /
    -1 closed, i.e. those policies' open_gripper (1 open, 0 closed) = (gripper + 1) / 2. WidowX's gripper is then
    binarised: +1 (open) when open_gripper > 0.5, else -1. The Google robot's gripper is driven by changes: the
    previous step's open_gripper minus this one's (+1 closes), 0 at an episode's first step, and a change larger than
    0.5 is repeated for 15 steps (the sticky gripper) before changes are read again. Call `reset` at each episode.
    """

    STICKY_GRIPPER_STEPS = 15  # sticky_gripper_num_repeat of the google_robot policy setup

    def __init__(self, robot: str):
        if robot not in ROBOTS:
            raise UnknownNameError("SimplerEnv robot", robot, ROBOTS)
        self.robot = robot
        self.reset()

    def reset(self) -> None:
        self._previous_open: float | None = None
        self._sticky_action = 0.0
        self._sticky_steps_left = 0

    def __call__(self, action: np.ndarray) -> np.ndarray:
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (7,):
            raise ValueError(f"SimplerEnv takes 7-D actions (xyz, roll/pitch/yaw, gripper); got shape {action.shape}")
        open_gripper = (action[6] + 1.0) / 2.0
        gripper = 2.0 * (open_gripper > 0.5) - 1.0 if self.robot == "widowx" else self._google_gripper(open_gripper)
        return np.concatenate([action[:3], euler_to_axis_angle(*action[3:6]), [gripper]])

    def _google_gripper(self, open_gripper: float) -> float:
        change = 0.0 if self._previous_open is None else self._previous_open - open_gripper
        self._previous_open = open_gripper
        if abs(change) > 0.5 and self._sticky_steps_left == 0:
            self._sticky_action, self._sticky_steps_left = change, self.STICKY_GRIPPER_STEPS
        if self._sticky_steps_left > 0:
            self._sticky_steps_left -= 1
            return self._sticky_action
        return change


def proprio_state(poses: dict, robot: str) -> np.ndarray:
    """The 8-D state the Open-X stores of this robot hold (robovlms.data.lerobot_import's built-in specs): the tool
    centre point's pose in the robot base's frame and the gripper, from `simpler_scene.robot_poses`.

    google_robot (RT-1's fractal data): xyz, quaternion (x, y, z, w), gripper closedness (1 closed).
    widowx (Bridge): xyz, roll/pitch/yaw relative to Bridge's top-down gripper pose, a 0 pad, gripper openness.
    These follow the SimplerEnv adapters of open-pi-zero (src/agent/env_adapter/simpler.py) and GR00T
    (simpler_env/policies/gr00t/gr00t_model.py). RoboVLMs- and OpenVLA-style policies read no state.
    """
    base_rotation = Rotation.from_quat(np.roll(poses["base_q"], -1))  # sapien quaternions are w, x, y, z
    position = base_rotation.inv().apply(np.asarray(poses["tcp_p"]) - np.asarray(poses["base_p"]))
    rotation = base_rotation.inv() * Rotation.from_quat(np.roll(poses["tcp_q"], -1))
    closedness = float(poses["closedness"])
    if robot == "google_robot":
        state = np.concatenate([position, rotation.as_quat(), [closedness]])
    else:
        rpy = Rotation.from_matrix(rotation.as_matrix() @ BRIDGE_TOP_DOWN.T).as_euler("xyz")
        state = np.concatenate([position, rpy, [0.0, 1.0 - closedness]])
    return state.astype(np.float32)


def check_scene(scene: dict) -> None:
    """Raise MissingDependencyError when a file the scene was built from is missing, or when its loose objects fell
    through the table at reset (`scene`: `simpler_scene.scene_description`).

    ManiSkill2_real2sim does not fail when a mesh is missing: without the stage the table is simply not there and
    objects fall; without an object's visual mesh the object is invisible; episodes run on either way.
    """
    missing = [" or ".join(alternatives) for alternatives in scene["assets"]
               if not any(Path(path).exists() for path in alternatives)]
    if missing:
        raise MissingDependencyError(f"ManiSkill2_real2sim's assets are incomplete. Missing: {', '.join(missing)}. "
                                     f"{ASSETS_HINT}")
    table = scene["table_height"]
    fallen = {name: z for name, z in scene["objects"].items() if z < table - FALLEN_BELOW_TABLE_M}
    if fallen:
        where = ", ".join(f"{name} at z={z:.2f} m" for name, z in fallen.items())
        files = ", ".join(path for alternatives in scene["assets"] for path in alternatives if Path(path).exists())
        raise MissingDependencyError(
            f"objects fell through the table at reset ({where}; the table top is at {table} m) although the assets it "
            f"uses exist: {files}; one of them may be damaged")


class SimplerEnvironment(Environment):
    """simpler_env environments, one at a time, through a `SimplerScene` (in this process, or held by the simulator
    `process`): each episode builds one with its build arguments (in one process only the first build starts the
    renderer: later ones take 1-2 s on a CPU)."""

    def __init__(self, robot: str, image_size: int, scene: SimplerScene, asset_dir: Path, process: Any = None):
        self.robot, self.image_size = robot, image_size
        self.scene, self.asset_dir, self.process = scene, Path(asset_dir), process
        self.actions = SimplerActionConverter(robot)
        self.episode: SimplerEpisode | None = None
        self.instruction = ""
        self.episode_stats: dict[str, Any] = {}

    @property
    def step_limit(self) -> int:
        return self.episode.max_episode_steps

    def reset(self, spec: EpisodeSpec) -> Observation:
        episode = find_episode(spec.task, spec.scene, spec.seed)
        if TASKS[episode.task] != self.robot:
            raise ConfigError(f"{episode.task} is a {TASKS[episode.task]} task; this environment drives {self.robot}")
        self._build(episode)
        state = self.scene.reset(EPISODE_SEED, episode.reset_options())
        check_scene(state["scene"])
        self.episode, self.episode_stats = episode, {}
        self.instruction = state["instruction"]
        self.actions.reset()
        return self._observation(state)

    def step(self, action: np.ndarray, observe: bool) -> tuple[Observation | None, bool]:
        """Apply one action; solved is the environment's success at the episode's last step, False before it."""
        state = self.scene.step(self.actions(action), observe)
        self.episode_stats = state["episode_stats"]
        return (self._observation(state) if observe else None), state["success"] and state["truncated"]

    def _build(self, episode: SimplerEpisode) -> None:
        try:
            self.scene.build(episode.env_name, episode.build_kwargs(self.asset_dir))
        except FileNotFoundError as error:
            raise MissingDependencyError(f"ManiSkill2_real2sim's assets are incomplete: {error}\n{ASSETS_HINT}"
                                         ) from None
        except RuntimeError as error:
            if "rendering device" not in str(error):
                raise
            raise MissingDependencyError(f"SAPIEN found no Vulkan device it can render with ({error}). "
                                         f"{VULKAN_HINT}") from None

    def _observation(self, state: dict) -> Observation:
        image = square_image(np.asarray(state["image"]), self.image_size)
        return Observation(images={CAMERAS[0]: image}, state=proprio_state(state["robot"], self.robot),
                           instruction=self.instruction)

    def close(self) -> None:
        """Close the environment (and its simulator process); later calls do nothing."""
        if self.scene is not None:
            scene, self.scene = self.scene, None
            try:
                if self.process is None or not self.process.dead:  # a dead simulator holds nothing to close
                    scene.close()
            finally:
                if self.process is not None:
                    self.process.close()


class SimplerBenchmark(Benchmark):
    """SimplerEnv's tasks of one robot. Task names are simpler_env's; splits are its protocols, visual_matching and
    (Google robot only) variant_aggregation.

    `evaluation_episodes(split, n)` gives every published episode of each task when n is at least their number (300
    per task for pick coke can by visual matching, 24 per WidowX task, ...) and otherwise n of them spread evenly over
    the task's variants (`simpler_episodes.evenly_spread`). The observation is the robot's default camera resized to
    a square `image_size` (bilinear) and the 8-D state of `proprio_state` (the tool's pose in the robot base's frame
    and the gripper, as robovlms' Open-X stores hold it; RoboVLMs- and OpenVLA-style policies read no state).
    `max_steps` is the longest step limit of the tasks; each episode runs its own task's (80 pick coke can and move
    near, 113 drawers, 60 WidowX, 120 eggplant in basket).
    """

    name = "simpler"
    action_dim = 7  # xyz, roll/pitch/yaw deltas, gripper +1 open / -1 closed
    state_dim = 8

    def __init__(self, robot: str | None = None, tasks: str | list[str] | tuple[str, ...] | None = None,
                 image_size: int = 224, cameras: tuple[str, ...] | list[str] = CAMERAS, python: str | None = None):
        tasks = [tasks] if isinstance(tasks, str) else tasks
        robot = robot or robot_of(tasks)
        if robot not in ROBOTS:
            raise UnknownNameError("SimplerEnv robot", robot, ROBOTS)
        own = [task for task, owner in TASKS.items() if owner == robot]
        for task in tasks or own:
            check_task(task)
            if TASKS[task] != robot:
                raise ConfigError(f"{task} is a {TASKS[task]} task, not a {robot} one: choose robot="
                                  f"{TASKS[task]!r} or tasks among {', '.join(own)}")
        for camera in cameras:
            if camera not in CAMERAS:
                raise UnknownNameError("SimplerEnv camera", camera, CAMERAS)
        if not 32 <= image_size <= 512:
            raise ConfigError(f"image_size {image_size} is out of range 32 to 512")
        self.robot, self._tasks = robot, list(tasks or own)
        self.image_size, self.cameras = image_size, tuple(cameras)
        self.max_steps = max(step_limit(task) for task in self._tasks)
        self.python = python or os.environ.get(PYTHON_VARIABLE) or None

    def options(self) -> dict[str, Any]:
        """Without `python`: where the simulator runs is not what it is, and shards of one evaluation may run on
        machines whose interpreters live elsewhere."""
        return {"robot": self.robot, "tasks": list(self._tasks), "image_size": self.image_size,
                "cameras": list(self.cameras)}

    def tasks(self) -> list[str]:
        return list(self._tasks)

    def splits(self) -> list[str]:
        return list(protocols(self.robot))

    def evaluation_episodes(self, split: str, episodes_per_task: int) -> list[EpisodeSpec]:
        """A spec's seed is the episode's index in its task's list for the protocol; its scene names the protocol
        and the variant."""
        if episodes_per_task < 1:
            raise ConfigError(f"episodes_per_task must be at least 1 (got {episodes_per_task})")
        specs = []
        for task in self._tasks:
            listed = episodes(task, split)
            specs += [EpisodeSpec(task=task, scene=listed[index].scene, instruction=listed[index].instruction,
                                  seed=index) for index in evenly_spread(listed, episodes_per_task)]
        return specs

    def validation_episodes(self, split: str, episodes_per_task: int) -> list[EpisodeSpec]:
        """None: every episode SimplerEnv defines (its scripts' object placements, robot poses and overlays) is one
        of its published evaluation, and its policies train on real-robot data, not on simulated scenes."""
        raise ConfigError(
            "SimplerEnv defines no validation episodes: every episode of visual matching and variant aggregation is "
            "part of its published evaluation, so choosing settings on any of them chooses on the test. Choose on "
            f"the validation loss of held-out training windows ({VAL_LOSS_SEARCH}), or on another benchmark "
            "(docs/simpler.md)")

    @classmethod
    def published_agreement(cls, split: str, tasks: Sequence[str]) -> PublishedAgreement | None:
        """SimplerEnv's published agreement for its reference policies (simpler_metrics) on the tasks it publishes."""
        if split not in PUBLISHED_SIM_SUCCESS:
            return None
        table = published_agreement(split, tasks)
        if table.empty:
            return None
        published = [task for task in table.task if task in PUBLISHED_SIM_SUCCESS[split]]
        policies = list(dict.fromkeys(policy for task in published for policy in PUBLISHED_SIM_SUCCESS[split][task]))
        return PublishedAgreement(table, policies, "SimplerEnv")

    def installation(self) -> Installation:
        from robovlms.benchmarks.remote import locate_modules

        python, modules = locate_modules(self.python, ["simpler_env", "mani_skill2_real2sim", "sapien"])
        return Installation(python, modules, INSTALL, own_environment=self.python is not None)

    def make_environment(self) -> SimplerEnvironment:
        if self.python is None:
            self.check_available()
            with _simpler_errors():
                scene = simpler_scene.open_simpler()
            return SimplerEnvironment(self.robot, self.image_size, scene, Path(scene.asset_dir()))
        from robovlms.benchmarks.remote import SimulatorProcess

        process = SimulatorProcess(self.python)
        try:
            with _simpler_errors():
                scene = process.call(SCENE_MODULE, "open_simpler")
                asset_dir = Path(scene.asset_dir())
        except BaseException:
            process.close()
            raise
        return SimplerEnvironment(self.robot, self.image_size, scene, asset_dir, process)

    def try_one_step(self) -> None:
        """The first episode of each robot's first task and one zero action, in one simulator: every robot's
        stage, objects and renderer."""
        environment = self.make_environment()
        try:
            for robot in ROBOTS:
                robots_tasks = SimplerBenchmark(robot=robot, image_size=self.image_size)
                driver = SimplerEnvironment(robot, self.image_size, environment.scene, environment.asset_dir)
                driver.reset(robots_tasks.evaluation_episodes(robots_tasks.splits()[0], 1)[0])
                driver.step(np.zeros(self.action_dim, dtype=np.float32), observe=True)
        finally:
            environment.close()

    def run_episode(self, environment: SimplerEnvironment, spec: EpisodeSpec, policy: Policy,
                    trajectory: Trajectory | None = None, on_frame: Any = None) -> EpisodeRecord:
        """One episode for its task's whole step limit; the policy is told the environment's instruction."""
        started = time.perf_counter()
        observation = environment.reset(spec)
        policy.reset(dataclasses.replace(spec, instruction=observation.instruction))
        if on_frame is not None:
            on_frame(observation)
        success, steps, _ = self.act_until_solved(environment, policy, observation, trajectory, on_frame,
                                                  max_steps=environment.step_limit)
        return EpisodeRecord(task=spec.task, scene=spec.scene, instruction=observation.instruction, seed=spec.seed,
                             success=success, steps=steps, seconds=time.perf_counter() - started,
                             extra={"episode_stats": environment.episode_stats})

    def score(self, records: list[EpisodeRecord]) -> dict[str, float]:
        """Per task, the mean over its variants (scenes) of each variant's success rate, as SimplerEnv aggregates
        both protocols; `success` is the mean over tasks. WidowX tasks also get `grasp/<task>`, SimplerEnv's partial
        success: the source object was grasped at some step."""
        by_task: dict[str, list[EpisodeRecord]] = {}
        for record in records:
            by_task.setdefault(record.task, []).append(record)
        scores = {f"success/{task}": _mean_over_variants(by_task[task], lambda r: r.success)
                  for task in sorted(by_task)}
        for task in sorted(by_task):
            if all("is_src_obj_grasped" in r.extra.get("episode_stats", {}) for r in by_task[task]):
                scores[f"grasp/{task}"] = _mean_over_variants(
                    by_task[task], lambda r: r.extra["episode_stats"]["is_src_obj_grasped"])
        rates = [scores[f"success/{task}"] for task in by_task]
        return {"success": float(np.mean(rates)) if rates else float("nan"), **scores}


def _mean_over_variants(records: list[EpisodeRecord], value: Callable[[EpisodeRecord], bool]) -> float:
    variants: dict[str, list[bool]] = {}
    for record in records:
        variants.setdefault(record.scene, []).append(bool(value(record)))
    return float(np.mean([np.mean(outcomes) for outcomes in variants.values()]))


def robot_of(tasks: Sequence[str] | None) -> str:
    """The robot whose tasks `tasks` are (WidowX when none are given)."""
    if not tasks:
        return "widowx"
    for task in tasks:
        check_task(task)
    robots = sorted({TASKS[task] for task in tasks})
    if len(robots) > 1:
        raise ConfigError(f"tasks {', '.join(tasks)} are of two robots ({' and '.join(robots)}); a SimplerEnv "
                          f"benchmark drives one: evaluate each robot's tasks separately")
    return robots[0]


@contextmanager
def _simpler_errors():
    """Turns what `simpler_scene` raises where SimplerEnv is not installed (here or in a simulator process) into a
    MissingDependencyError."""
    try:
        yield
    except MissingDependencyError:
        raise
    except ImportError as error:
        if "libvulkan" in str(error):
            raise MissingDependencyError(f"SAPIEN cannot load the Vulkan loader ({error}). {VULKAN_HINT}") from None
        raise MissingDependencyError(f"{INSTALL}\n(import failed: {error})") from None
