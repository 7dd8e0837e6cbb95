"""A small split in CALVIN's own on-disk format, written by tests: same file names, keys, shapes and annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WINDOWS = [  # (first frame, last frame inclusive, task, instruction)
    (0, 5, "open_drawer", "pull the handle to open the drawer"),
    (4, 9, "move_slider_left", "push the sliding door to the left side"),
    (12, 16, "turn_on_led", "press the button to turn on the led light"),
    (20, 25, "open_drawer", "open the cabinet drawer"),
    (26, 30, "turn_on_led", "toggle the button to turn on the green light"),
]


def frame_arrays(frame: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(frame)
    return {
        "actions": rng.normal(size=7),
        "rel_actions": np.concatenate([rng.uniform(-1, 1, 6), [1.0 if frame % 3 else -1.0]]),
        "robot_obs": np.full(15, frame, dtype=np.float64),
        "scene_obs": rng.normal(size=24),
        "rgb_static": np.full((200, 200, 3), frame % 256, dtype=np.uint8),
        "rgb_gripper": np.full((84, 84, 3), (frame * 7) % 256, dtype=np.uint8),
        "rgb_tactile": np.zeros((160, 120, 6), dtype=np.uint8),
        "depth_static": np.zeros((200, 200), dtype=np.float32),
        "depth_gripper": np.zeros((84, 84), dtype=np.float32),
    }


def write_calvin_split(root: Path, windows=WINDOWS, frames: int = 32, scenes: dict | None = None) -> Path:
    """root/training/ with one npz per frame, ep_start_end_ids.npy, scene_info.npy and the language annotations."""
    folder = root / "training"
    (folder / "lang_annotations").mkdir(parents=True)
    for frame in range(frames):
        np.savez_compressed(folder / f"episode_{frame:07d}.npz", **frame_arrays(frame))
    np.save(folder / "ep_start_end_ids.npy", np.array([[0, frames - 1]]))
    scenes = {"calvin_scene_B": [0, 15], "calvin_scene_A": [16, frames - 1]} if scenes is None else scenes
    if scenes:
        np.save(folder / "scene_info.npy", scenes)
    annotations = {
        "info": {"episodes": [], "indx": [(start, end) for start, end, _, _ in windows]},
        "language": {"ann": [instruction for *_, instruction in windows], "task": [task for _, _, task, _ in windows],
                     "emb": np.zeros((len(windows), 1, 384), dtype=np.float32)},
    }
    np.save(folder / "lang_annotations" / "auto_lang_ann.npy", annotations)
    return root
