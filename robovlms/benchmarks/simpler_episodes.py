"""SimplerEnv's evaluation episodes: for each task and protocol, the episodes its published scripts run.

SimplerEnv evaluates a policy two ways. Visual matching overlays a real photograph of the evaluation scene behind the
simulated robot and objects and repaints the robot (four URDF versions); variant aggregation runs the plain
simulation under variants of background, lighting, distractors and table texture. Either way a task's score is the
mean over its variants of each variant's success rate (tools/calc_metrics_evaluation_videos.py). WidowX tasks are
evaluated by visual matching only.

Sources, all in simpler-env/SimplerEnv: the episodes of scripts/pick_coke_can_{visual_matching,variant_agg}.sh,
scripts/move_near_{visual_matching,variant_agg}.sh, scripts/drawer_{visual_matching,variant_agg}.sh and
scripts/bridge.sh; the variants a score averages from tools/calc_metrics_evaluation_videos.py, which leaves out the
camera-orientation variants the scripts also run (so does this list); how an episode becomes build arguments and
reset options from simpler_env/evaluation/argparse.py and maniskill2_evaluator.py.

A task's episodes are listed variant by variant, and in each variant in the order the scripts run them; an episode's
index in its list is the `seed` of its EpisodeSpec, its `scene` names the protocol and the variant.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robovlms.errors import ConfigError, UnknownNameError

PROTOCOLS = ("visual_matching", "variant_aggregation")

# Per robot: control and simulation rates (Hz) and the arm+gripper controller, as every script and
# simpler_env/utils/env/env_builder.py's get_robot_control_mode set them.
CONTROL = {
    "google_robot": (3, 513, "arm_pd_ee_delta_pose_align_interpolate_by_planner_gripper_pd_joint_target_delta_pos"
                             "_interpolate_by_planner"),
    "widowx": (5, 500, "arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos"),
}

TASKS = {  # our task name (simpler_env.ENVIRONMENTS) -> robot
    "google_robot_pick_coke_can": "google_robot",
    "google_robot_move_near": "google_robot",
    "google_robot_open_drawer": "google_robot",
    "google_robot_close_drawer": "google_robot",
    "widowx_spoon_on_towel": "widowx",
    "widowx_carrot_on_plate": "widowx",
    "widowx_stack_cube": "widowx",
    "widowx_put_eggplant_in_basket": "widowx",
}

# The robot's repainted URDFs of visual matching; None is its own URDF.
URDF_VERSIONS = (None, "recolor_tabletop_visual_matching_1", "recolor_tabletop_visual_matching_2",
                 "recolor_cabinet_visual_matching_1")


@dataclass(frozen=True)
class SimplerEpisode:
    """One evaluation episode: the environment simpler_env builds for it and the options it resets it with."""

    task: str
    protocol: str
    variant: str
    env_name: str  # a ManiSkill2_real2sim environment id
    scene_name: str
    robot: str  # a ManiSkill2_real2sim robot uid
    max_episode_steps: int
    robot_init_xy: tuple[float, float]
    robot_init_yaw: float
    obj_init_xy: tuple[float, float] | None = None  # obj_variation_mode "xy" ...
    obj_episode_id: int | None = None  # ... or "episode"
    rgb_overlay: str | None = None  # a real photograph under ManiSkill2_real2sim's data/real_inpainting
    env_kwargs: tuple[tuple[str, Any], ...] = ()  # the script's --additional-env-build-kwargs, in order
    instruction: str = ""  # when the task's instruction is fixed; the environment's own is used either way

    @property
    def scene(self) -> str:
        return f"{self.protocol}:{self.variant}"

    def build_kwargs(self, asset_dir: Path) -> dict[str, Any]:
        """Keyword arguments of simpler_env's build_maniskill2_env(env_name, ...), as its evaluator passes them."""
        control_freq, sim_freq, control_mode = CONTROL[TASKS[self.task]]
        overlay = str(asset_dir / "real_inpainting" / self.rgb_overlay) if self.rgb_overlay else None
        return {**dict(self.env_kwargs), "obs_mode": "rgbd", "robot": self.robot, "sim_freq": sim_freq,
                "control_mode": control_mode, "control_freq": control_freq,
                "max_episode_steps": self.max_episode_steps, "scene_name": self.scene_name,
                "camera_cfgs": {"add_segmentation": True}, "rgb_overlay_path": overlay}

    def reset_options(self) -> dict[str, Any]:
        """The options of env.reset, as simpler_env's evaluator builds them."""
        objects = ({"init_xy": np.array(self.obj_init_xy)} if self.obj_init_xy is not None
                   else {"episode_id": self.obj_episode_id})
        return {"robot_init_options": {"init_xy": np.array(self.robot_init_xy),
                                       "init_rot_quat": robot_init_quat(self.robot_init_yaw)},
                "obj_init_options": objects}


