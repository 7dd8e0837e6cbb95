"""Language-conditioned Meta-World with scene variants A-D: the embedded benchmark that runs on any CPU.

Playing the part CALVIN ABC->D plays in the RoboVLMs paper: train on scenes A, B, C, evaluate on scene D, with
instructions at evaluation that training never used. Scenes differ in table and floor colour, lighting and the
third-person camera's pose. Actions are 4-D (xyz delta, gripper); proprioception is the hand position and the
gripper opening.

Settings are chosen on validation episodes that mirror the test episodes without touching them. Where the test
scene is held out from training (ABC->D), the validation episodes run in scene E, which is neither trained on nor
tested, as far from A-C as D is and far from D; where it is trained on (D->D, ABCD->D), in the test scene with
fresh seeds, as held-out episodes of a training scene. Either way with instructions of their own and seeds of their
own (docs/benchmarks.md).
"""

from __future__ import annotations

import atexit
import os
import warnings
from dataclasses import dataclass

import numpy as np

from robovlms.benchmark import Benchmark, Environment, EpisodeSpec, Observation
from robovlms.benchmarks.metaworld_instructions import INSTRUCTIONS, VALIDATION_INSTRUCTIONS
from robovlms.errors import ConfigError, UnknownNameError

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before mujoco is imported

TRAIN_INSTRUCTIONS = 3  # paraphrases 0-2 train, 3-4 are held out for evaluation

TASK_SETS = {
    "demo": ("button-press-topdown", "door-open", "plate-slide", "window-open"),
    "mt10": ("reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close", "button-press-topdown",
             "peg-insert-side", "window-open", "window-close"),
}

CAMERAS = {"rgb_static": "corner", "rgb_gripper": "gripperPOV"}


@dataclass(frozen=True)
class Scene:
    table_rgba: tuple[float, float, float, float]  # multiplies the table's wood texture
    floor_rgba: tuple[float, float, float, float]
    light_diffuse: float
    headlight_ambient: float
    camera_offset: tuple[float, float, float]  # added to the third-person camera's position (metres)


SCENES = {
    "A": Scene((1.0, 1.0, 1.0, 1), (1.0, 1.0, 1.0, 1), 0.30, 0.10, (0.0, 0.0, 0.0)),
    "B": Scene((0.55, 0.75, 1.0, 1), (0.8, 0.65, 0.5, 1), 0.45, 0.05, (0.06, -0.05, 0.04)),
    "C": Scene((1.0, 0.6, 0.55, 1), (0.55, 0.8, 0.6, 1), 0.22, 0.20, (-0.05, 0.06, -0.03)),
    "D": Scene((0.7, 1.0, 0.6, 1), (0.6, 0.6, 0.85, 1), 0.38, 0.15, (0.04, 0.05, 0.05)),
    # the validation scene, never trained on nor tested: its images differ from the nearest of A-C by 22.9 grey
    # levels (third-person camera) and 8.0 (gripper camera) on average, as D's do by 22.1 and 7.6, and from D's by
    # 29.9 and 13.0 (tests/test_metaworld.py)
    "E": Scene((0.8, 0.7, 1.0, 1), (0.9, 0.85, 0.55, 1), 0.26, 0.12, (0.05, -0.05, -0.05)),
}
TRAINING_SCENES = "ABCD"

# split -> (training scenes, test scenes, validation scenes)
SPLITS = {"ABC->D": ("ABC", "D", "E"), "D->D": ("D", "D", "D"), "ABCD->D": ("ABCD", "D", "D")}

EVALUATION_SEED_OFFSET = 1_000_000  # test seeds never meet demonstration seeds (scene * 100_000 + i)
VALIDATION_SEED_OFFSET = 2_000_000  # nor validation seeds either


def task_env_name(task: str) -> str:
    return task if task.endswith("-v3") else f"{task}-v3"


def short_task_name(task: str) -> str:
    return task.removesuffix("-v3")


def all_tasks() -> list[str]:
    return [short_task_name(name) for name in INSTRUCTIONS]


