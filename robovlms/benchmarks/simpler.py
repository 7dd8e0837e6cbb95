"""SimplerEnv (Li et al. 2024) through its real package `simpler_env` and the ManiSkill2_real2sim environments under it:
Google robot and WidowX tasks, evaluated by visual matching and (Google robot) variant aggregation.

The protocol is SimplerEnv's own: the episodes its scripts run (`simpler_episodes`), each in an environment built
with the scripts' arguments and reset with their options, at 3 Hz (Google robot) or 5 Hz (WidowX), for the task's
whole step limit. Building is slow, so an environment is reused while the arguments stay the same, reset with the
episode seed a freshly built one gets. As simpler_env's evaluator does, an episode is not stopped when the task is
first solved: success is the environment's `success` at its last step (a coke can lifted and dropped again is a
failure), and the instruction is the environment's own. A policy's raw action is converted the way SimplerEnv's Octo
and OpenVLA policies convert theirs (`SimplerActionConverter`). A task's score is the mean over its variants of each
variant's success rate.

Neither package installs from a registry: the adapter imports them only when an environment is built.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

from robovlms.benchmark import (Benchmark, EpisodeRecord, EpisodeSpec, Environment, Observation, Policy, Trajectory,
                                square_image)
from robovlms.benchmarks.simpler_episodes import (TASKS, SimplerEpisode, check_task, episodes, evenly_spread,
                                                   find_episode, protocols, step_limit)
from robovlms.benchmarks.simpler_metrics import PUBLISHED_SIM_SUCCESS, published_agreement
from robovlms.errors import ConfigError, MissingDependencyError, UnknownNameError
from robovlms.sim_to_real import PublishedAgreement

INSTALL = ("SimplerEnv is not installed. Install it from its repository (neither simpler_env nor ManiSkill2_real2sim "
           "is on PyPI):\n"
           "  git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules\n"
           "  cd SimplerEnv/ManiSkill2_real2sim && pip install -e . && cd .. && pip install -e .\n"
           "(SimplerEnv's README also pins numpy<2, which pinocchio's inverse kinematics needs.) Its renderer, SAPIEN, "
           "draws with Vulkan: it needs an NVIDIA GPU and its Vulkan driver; see "
           "https://maniskill.readthedocs.io/en/latest/user_guide/getting_started/installation.html#vulkan")
ROBOTS = ("google_robot", "widowx")
CAMERAS = ("rgb_static",)  # the robot's default camera: the Google robot's overhead camera, WidowX's 3rd-view camera
ASSETS_HINT = ("Point MS2_ASSET_DIR (MS2_REAL2SIM_ASSET_DIR in later versions) at the data folder of a complete "
               "ManiSkill2_real2sim checkout (git clone --recurse-submodules).")

# A fresh environment is built with seed 2022 (ManiSkill2's BaseEnv) and simpler_env's evaluator resets it once
# without a seed, so every episode it runs draws the first number of that generator as its episode seed (it decides
# distractor placements, for one). Reusing an environment, the adapter passes that seed explicitly.
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


def proprio_state(sim: Any, robot: str) -> np.ndarray:
    """The 8-D state the Open-X stores of this robot hold (robovlms.data.lerobot_import's built-in specs): the tool
    centre point's pose in the robot base's frame and the gripper, read from the environment.

    google_robot (RT-1's fractal data): xyz, quaternion (x, y, z, w), gripper closedness (1 closed).
    widowx (Bridge): xyz, roll/pitch/yaw relative to Bridge's top-down gripper pose, a 0 pad, gripper openness.
    These follow the SimplerEnv adapters of open-pi-zero (src/agent/env_adapter/simpler.py) and GR00T
    (simpler_env/policies/gr00t/gr00t_model.py). RoboVLMs- and OpenVLA-style policies read no state.
    """
    base, tcp = sim.agent.robot.pose, sim.tcp.pose
    base_rotation = Rotation.from_quat(np.roll(base.q, -1))  # sapien quaternions are w, x, y, z
    position = base_rotation.inv().apply(np.asarray(tcp.p) - np.asarray(base.p))
    rotation = base_rotation.inv() * Rotation.from_quat(np.roll(tcp.q, -1))
    closedness = float(sim.agent.get_gripper_closedness())
    if robot == "google_robot":
        state = np.concatenate([position, rotation.as_quat(), [closedness]])
    else:
        rpy = Rotation.from_matrix(rotation.as_matrix() @ BRIDGE_TOP_DOWN.T).as_euler("xyz")
        state = np.concatenate([position, rpy, [0.0, 1.0 - closedness]])
    return state.astype(np.float32)


def check_objects_on_table(sim: Any) -> None:
    """Raise MissingDependencyError when the task's loose objects fell through the table at reset.

    ManiSkill2_real2sim does not fail when a scene's mesh is missing: the table is simply not there, objects fall
    and episodes run on. The error names the asset files the environment refers to that are missing.
    """
    if hasattr(sim, "art_obj"):  # drawer tasks: `obj` is a link of a cabinet fixed to the ground
        return
    objects = list(getattr(sim, "episode_objs", None) or [sim.obj]) + list(getattr(sim, "distractor_objs", []))
    fallen = [obj for obj in objects if obj.pose.p[2] < sim.scene_table_height - FALLEN_BELOW_TABLE_M]
    if not fallen:
        return
    where = ", ".join(f"{obj.name} at z={obj.pose.p[2]:.2f} m" for obj in fallen)
    files = _asset_files(sim, fallen)
    missing = [str(path) for path in files if not path.exists()]
    if missing:
        raise MissingDependencyError(
            f"objects fell through the table at reset ({where}; the table top is at {sim.scene_table_height} m): "
            f"ManiSkill2_real2sim's assets are incomplete. Missing: {', '.join(missing)}. {ASSETS_HINT}")
    raise MissingDependencyError(
        f"objects fell through the table at reset ({where}; the table top is at {sim.scene_table_height} m) although "
        f"the assets it uses exist: {', '.join(map(str, files))}; one of them may be damaged")


def _asset_files(sim: Any, objects: list) -> list[Path]:
    """The scene mesh, each object's collision and visual mesh, and the overlay photograph `sim` loads
    (CustomSceneEnv._load_arena_helper, CustomOtherObjectsInSceneEnv._build_actor_helper, rgb_overlay_path)."""
    files = [] if "dummy" in sim.scene_name else [Path(sim.scene_root) / "stages" / f"{sim.scene_name}.glb"]
    for obj in objects:
        model = Path(sim.asset_root) / "models" / obj.name
        visuals = [model / f"textured.{suffix}" for suffix in ("obj", "dae", "glb")]
        files += [model / "collision.obj", next((path for path in visuals if path.exists()), visuals[-1])]
    if sim.rgb_overlay_path:
        files.append(Path(sim.rgb_overlay_path))
    return files


class SimplerEnvironment(Environment):
    """simpler_env environments, one at a time: `make_env(env_name, **kwargs)` builds one (simpler_env's
    build_maniskill2_env, or a stand-in) and it is reused while episodes need the same build arguments."""

    def __init__(self, robot: str, image_size: int, make_env: Callable[..., Any],
                 image_of: Callable[[Any, dict], np.ndarray], asset_dir: Path):
        self.robot, self.image_size = robot, image_size
        self.make_env, self.image_of, self.asset_dir = make_env, image_of, Path(asset_dir)
        self.actions = SimplerActionConverter(robot)
        self.env: Any = None
        self._built_with: tuple[str, dict] | None = None
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
        env = self._environment_for(episode)
        obs, _ = env.reset(seed=EPISODE_SEED, options=episode.reset_options())
        check_objects_on_table(env.unwrapped)
        self.episode, self.episode_stats = episode, {}
        self.instruction = env.unwrapped.get_language_instruction()
        self.actions.reset()
        return self._observation(obs)

    def step(self, action: np.ndarray, observe: bool) -> tuple[Observation | None, bool]:
        """Apply one action; solved is the environment's success at the episode's last step, False before it."""
        obs, _, success, truncated, info = self.env.step(self.actions(action))
        self.episode_stats = {key: value.item() if isinstance(value, np.generic) else value
                              for key, value in info.get("episode_stats", {}).items()}
        return (self._observation(obs) if observe else None), bool(success and truncated)

    def _environment_for(self, episode: SimplerEpisode):
        built_with = (episode.env_name, episode.build_kwargs(self.asset_dir))
        if built_with != self._built_with:
            self.close()
            try:
                self.env = self.make_env(built_with[0], **built_with[1])
            except FileNotFoundError as error:
                raise MissingDependencyError(f"{error}\n{ASSETS_HINT}") from None
            self._built_with = built_with
        return self.env

    def _observation(self, obs: dict) -> Observation:
        image = square_image(np.asarray(self.image_of(self.env.unwrapped, obs)), self.image_size)
        return Observation(images={CAMERAS[0]: image}, state=proprio_state(self.env.unwrapped, self.robot),
                           instruction=self.instruction)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
        self.env, self._built_with = None, None


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

    def __init__(self, robot: str = "widowx", tasks: list[str] | tuple[str, ...] | None = None,
                 image_size: int = 224, cameras: tuple[str, ...] | list[str] = CAMERAS):
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

    def options(self) -> dict[str, Any]:
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

    def check_available(self) -> None:
        _import_simpler_env()

    def make_environment(self) -> SimplerEnvironment:
        make_env, image_of, asset_dir = _import_simpler_env()
        return SimplerEnvironment(self.robot, self.image_size, make_env, image_of, asset_dir)

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


# ---- the real packages, imported only here ------------------------------------------------------------------

def _import_simpler_env() -> tuple[Callable[..., Any], Callable[[Any, dict], np.ndarray], Path]:
    """simpler_env's environment builder and camera-image accessor, and ManiSkill2_real2sim's asset folder."""
    real2sim = importlib.util.find_spec("mani_skill2_real2sim")
    if real2sim is None or importlib.util.find_spec("simpler_env") is None:
        raise MissingDependencyError(INSTALL)
    # ManiSkill2_real2sim reads its asset folder from the environment at import (MS2_ASSET_DIR, later versions
    # MS2_REAL2SIM_ASSET_DIR), relative to the working directory when unset: default it to the checkout's data.
    data = Path(real2sim.origin).resolve().parents[1] / "data"
    if data.is_dir():
        for variable in ("MS2_ASSET_DIR", "MS2_REAL2SIM_ASSET_DIR"):
            os.environ.setdefault(variable, str(data))
    try:
        import mani_skill2_real2sim
        from simpler_env.utils.env.env_builder import build_maniskill2_env
        from simpler_env.utils.env.observation_utils import get_image_from_maniskill2_obs_dict
    except ImportError as error:
        raise MissingDependencyError(f"{INSTALL}\n(import failed: {error})") from None
    return build_maniskill2_env, get_image_from_maniskill2_obs_dict, Path(mani_skill2_real2sim.ASSET_DIR)