def robot_init_quat(yaw: float) -> np.ndarray:
    """The robot base's orientation (wxyz): the scripts' --robot-init-rot-quat-center 0 0 0 1 (half a turn about z)
    turned by `yaw`, i.e. Pose(q=euler2quat(0, 0, yaw)) * Pose(q=[0, 0, 0, 1]) as argparse.py composes it."""
    return np.array([-np.sin(yaw / 2), 0.0, 0.0, np.cos(yaw / 2)])


def _grid(start: float, stop: float, count: int) -> list[float]:
    """argparse.py's parse_range_tuple: --...-range START STOP COUNT."""
    return [float(value) for value in np.linspace(start, stop, count)]


# ---- Google robot: pick coke can --------------------------------------------------------------------------------

COKE_CAN_ORIENTATIONS = {"horizontal": "lr_switch", "vertical": "laid_vertically", "standing": "upright"}
COKE_CAN_OBJECT_XYS = [(x, y) for x in _grid(-0.35, -0.12, 5) for y in _grid(-0.02, 0.42, 5)]
COKE_CAN_VARIANTS = {  # variant aggregation: name -> (env, scene, extra build kwargs)
    "base": ("GraspSingleOpenedCokeCanInScene-v0", "google_pick_coke_can_1_v4", ()),
    "alt_background": ("GraspSingleOpenedCokeCanInScene-v0", "google_pick_coke_can_1_v4_alt_background", ()),
    "alt_background_2": ("GraspSingleOpenedCokeCanInScene-v0", "google_pick_coke_can_1_v4_alt_background_2", ()),
    "slightly_darker_lighting": ("GraspSingleOpenedCokeCanInScene-v0", "google_pick_coke_can_1_v4",
                                 (("slightly_darker_lighting", True),)),
    "slightly_brighter_lighting": ("GraspSingleOpenedCokeCanInScene-v0", "google_pick_coke_can_1_v4",
                                   (("slightly_brighter_lighting", True),)),
    "distractors": ("GraspSingleOpenedCokeCanDistractorInScene-v0", "google_pick_coke_can_1_v4", ()),
    "distractors_more": ("GraspSingleOpenedCokeCanDistractorInScene-v0", "google_pick_coke_can_1_v4",
                         (("distractor_config", "more"),)),
    "table_cabinet1": ("GraspSingleOpenedCokeCanInScene-v0", "Baked_sc1_staging_objaverse_cabinet1_h870", ()),
    "table_cabinet2": ("GraspSingleOpenedCokeCanInScene-v0", "Baked_sc1_staging_objaverse_cabinet2_h870", ()),
}


def _pick_coke_can(protocol: str) -> list[SimplerEpisode]:
    if protocol == "visual_matching":
        variants = [(f"{orientation}+urdf_{urdf}", "GraspSingleOpenedCokeCanInScene-v0", "google_pick_coke_can_1_v4",
                     ((flag, True), ("urdf_version", urdf)), "google_coke_can_real_eval_1.png")
                    for orientation, flag in COKE_CAN_ORIENTATIONS.items() for urdf in URDF_VERSIONS]
    else:
        variants = [(f"{orientation}+{name}", env_name, scene, ((flag, True), *kwargs), None)
                    for orientation, flag in COKE_CAN_ORIENTATIONS.items()
                    for name, (env_name, scene, kwargs) in COKE_CAN_VARIANTS.items()]
    return [SimplerEpisode("google_robot_pick_coke_can", protocol, label, env_name, scene, "google_robot_static", 80,
                           (0.35, 0.20), 0.0, obj_init_xy=xy, rgb_overlay=overlay, env_kwargs=kwargs,
                           instruction="pick coke can")
            for label, env_name, scene, kwargs, overlay in variants for xy in COKE_CAN_OBJECT_XYS]


# ---- Google robot: move near ------------------------------------------------------------------------------------

MOVE_NEAR_EPISODES = 60  # MoveNearGoogleInSceneEnv: 5 object triplets x 6 source/target pairs x 2 layouts
MOVE_NEAR_VARIANTS = {  # variant aggregation: name -> (scene, extra build kwargs)
    "base": ("google_pick_coke_can_1_v4", ()),
    "no_distractor": ("google_pick_coke_can_1_v4", (("no_distractor", True),)),
    "alt_background": ("google_pick_coke_can_1_v4_alt_background", ()),
    "alt_background_2": ("google_pick_coke_can_1_v4_alt_background_2", ()),
    "slightly_darker_lighting": ("google_pick_coke_can_1_v4", (("slightly_darker_lighting", True),)),
    "slightly_brighter_lighting": ("google_pick_coke_can_1_v4", (("slightly_brighter_lighting", True),)),
    "table_cabinet1": ("Baked_sc1_staging_objaverse_cabinet1_h870", ()),
    "table_cabinet2": ("Baked_sc1_staging_objaverse_cabinet2_h870", ()),
}