def resolve_tasks(tasks: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A named task set ("demo", "mt10", "mt50"), one task, or a list of task names (with or without -v3)."""
    if isinstance(tasks, str):
        if tasks in TASK_SETS:
            return TASK_SETS[tasks]
        if tasks == "mt50":
            return tuple(all_tasks())
        tasks = [tasks]
    known = set(all_tasks())
    resolved = tuple(short_task_name(task) for task in tasks)
    for task in resolved:
        if task not in known:
            raise UnknownNameError("Meta-World task (or task set demo, mt10, mt50)", task, known)
    if not resolved:
        raise ConfigError("the task list is empty")
    return resolved


def split_scenes(split: str) -> tuple[str, str, str]:
    """(training scenes, test scenes, validation scenes) of a split."""
    if split not in SPLITS:
        raise UnknownNameError("split", split, SPLITS)
    return SPLITS[split]


def check_scene(scene: str) -> Scene:
    if scene not in SCENES:
        raise UnknownNameError("scene", scene, SCENES)
    return SCENES[scene]


def training_instructions(task: str) -> tuple[str, ...]:
    return INSTRUCTIONS[task_env_name(task)][:TRAIN_INSTRUCTIONS]


def evaluation_instructions(task: str) -> tuple[str, ...]:
    return INSTRUCTIONS[task_env_name(task)][TRAIN_INSTRUCTIONS:]


def validation_instructions(task: str) -> tuple[str, ...]:
    return VALIDATION_INSTRUCTIONS[task_env_name(task)]


class MetaWorldBenchmark(Benchmark):
    name = "metaworld"
    action_dim = 4
    state_dim = 4

    def __init__(self, tasks: str | list[str] = "mt10", image_size: int = 64,
                 cameras: tuple[str, ...] | list[str] = ("rgb_static", "rgb_gripper"), max_steps: int = 200):
        self.task_names = resolve_tasks(tasks)
        if not 64 <= image_size <= 224:
            raise ConfigError(f"image_size {image_size} is out of range: Meta-World renders square images of 64 to 224")
        for camera in cameras:
            if camera not in CAMERAS:
                raise UnknownNameError("camera", camera, CAMERAS)
        if max_steps < 1:
            raise ConfigError(f"max_steps must be positive, got {max_steps}")
        self.image_size = image_size
        self.cameras = tuple(cameras)
        self.max_steps = max_steps

    def options(self) -> dict:
        return {"tasks": list(self.task_names), "image_size": self.image_size, "cameras": list(self.cameras),
                "max_steps": self.max_steps}

    def tasks(self) -> list[str]:
        return list(self.task_names)

    def splits(self) -> list[str]:
        return list(SPLITS)

    def demonstration_episodes(self, split: str, episodes_per_scene: int, attempt: int = 0,
                               scenes: str | None = None) -> list[EpisodeSpec]:
        train_scenes = split_scenes(split)[0]
        if scenes is not None:
            for scene in scenes:
                check_scene(scene)
                if scene not in TRAINING_SCENES:
                    raise ConfigError(f"scene {scene} is the validation scene, never trained on; training scenes: "
                                      f"{', '.join(TRAINING_SCENES)}")
            train_scenes = scenes
        specs = []
        for task in self.task_names:
            instructions = training_instructions(task)
            for scene in train_scenes:
                for i in range(episodes_per_scene):
                    index = attempt * episodes_per_scene + i
                    seed = TRAINING_SCENES.index(scene) * 100_000 + index
                    specs.append(EpisodeSpec(task, scene, instructions[seed % len(instructions)], seed))
        return specs

    def evaluation_episodes(self, split: str, episodes_per_task: int) -> list[EpisodeSpec]:
        return self._held_out_episodes(split_scenes(split)[1], evaluation_instructions, EVALUATION_SEED_OFFSET,
                                       episodes_per_task)

    def validation_episodes(self, split: str, episodes_per_task: int) -> list[EpisodeSpec]:
        return self._held_out_episodes(split_scenes(split)[2], validation_instructions, VALIDATION_SEED_OFFSET,
                                       episodes_per_task)

    def _held_out_episodes(self, scenes: str, instructions_of, seed_offset: int, episodes_per_task: int
                           ) -> list[EpisodeSpec]:
        specs = []
        for task in self.task_names:
            instructions = instructions_of(task)
            for i in range(episodes_per_task):
                specs.append(EpisodeSpec(task, scenes[i % len(scenes)], instructions[i % len(instructions)],
                                         seed_offset + i))
        return specs

    def make_environment(self) -> MetaWorldEnvironment:
        return MetaWorldEnvironment(self.image_size, self.cameras, self.max_steps)

    def scripted_expert(self) -> type[MetaWorldExpertPolicy]:
        return MetaWorldExpertPolicy


class MetaWorldExpertPolicy:
    """Meta-World's own scripted expert for the episode's task, reading the privileged simulator state."""

    def __init__(self):
        from metaworld.policies import ENV_POLICY_MAP

        self._policies = ENV_POLICY_MAP
        self._policy = None

    def reset(self, spec: EpisodeSpec) -> None:
        self._policy = self._policies[task_env_name(spec.task)]()

    def step(self, observation: Observation) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the experts warn that their gains exceed the action bounds
            action = self._policy.get_action(observation.privileged_state)
        return np.clip(action, -1.0, 1.0).astype(np.float32)


class MetaWorldEnvironment(Environment):
    """One process's simulators, one per task (built on first use, about 0.2 s each), rendered by MuJoCo."""

    def __init__(self, image_size: int, cameras: tuple[str, ...], max_steps: int):
        self.image_size = image_size
        self.cameras = cameras
        self.max_steps = max_steps
        self._simulators: dict[str, _TaskSimulator] = {}
        self._current: _TaskSimulator | None = None
        self._instruction = ""

    def reset(self, spec: EpisodeSpec) -> Observation:
        if spec.task not in self._simulators:
            resolve_tasks([spec.task])
            self._simulators[spec.task] = _TaskSimulator(spec.task, self.image_size, self.cameras, self.max_steps)
        self._current = self._simulators[spec.task]
        self._instruction = spec.instruction
        full_state = self._current.reset(check_scene(spec.scene), spec.seed)
        return self._observe(full_state)

    def step(self, action: np.ndarray, observe: bool) -> tuple[Observation | None, bool]:
        full_state, success = self._current.step(action)
        return (self._observe(full_state) if observe else None), success

    def _observe(self, full_state: np.ndarray) -> Observation:
        return Observation(images=self._current.render(), state=full_state[:4].astype(np.float32),
                           instruction=self._instruction, privileged_state=full_state)

    def close(self) -> None:
        for simulator in self._simulators.values():
            simulator.close()
        self._simulators.clear()


class _TaskSimulator:
    def __init__(self, task: str, image_size: int, cameras: tuple[str, ...], max_steps: int):
        import metaworld
        import mujoco

        self._mujoco = mujoco
        env = metaworld.ALL_V3_ENVIRONMENTS[task_env_name(task)]()
        env._partially_observable = False  # the scripted experts read the goal from the full state
        del env.sawyer_observation_space  # cached for the old observability
        env._set_task_called = True  # we set the initial-state vector ourselves, from the episode seed
        env._freeze_rand_vec = True
        env.max_path_length = max(env.max_path_length, max_steps + 1)
        model = env.model
        model.vis.quality.shadowsize = 0  # default shadows and 4x MSAA make CPU rendering ~6x slower
        model.vis.quality.offsamples = 0
        model.mat_reflectance[:] = 0  # reflections cost a further render pass
        self.env, self.model = env, model
        self.camera_ids = {name: mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, CAMERAS[name]) for name in cameras}
        self._static_camera = self.camera_ids.get("rgb_static")
        self._defaults = {
            "table": model.mat_rgba[self._material("table_wood")].copy(),
            "floor": model.mat_rgba[self._material("basic_floor")].copy(),
            "camera": model.cam_pos[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "corner")].copy(),
        }
        self.renderer = mujoco.Renderer(model, image_size, image_size)
        atexit.register(self.close)  # after mujoco's own atexit hook, so this runs before EGL is torn down

    def _material(self, name: str) -> int:
        return self._mujoco.mj_name2id(self.model, self._mujoco.mjtObj.mjOBJ_MATERIAL, name)

    def _apply_scene(self, scene: Scene) -> None:
        model = self.model
        model.mat_rgba[self._material("table_wood")] = self._defaults["table"] * np.array(scene.table_rgba)
        model.mat_rgba[self._material("basic_floor")] = self._defaults["floor"] * np.array(scene.floor_rgba)
        model.light_diffuse[:] = scene.light_diffuse
        model.vis.headlight.ambient[:] = scene.headlight_ambient
        corner = self._mujoco.mj_name2id(model, self._mujoco.mjtObj.mjOBJ_CAMERA, "corner")
        model.cam_pos[corner] = self._defaults["camera"] + np.array(scene.camera_offset)

    def reset(self, scene: Scene, seed: int) -> np.ndarray:
        self._apply_scene(scene)
        space = self.env._random_reset_space
        self.env._last_rand_vec = np.random.default_rng(seed).uniform(space.low, space.high, size=space.low.size)
        full_state, _ = self.env.reset()
        return full_state

    def step(self, action: np.ndarray) -> tuple[np.ndarray, bool]:
        full_state, _, _, _, info = self.env.step(np.clip(action, -1.0, 1.0))
        return full_state, bool(info["success"])

    def render(self) -> dict[str, np.ndarray]:
        images = {}
        for name, camera_id in self.camera_ids.items():
            self.renderer.update_scene(self.env.data, camera=camera_id)
            images[name] = np.ascontiguousarray(self.renderer.render()[::-1])  # Meta-World's cameras are upside down
        return images

    def close(self) -> None:
        atexit.unregister(self.close)
        self.renderer.close()
        self.env.close()
