"""Frames rendered from Meta-World with what each shows, read from the simulator: the data pre-training (and the
probe) is made of.

An episode places a task's objects from its seed (Meta-World's own reset draws) in one scene, then its scripted
expert acts with Gaussian noise of a scale drawn per episode, so the hand wanders near and away from the objects as
a policy's does; a few of its steps, drawn from the seed, are rendered from every camera. Each rendered image is a
*view*: its pixels and, per object of the task, its position, its offset from the gripper, its box in the image and
its colour (robovlms/pretraining/objects.py). Only the views are kept, never the actions.

A frame set is a directory, written once into `<path>.partial/` and renamed into place when complete:
    images.u8       (views, S, S, 3) uint8, memory-mapped
    views.parquet   one row per view: task, scene, seed, step, camera, hand_x/y/z, objects (JSON: name, colour,
                    position, offset, pixels, box)
    meta.json       the settings it was made from and their hash (written last)
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock
from tqdm.auto import tqdm

from robovlms.atomic_files import write_json_atomically
from robovlms.errors import StoreError
from robovlms.pretraining.config import FrameSettings, content_hash

META_FILE, VIEWS_FILE, IMAGES_FILE = "meta.json", "views.parquet", "images.u8"
MIN_PIXELS = 4  # an object of fewer pixels in a 64 px image is not "in view": a few pixels cannot be named


class FrameSet:
    """A finished frame set, its images memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / META_FILE).is_file():
            raise StoreError(f"{self.path} holds no finished frame set ({META_FILE} is missing)")
        self.meta = json.loads((self.path / META_FILE).read_text())
        self.views = pd.read_parquet(self.path / VIEWS_FILE)
        size = self.meta["settings"]["image_size"]
        self.images = np.memmap(self.path / IMAGES_FILE, dtype=np.uint8, mode="r", shape=(len(self.views), size,
                                                                                           size, 3))

    def __len__(self) -> int:
        return len(self.views)

    def objects(self, view: int) -> list[dict[str, Any]]:
        return json.loads(self.views.objects.iloc[view])


def frame_set(settings: FrameSettings, root: str | Path, workers: int = 1, progress: bool = False) -> FrameSet:
    """The frames of `settings`: made once into `root/frames-<hash>`, then read from there."""
    path = Path(root) / f"frames-{content_hash(settings)[:12]}"
    if not (path / META_FILE).is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):  # another process making the same frames: wait for them
            if not (path / META_FILE).is_file():
                _make_frame_set(settings, path, workers, progress)
    return FrameSet(path)


def _make_frame_set(settings: FrameSettings, path: Path, workers: int, progress: bool) -> None:
    partial = path.with_name(path.name + ".partial")
    if partial.exists():  # a crashed attempt: rendering is cheap beside training, so it starts afresh
        shutil.rmtree(partial)
    partial.mkdir()
    episodes = [(task, scene, episode) for task in settings.tasks for scene in settings.scenes
                for episode in range(settings.episodes_per_task)]
    by_task = [[episode for episode in episodes if episode[0] == task] for task in settings.tasks]
    rows, images = [], []
    with tqdm(total=len(episodes), desc="rendering frames", unit="episode", disable=not progress) as bar:
        for task_rows, task_images in _render_tasks(settings, by_task, workers):
            rows += task_rows
            images.append(task_images)
            bar.update(len({(row["task"], row["scene"], row["seed"]) for row in task_rows}))
    np.concatenate(images).tofile(partial / IMAGES_FILE)
    pd.DataFrame(rows).to_parquet(partial / VIEWS_FILE, index=False)
    write_json_atomically(partial / META_FILE, {"settings": settings.model_dump(mode="json"),
                                                "hash": content_hash(settings), "views": len(rows)})
    partial.rename(path)