def _move_near(protocol: str) -> list[SimplerEpisode]:
    if protocol == "visual_matching":
        variants = [(f"urdf_{urdf}", "MoveNearGoogleBakedTexInScene-v0", "google_pick_coke_can_1_v4",
                     (("urdf_version", urdf),), "google_move_near_real_eval_1.png") for urdf in URDF_VERSIONS]
    else:
        variants = [(name, "MoveNearGoogleInScene-v0", scene, kwargs, None)
                    for name, (scene, kwargs) in MOVE_NEAR_VARIANTS.items()]
    return [SimplerEpisode("google_robot_move_near", protocol, label, env_name, scene, "google_robot_static", 80,
                           (0.35, 0.21), -0.09, obj_episode_id=episode_id, rgb_overlay=overlay, env_kwargs=kwargs)
            for label, env_name, scene, kwargs, overlay in variants for episode_id in range(MOVE_NEAR_EPISODES)]


# ---- Google robot: open / close drawer --------------------------------------------------------------------------

DRAWERS = ("top", "middle", "bottom")
# Visual matching: the robot placements of the real evaluation, each with its photograph open_drawer_<name>.png
# (name, robot x, robot y, robot yaw).
DRAWER_PLACEMENTS = (("a0", 0.644, -0.179, -0.03), ("a1", 0.765, -0.182, -0.02), ("a2", 0.889, -0.203, -0.06),
                     ("b0", 0.652, 0.009, 0.0), ("b1", 0.752, 0.009, 0.0), ("b2", 0.851, 0.035, 0.0),
                     ("c0", 0.665, 0.224, 0.0), ("c1", 0.765, 0.222, -0.025), ("c2", 0.865, 0.222, -0.025))
DRAWER_VARIANTS = {  # variant aggregation, all ray-traced: name -> (scene, extra build kwargs)
    "base": ("frl_apartment_stage_simple", ()),
    "modern_bedroom": ("modern_bedroom_no_roof", ()),
    "modern_office": ("modern_office_no_roof", ()),
    "brighter_lighting": ("frl_apartment_stage_simple", (("light_mode", "brighter"),)),
    "darker_lighting": ("frl_apartment_stage_simple", (("light_mode", "darker"),)),
    "mk_station2": ("frl_apartment_stage_simple", (("station_name", "mk_station2"),)),
    "mk_station3": ("frl_apartment_stage_simple", (("station_name", "mk_station3"),)),
}
DRAWER_ROBOT_XYS = [(x, y) for x in _grid(0.65, 0.85, 3) for y in _grid(-0.2, 0.2, 3)]  # variant aggregation


def _drawer(task: str, protocol: str) -> list[SimplerEpisode]:
    verb = "open" if task == "google_robot_open_drawer" else "close"
    episodes = []
    for drawer in DRAWERS:
        env_name = f"{verb.capitalize()}{drawer.capitalize()}DrawerCustomInScene-v0"
        common = dict(task=task, protocol=protocol, env_name=env_name, robot="google_robot_static",
                      max_episode_steps=113, obj_init_xy=(0.0, 0.0), instruction=f"{verb} {drawer} drawer")
        if protocol == "visual_matching":
            for urdf in URDF_VERSIONS:
                kwargs = (("shader_dir", "rt"), ("station_name", "mk_station_recolor"), ("light_mode", "simple"),
                          ("disable_bad_material", True), ("urdf_version", urdf))
                episodes += [SimplerEpisode(**common, variant=f"{drawer}+urdf_{urdf}", scene_name="dummy_drawer",
                                            robot_init_xy=(x, y), robot_init_yaw=yaw,
                                            rgb_overlay=f"open_drawer_{name}.png", env_kwargs=kwargs)
                             for name, x, y, yaw in DRAWER_PLACEMENTS]
        else:
            for name, (scene, kwargs) in DRAWER_VARIANTS.items():
                episodes += [SimplerEpisode(**common, variant=f"{drawer}+{name}", scene_name=scene,
                                            robot_init_xy=xy, robot_init_yaw=0.0,
                                            env_kwargs=(("shader_dir", "rt"), *kwargs))
                             for xy in DRAWER_ROBOT_XYS]
    return episodes


