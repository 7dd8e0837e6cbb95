"""A stand-in for simpler_env: its build_maniskill2_env and get_image_from_maniskill2_obs_dict over a toy environment
with the interface of a ManiSkill2_real2sim environment under gymnasium, as far as the SimplerEnv adapter uses it.

The toy task: push the task's object at least 5 cm along +x (the action's first component, in metres); success is
judged at every step, so pushing it back undoes it. Objects rest on the table after reset, or, built with
`table_missing`, lie far below it, as when a scene's mesh is missing. At reset the environment writes the asset files
its scene refers to (the stage, its objects' meshes, the overlay), as in a complete checkout, except those named in
`missing` (paths relative to the asset folder); a missing collision mesh fails the build, as ManiSkill2_real2sim's
asset check does, without naming it. Like ManiSkill2_real2sim's, a reset does not undo everything: once the arm has
moved, every later image differs from a fresh environment's (in a corner here). Imports only numpy, so a
simulator server can load it too.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CAMERA_SHAPES = {"overhead_camera": (512, 640), "3rd_view_camera": (480, 640)}  # the robots' default cameras
CAMERA_FILL = {"overhead_camera": 90, "3rd_view_camera": 170}
PUSH_TO_SUCCEED_M = 0.05
TABLE_HEIGHT_M = 0.87


@dataclass
class Pose:  # sapien.Pose: position and quaternion (w, x, y, z)
    p: np.ndarray
    q: np.ndarray = field(default_factory=lambda: np.array([1.0, 0.0, 0.0, 0.0]))


@dataclass
class Actor:
    name: str
    pose: Pose


class Agent:
    def __init__(self):
        self.robot = Actor("robot", Pose(np.array([0.35, 0.20, 0.079]), np.array([0.0, 0.0, 0.0, 1.0])))
        self.closedness = 0.0

    def get_gripper_closedness(self) -> float:
        return self.closedness


class StandInEnv:
    """gym.make(env_name, **kwargs) of ManiSkill2_real2sim, reduced: reset(seed, options) -> (obs, info),
    step(action) -> (obs, reward, terminated, truncated, info) with terminated = info["success"] and truncated at
    max_episode_steps (gymnasium's TimeLimit), get_language_instruction(), close(), and the attributes the adapter
    reads: robot_uid, scene_name, scene_root, asset_root, scene_table_height, rgb_overlay_path, agent, tcp and the
    task's objects (`obj`, `episode_objs`, or a drawer `obj` of the cabinet `art_obj`)."""

    def __init__(self, env_name: str, asset_dir: Path, table_missing: bool, missing: tuple[str, ...] = (), **kwargs):
        self.unwrapped = self
        self.env_name, self.build_kwargs = env_name, kwargs
        self.robot_uid, self.scene_name = kwargs["robot"], kwargs["scene_name"]
        self.max_episode_steps, self.rgb_overlay_path = kwargs["max_episode_steps"], kwargs["rgb_overlay_path"]
        self.scene_root, self.asset_root = asset_dir / "hab2_bench_assets", asset_dir / "custom"
        self.scene_table_height = TABLE_HEIGHT_M
        self.asset_dir, self.table_missing, self.missing = Path(asset_dir), table_missing, set(missing)
        for path in sorted(self.missing):
            if path.endswith("collision.obj"):  # ManiSkill2_real2sim's _check_assets, word for word
                (self.asset_dir / path).parent.mkdir(parents=True, exist_ok=True)
                raise FileNotFoundError("convex.obj has been renamed to collision.obj. ")
        self.agent = Agent()
        base = self.agent.robot.pose  # half a turn about z; the tool 10 cm behind it in the world, 20 cm up
        self.tcp = Actor("tcp", Pose(base.p + [-0.1, 0.0, 0.2], np.array([0.0, -np.sqrt(0.5), 0.0, np.sqrt(0.5)])))
        self.resets, self.actions, self.closed = [], [], False
        self.pushed, self.steps, self.instruction = 0.0, 0, ""
        self.arm_moved = False  # kept by reset, as ManiSkill2_real2sim keeps the arm's drive targets

    def reset(self, seed=None, options=None):
        self.resets.append({"seed": seed, "options": options})
        height = self.scene_table_height + (-4.0 if self.table_missing else 0.03)
        if "Drawer" in self.env_name:
            self.art_obj, self.obj = "cabinet", Actor("top_drawer", Pose(np.array([-0.3, 0.0, 0.5])))
            self.instruction = "open top drawer"
        elif "GraspSingle" in self.env_name:
            self.obj = Actor("opened_coke_can", Pose(np.array([-0.35, -0.02, height])))
            self.distractor_objs = []
            self.instruction = "pick coke can"
        else:
            self.episode_objs = [Actor("eggplant", Pose(np.array([-0.1, 0.2, height]))),
                                 Actor("sink_target", Pose(np.array([-0.12, 0.03, height])))]
            self.instruction = f"move object {options['obj_init_options'].get('episode_id')} near the other"
        self.pushed, self.steps = 0.0, 0
        self._write_assets()
        return self._obs(), {}

    def _write_assets(self) -> None:
        models = [] if hasattr(self, "art_obj") else [self.obj] if hasattr(self, "obj") else self.episode_objs
        files = [self.scene_root / "stages" / f"{self.scene_name}.glb"]
        files += [Path(self.rgb_overlay_path)] if self.rgb_overlay_path else []
        for obj in models:
            files += [self.asset_root / "models" / obj.name / name for name in ("collision.obj", "textured.dae")]
        for path in files:
            if str(path.relative_to(self.asset_dir)) not in self.missing:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()

    def step(self, action):
        assert np.asarray(action).shape == (7,)
        self.actions.append(np.array(action))
        self.arm_moved = self.arm_moved or bool(np.any(np.asarray(action[:6]) != 0))
        self.pushed += action[0]
        self.steps += 1
        success = self.pushed >= PUSH_TO_SUCCEED_M - 1e-9
        info = {"success": success, "episode_stats": {"is_src_obj_grasped": np.bool_(self.pushed > 0)}}
        return self._obs(), float(success), success, self.steps >= self.max_episode_steps, info

    def get_language_instruction(self) -> str:
        return self.instruction

    def close(self) -> None:
        self.closed = True

    def _obs(self) -> dict:
        camera = "overhead_camera" if "google_robot" in self.robot_uid else "3rd_view_camera"
        image = np.full((*CAMERA_SHAPES[camera], 3), CAMERA_FILL[camera], np.uint8)
        if self.arm_moved:
            image[:64, :64] = 0
        return {"agent": {"qpos": np.zeros(11 if "google_robot" in self.robot_uid else 8)}, "extra": {},
                "image": {camera: {"rgb": image, "depth": np.zeros(CAMERA_SHAPES[camera])}}}


class StandInSimulator:
    """build_maniskill2_env over StandInEnv; keeps every environment it built."""

    def __init__(self, asset_dir: Path, table_missing: bool = False, missing: tuple[str, ...] = ()):
        self.asset_dir, self.table_missing, self.missing = Path(asset_dir), table_missing, tuple(missing)
        self.built: list[StandInEnv] = []

    def build(self, env_name: str, **kwargs) -> StandInEnv:
        env = StandInEnv(env_name, self.asset_dir, self.table_missing, self.missing, **kwargs)
        self.built.append(env)
        return env


def get_image_from_maniskill2_obs_dict(env, obs, camera_name=None):
    """simpler_env.utils.env.observation_utils' accessor: the robot's default camera unless one is named."""
    if camera_name is None:
        camera_name = "overhead_camera" if "google_robot" in env.robot_uid else "3rd_view_camera"
    return obs["image"][camera_name]["rgb"]


def stand_in_scene(scene_module: str, asset_dir: str, **simulator_options):
    """A SimplerScene over a StandInSimulator, with SimplerScene loaded from its file (`scene_module`), as a simulator
    server in an interpreter without robovlms builds one."""
    spec = importlib.util.spec_from_file_location("stand_in_simpler_scene", scene_module)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    simulator = StandInSimulator(Path(asset_dir), **simulator_options)
    return module.SimplerScene(simulator.build, get_image_from_maniskill2_obs_dict, str(asset_dir))