def _render_tasks(settings: FrameSettings, by_task: list[list[tuple]], workers: int):
    """Each task's (rows, images), in task order, rendered in `workers` processes."""
    if workers <= 1:
        for episodes in by_task:
            yield render_episodes(settings, episodes)
        return
    context = multiprocessing.get_context("spawn")  # MuJoCo's GL contexts do not survive fork
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(render_episodes, [settings] * len(by_task), by_task)


def episode_seed(settings: FrameSettings, task: str, scene: str, episode: int) -> int:
    """An episode's seed, from the frame set's seed and the episode alone: the same episode whatever else the set
    holds, and never a demonstration's or an evaluation's placement (those draw with another generator)."""
    words = [settings.seed, *task.encode(), *scene.encode(), episode]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def render_episodes(settings: FrameSettings, episodes: list[tuple[str, str, int]]):
    """The view rows and images (views, S, S, 3) of episodes of one task."""
    from metaworld.policies import ENV_POLICY_MAP

    from robovlms.benchmarks.metaworld import _TaskSimulator, check_scene, task_env_name
    from robovlms.pretraining.objects import SceneObjects

    task = episodes[0][0]
    simulator = _TaskSimulator(task, settings.image_size, tuple(settings.cameras), settings.max_steps)
    env, model = simulator.env, simulator.model
    env._freeze_rand_vec, env.seeded_rand_vec = False, True  # Meta-World's own reset draws, which re-draw until
    # the placement is valid (a frozen draw that is not would loop for ever)
    objects = SceneObjects(task, model)
    expert = ENV_POLICY_MAP[task_env_name(task)]()
    rows, images = [], []
    try:
        for _, scene, episode in episodes:
            seed = episode_seed(settings, task, scene, episode)
            rng = np.random.default_rng(seed)
            simulator._apply_scene(check_scene(scene))
            env.seed(seed)
            observation, _ = env.reset()
            noise = rng.uniform(0, settings.max_noise)
            rendered = set(rng.choice(settings.max_steps, settings.frames_per_episode, replace=False).tolist())
            for step in range(max(rendered) + 1):
                if step in rendered:
                    for camera, image in simulator.render().items():
                        segmentation = _segmentation(simulator, camera)
                        rows.append(_view_row(task, scene, seed, step, camera, observation, env.data, objects,
                                              segmentation, image))
                        images.append(image)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the experts warn that their gains exceed the action bounds
                    action = expert.get_action(observation)
                action = np.clip(action + noise * rng.normal(size=action.shape), -1, 1)
                observation, _, _, _, _ = env.step(action)
    finally:
        simulator.close()
    return rows, np.stack(images)


def _segmentation(simulator, camera: str) -> np.ndarray:
    """(S, S, 2) upright: the id and type of the MuJoCo object seen at each pixel."""
    renderer = simulator.renderer
    renderer.enable_segmentation_rendering()
    try:
        renderer.update_scene(simulator.env.data, camera=simulator.camera_ids[camera])
        return renderer.render()[::-1]
    finally:
        renderer.disable_segmentation_rendering()


def _view_row(task: str, scene: str, seed: int, step: int, camera: str, observation: np.ndarray, data,
              objects, segmentation: np.ndarray, image: np.ndarray) -> dict[str, Any]:
    hand = observation[:3]
    positions = objects.positions(observation, data)
    shown = []
    for name, position, (pixels, box, colour) in zip(objects.names, positions, objects.in_image(segmentation, image)):
        seen = pixels >= MIN_PIXELS
        shown.append({"name": name, "colour": colour if seen else None, "position": position.round(4).tolist(),
                      "offset": (position - hand).round(4).tolist(), "pixels": int(pixels),
                      "box": [round(value, 4) for value in box] if seen else None})
    return {"task": task, "scene": scene, "seed": seed, "step": step, "camera": camera,
            "hand_x": float(hand[0]), "hand_y": float(hand[1]), "hand_z": float(hand[2]),
            "gripper": float(observation[3]),  # the proprio state is the hand's position and this opening
            "objects": json.dumps(shown)}