# ---- WidowX (Bridge) ---------------------------------------------------------------------------------------------

BRIDGE_EPISODES = 24  # each PutOnBridgeInSceneEnv's xy configurations x orientations
BRIDGE_TASKS = {  # task -> (env, instruction, setup)
    "widowx_spoon_on_towel": ("PutSpoonOnTableClothInScene-v0", "put the spoon on the towel", "table"),
    "widowx_carrot_on_plate": ("PutCarrotOnPlateInScene-v0", "put carrot on plate", "table"),
    "widowx_stack_cube": ("StackGreenCubeOnYellowCubeBakedTexInScene-v0", "stack the green block on the yellow block",
                          "table"),
    "widowx_put_eggplant_in_basket": ("PutEggplantInBasketScene-v0", "put eggplant into yellow basket", "sink"),
}
BRIDGE_SETUPS = {  # setup -> (scene, robot, photograph, robot xy, step limit)
    "table": ("bridge_table_1_v1", "widowx", "bridge_real_eval_1.png", (0.147, 0.028), 60),
    "sink": ("bridge_table_1_v2", "widowx_sink_camera_setup", "bridge_sink.png", (0.127, 0.06), 120),
}


def _bridge(task: str) -> list[SimplerEpisode]:
    env_name, instruction, setup = BRIDGE_TASKS[task]
    scene, robot, overlay, robot_xy, steps = BRIDGE_SETUPS[setup]
    return [SimplerEpisode(task, "visual_matching", scene, env_name, scene, robot, steps, robot_xy, 0.0,
                           obj_episode_id=episode_id, rgb_overlay=overlay, instruction=instruction)
            for episode_id in range(BRIDGE_EPISODES)]


# ---- lookup -------------------------------------------------------------------------------------------------------

def check_task(task: str) -> None:
    if task not in TASKS:
        raise UnknownNameError("SimplerEnv task", task, TASKS)


def protocols(robot: str) -> tuple[str, ...]:
    return PROTOCOLS if robot == "google_robot" else ("visual_matching",)


@functools.cache
def episodes(task: str, protocol: str) -> tuple[SimplerEpisode, ...]:
    """Every episode SimplerEnv's scripts run for `task` under `protocol`."""
    check_task(task)
    if protocol not in PROTOCOLS:
        raise UnknownNameError("SimplerEnv protocol", protocol, PROTOCOLS)
    if protocol not in protocols(TASKS[task]):
        raise ConfigError(f"SimplerEnv evaluates {task} (WidowX) by visual_matching only; it has no {protocol}")
    if task == "google_robot_pick_coke_can":
        return tuple(_pick_coke_can(protocol))
    if task == "google_robot_move_near":
        return tuple(_move_near(protocol))
    if task in ("google_robot_open_drawer", "google_robot_close_drawer"):
        return tuple(_drawer(task, protocol))
    return tuple(_bridge(task))


def find_episode(task: str, scene: str, seed: int) -> SimplerEpisode:
    """The episode an EpisodeSpec names: its protocol (in `scene`) and its index (`seed`) in the task's list."""
    protocol = scene.split(":", 1)[0]
    listed = episodes(task, protocol)
    if not 0 <= seed < len(listed) or listed[seed].scene != scene:
        raise ConfigError(f"{task} has no episode {seed} in scene {scene!r}; its {protocol} episodes are 0 to "
                          f"{len(listed) - 1}, listed by simpler_episodes.episodes")
    return listed[seed]


def step_limit(task: str) -> int:
    return episodes(task, "visual_matching")[0].max_episode_steps


def evenly_spread(listed: tuple[SimplerEpisode, ...], count: int) -> list[int]:
    """Indices of `count` of the episodes (all of them when count >= their number): every variant gets count // V of
    them (V variants; count % V variants at evenly spaced places one more), at evenly spaced places among its own."""
    if count >= len(listed):
        return list(range(len(listed)))
    variants: dict[str, list[int]] = {}
    for index, episode in enumerate(listed):
        variants.setdefault(episode.variant, []).append(index)
    members = list(variants.values())
    with_one_more = set(_evenly_spaced(count % len(members), len(members)))
    chosen = []
    for position, indices in enumerate(members):
        take = count // len(members) + (position in with_one_more)
        chosen += [indices[i] for i in _evenly_spaced(take, len(indices))]
    return sorted(chosen)


def _evenly_spaced(count: int, total: int) -> list[int]:
    """`count` distinct positions in range(total), each at the middle of its 1/count-th."""
    return [(2 * j + 1) * total // (2 * count) for j in range(count)]
