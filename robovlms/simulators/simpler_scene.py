"""SimplerEnv's environments as the SimplerEnv adapter drives them: the part that runs next to `simpler_env`, in
robovlms' process or in a simulator server in SimplerEnv's own environment (standard library, numpy and SimplerEnv's
packages only). Each reset and step answers with plain data: the camera image, the robot's poses, and, after a reset,
the files the scene was built from.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable


class SimplerScene:
    """One simpler_env environment at a time, built by `build_env(env_name, **kwargs)` (simpler_env's
    build_maniskill2_env, or a stand-in); `image_of(env, obs)` is simpler_env's get_image_from_maniskill2_obs_dict."""

    def __init__(self, build_env: Callable[..., Any], image_of: Callable[[Any, dict], Any], asset_dir: str = ""):
        self.build_env, self.image_of, self._asset_dir = build_env, image_of, asset_dir
        self.env: Any = None

    def asset_dir(self) -> str:
        return self._asset_dir

    def build(self, env_name: str, kwargs: dict) -> None:
        """Close the current environment and build a new one (FileNotFoundError where an asset file is missing,
        naming it)."""
        self.close()
        try:
            self.env = self.build_env(env_name, **kwargs)
        except FileNotFoundError as error:
            if "collision.obj" not in str(error):
                raise
            # ManiSkill2_real2sim checks every object's collision mesh when it builds, and says only "convex.obj
            # has been renamed to collision.obj"
            models = Path(self._asset_dir) / "custom" / "models"
            missing = [str(model / "collision.obj") for model in sorted(models.glob("*"))
                       if model.is_dir() and not (model / "collision.obj").exists()]
            raise FileNotFoundError(f"missing collision mesh(es): {', '.join(missing)}" if missing else
                                    f"{error} (a collision.obj under {models})") from None

    def reset(self, seed: int, options: dict) -> dict:
        """{"image", "robot", "instruction", "scene"} after resetting with `seed` and `options`."""
        obs, _ = self.env.reset(seed=seed, options=options)
        sim = self.env.unwrapped
        return {"image": self.image_of(sim, obs), "robot": robot_poses(sim),
                "instruction": sim.get_language_instruction(), "scene": scene_description(sim)}

    def step(self, action, observe: bool = True) -> dict:
        """{"image" (None unless `observe`), "robot", "success", "truncated", "episode_stats"} after one action."""
        obs, _, success, truncated, info = self.env.step(action)
        stats = {key: value.item() if hasattr(value, "item") else value
                 for key, value in info.get("episode_stats", {}).items()}
        sim = self.env.unwrapped
        return {"image": self.image_of(sim, obs) if observe else None, "robot": robot_poses(sim),
                "success": bool(success), "truncated": bool(truncated), "episode_stats": stats}

    def close(self) -> None:
        if self.env is not None:
            env, self.env = self.env, None
            env.close()


def robot_poses(sim) -> dict:
    """The robot base's and the tool centre point's poses in the world (position, quaternion w, x, y, z) and the
    gripper's closedness (1 closed)."""
    base, tcp = sim.agent.robot.pose, sim.tcp.pose
    return {"base_p": list(map(float, base.p)), "base_q": list(map(float, base.q)),
            "tcp_p": list(map(float, tcp.p)), "tcp_q": list(map(float, tcp.q)),
            "closedness": float(sim.agent.get_gripper_closedness())}


def scene_description(sim) -> dict:
    """What the scene was built from, to check after every reset: `assets`, each a list of alternative files of
    which one must exist (the stage mesh, each object's collision and visual mesh, the overlay photograph: those of
    CustomSceneEnv._load_arena_helper, _build_actor_helper and rgb_overlay_path); the loose objects' heights; the
    table top's height; whether the task's object is a link of a cabinet."""
    articulated = hasattr(sim, "art_obj")  # drawer tasks: `obj` is a link of a cabinet fixed to the ground
    candidates = [None if articulated else getattr(sim, "obj", None), *(getattr(sim, "episode_objs", None) or []),
                  *(getattr(sim, "distractor_objs", None) or []), getattr(sim, "sink", None)]
    loose = [obj for obj in candidates if obj is not None]
    assets = []
    if "dummy" not in str(sim.scene_name):
        stage = sim.scene_name or ("google_pick_coke_can_1_v4" if "google_robot" in sim.robot_uid
                                   else "bridge_table_1_v1")
        assets.append([str(Path(sim.scene_root) / "stages" / f"{stage}.glb")])
    for obj in loose:
        model = Path(sim.asset_root) / "models" / obj.name
        visuals = [str(model / f"textured.{suffix}") for suffix in ("obj", "dae", "glb")]
        assets += [[str(model / "collision.obj")], visuals]
    if sim.rgb_overlay_path:
        assets.append([str(sim.rgb_overlay_path)])
    return {"assets": assets, "objects": {obj.name: float(obj.pose.p[2]) for obj in loose},
            "table_height": float(sim.scene_table_height), "articulated": articulated}


def open_simpler() -> SimplerScene:
    """A SimplerScene over the installed simpler_env (ImportError where it is not)."""
    real2sim = importlib.util.find_spec("mani_skill2_real2sim")
    if real2sim is None:
        raise ImportError("No module named 'mani_skill2_real2sim'")
    # ManiSkill2_real2sim reads its asset folder from the environment at import (MS2_ASSET_DIR, later versions
    # MS2_REAL2SIM_ASSET_DIR), relative to the working directory when unset: default it to the checkout's data.
    data = Path(real2sim.origin).resolve().parents[1] / "data"
    if data.is_dir():
        for variable in ("MS2_ASSET_DIR", "MS2_REAL2SIM_ASSET_DIR"):
            os.environ.setdefault(variable, str(data))
    import mani_skill2_real2sim
    from simpler_env.utils.env.env_builder import build_maniskill2_env
    from simpler_env.utils.env.observation_utils import get_image_from_maniskill2_obs_dict

    return SimplerScene(build_maniskill2_env, get_image_from_maniskill2_obs_dict, str(mani_skill2_real2sim.ASSET_DIR))
