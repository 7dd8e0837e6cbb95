"""CALVIN's play table and its task oracle as one object: the part of the CALVIN adapter that runs next to
`calvin_env`, in robovlms' process or in a simulator server in CALVIN's own environment (standard library, numpy and
CALVIN's packages only).
"""

from __future__ import annotations

import ctypes.util
import warnings
from pathlib import Path

TASKS_FILE = Path("callbacks") / "rollout" / "tasks" / "new_playtable_tasks.yaml"
ANNOTATIONS_FILE = Path("annotations") / "new_playtable_validation.yaml"
CAMERA_SIZES = {"rgb_static": 200, "rgb_gripper": 84}  # as in the dataset


class PlayTable:
    """A play table (`calvin_env`'s PlayTableSimEnv, or an object with its interface) and its task oracle
    (`Tasks.get_task_info_for_set`): success of a subtask is judged against the state when it began."""

    def __init__(self, env, oracle):
        self.env, self.oracle = env, oracle
        self._subtask: str | None = None
        self._start_info: dict | None = None

    def reset(self, robot_obs, scene_obs) -> dict:
        self._subtask, self._start_info = None, None
        return self.env.reset(robot_obs=robot_obs, scene_obs=scene_obs)

    def begin_subtask(self, subtask: str) -> dict:
        self._subtask, self._start_info = subtask, self.env.get_info()
        return self.env.get_obs()

    def step(self, action) -> tuple[dict, bool]:
        """(observation, whether the current subtask is solved) after one 7-D relative action."""
        obs, _, _, info = self.env.step(action)
        return obs, bool(self.oracle.get_task_info_for_set(self._start_info, info, {self._subtask}))

    def uses_egl(self) -> bool:
        """Whether the play table renders with EGL (else pybullet's tiny renderer)."""
        return bool(getattr(self.env, "use_egl", False))

    def close(self) -> None:
        """Disconnect from pybullet once. calvin_env's own close fails the second time, and its `__del__` closes
        again: after the first close the play table is marked as holding no client (cid -1)."""
        if self.env is None:
            return
        close = getattr(self.env, "close", None)
        if close is not None:
            close()
        if hasattr(self.env, "cid"):
            self.env.cid = -1
        self.env = None


def find_calvin_conf(calvin_conf: str | None) -> str:
    """The calvin repository's `calvin_models/conf` folder: given, or next to the installed `calvin_agent`.
    ImportError without calvin_agent; FileNotFoundError for a folder without the task definitions."""
    if calvin_conf is None:
        import calvin_agent

        conf = Path(calvin_agent.__file__).resolve().parents[1] / "conf"
    else:
        conf = Path(calvin_conf)
    for needed in (TASKS_FILE, ANNOTATIONS_FILE):
        if not (conf / needed).is_file():
            raise FileNotFoundError(f"{conf / needed} is missing: calvin_conf (the benchmark option, or "
                                    f"$ROBOVLMS_CALVIN_CONF) must be the calvin repository's calvin_models/conf folder")
    return str(conf)


def egl_available() -> bool:
    """Whether an EGL library is installed (calvin_env's EGL renderer exits the process when it cannot load)."""
    return ctypes.util.find_library("EGL") is not None


def renders_with_egl(configured: bool, requested: bool | None, egl_installed: bool) -> bool:
    """Whether the play table renders with EGL: as `requested`, else as its configuration says (`configured`),
    unless that is EGL and no EGL library is installed (calvin_env would exit the process)."""
    if requested is not None:
        return requested
    if configured and not egl_installed:
        warnings.warn("no EGL library is installed: CALVIN renders with pybullet's tiny renderer, whose images differ "
                      "from the EGL images of CALVIN's dataset (install libegl1 and libegl-mesa0)")
        return False
    return bool(configured)


def open_play_table(cameras: list[str], dataset: str | None, use_egl: bool | None, calvin_conf: str | None
                    ) -> PlayTable:
    """calvin_env's play table in scene D, headless (pybullet DIRECT), with the given cameras, and the task oracle.

    The scene is the dataset's `validation/.hydra/merged_config.yaml` when `dataset` is given, as CALVIN's own
    evaluation builds it, else scene D composed from calvin_env's configuration. The renderer is EGL or pybullet's
    tiny renderer as `use_egl` says; None keeps the configuration's choice (calvin_env's default is EGL), falling
    back to the tiny renderer where no EGL library is installed. The two renderers' images differ.
    """
    import calvin_env
    import calvin_env.envs.play_table_env as play_table_env
    import hydra
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf = Path(find_calvin_conf(calvin_conf))
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
    else:
        env_conf = Path(calvin_env.__file__).resolve().parents[1] / "conf"
        sizes = [f"cameras.{name}.{side}={CAMERA_SIZES['rgb_' + name]}"
                 for name in names for side in ("width", "height")]
        with initialize_config_dir(config_dir=str(env_conf), version_base=None):
            config = compose("config_data_collection", overrides=[
                "cameras=static_and_gripper", "scene=calvin_scene_D", "use_vr=false", *sizes])
    config.env.use_egl = renders_with_egl(config.env.get("use_egl", True), use_egl, egl_available())
    env = hydra.utils.instantiate(config.env, show_gui=False, use_vr=False, use_scene_info=True)
    oracle = hydra.utils.instantiate(OmegaConf.load(conf / TASKS_FILE))
    return PlayTable(env, oracle)
