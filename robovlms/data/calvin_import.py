"""Import a CALVIN split (its own on-disk format) into an episode store.

A CALVIN split folder (`training/` or `validation/`) holds one `episode_XXXXXXX.npz` per frame of play data, and
`lang_annotations/auto_lang_ann.npy`: the language-annotated frame ranges (start and end inclusive), their task
and instruction. As the benchmark's language-conditioned baselines do, only the annotated windows are imported,
each as one store episode. Frames are read one at a time (a full split is hundreds of GB) and each window is
flushed to the store's journal as soon as it is complete, so an interrupted import re-run with `resume=True`
continues from the first window not yet written.

Both `.npy` files of a split that hold dicts (`auto_lang_ann.npy`, `scene_info.npy`) are pickles; they are read
with an unpickler that admits only dicts, lists, tuples, strings, numbers and numpy arrays, so a file that would
run code is refused instead of run.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from robovlms.benchmark import square_image
from robovlms.data.store import Episode, EpisodeStore, EpisodeStoreWriter, FrameLayout
from robovlms.errors import ConfigError, StoreError, UnknownNameError

CAMERAS = ("rgb_static", "rgb_gripper")
ANNOTATIONS = Path("lang_annotations") / "auto_lang_ann.npy"
STATE_DIM, ACTION_DIM = 15, 7  # robot_obs; rel_actions (xyz, euler xyz, gripper -1 close / 1 open)
# What pickled numpy arrays and scalars are rebuilt from (numpy 1.x names numpy.core, 2.x numpy._core); nothing else.
NUMPY_PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"),
                        *((f"numpy.{core}.multiarray", name) for core in ("core", "_core")
                          for name in ("_reconstruct", "scalar")),
                        *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core"))}


class _RefusedGlobal(Exception):
    """A pickle asked for a global outside NUMPY_PICKLE_GLOBALS."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in NUMPY_PICKLE_GLOBALS:
            raise _RefusedGlobal(f"{module}.{name}")
        return super().find_class(module, name)


def load_plain_npy(path: Path) -> np.ndarray:
    """A `.npy` file, its pickled object arrays restricted to dicts, lists, tuples, strings, numbers and numpy
    arrays; anything else (a pickle that would run code) is a StoreError naming the file."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(file)
        if not dtype.hasobject:
            return np.load(path, allow_pickle=False)
        try:
            return _PlainDataUnpickler(file).load()
        except _RefusedGlobal as refused:
            raise StoreError(f"{path} is not a plain CALVIN data file: its pickle would create {refused}, which is "
                             f"refused (only dicts, lists, tuples, strings, numbers and numpy arrays are read); "
                             f"download the split again") from None


@dataclass(frozen=True)
class AnnotatedWindow:
    start: int  # first frame id
    end: int  # last frame id (inclusive)
    task: str
    instruction: str
    scene: str


def annotated_windows(folder: str | Path) -> list[AnnotatedWindow]:
    """The language-annotated windows of a CALVIN split folder, by first frame."""
    folder = Path(folder)
    path = folder / ANNOTATIONS
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder of a CALVIN split")
    if not path.is_file():
        raise ConfigError(f"{folder} is not a CALVIN split folder: {path} is missing (the language annotations; "
                          f"download a split with calvin's dataset/download_data.sh)")
    try:
        annotations = load_plain_npy(path).item()
        ranges, tasks, instructions = (annotations["info"]["indx"], annotations["language"]["task"],
                                       annotations["language"]["ann"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, pickle.UnpicklingError) as error:
        raise StoreError(f"cannot read the CALVIN annotations {path}: {error!r} (expected a dict with info.indx, "
                         f"language.task and language.ann)") from None
    if not len(ranges) == len(tasks) == len(instructions):
        raise StoreError(f"{path}: {len(ranges)} frame ranges but {len(tasks)} tasks and {len(instructions)} "
                         f"instructions")
    scenes = _scene_ranges(folder)
    windows = [AnnotatedWindow(int(start), int(end), str(task), str(instruction), _scene_of(int(start), scenes))
               for (start, end), task, instruction in zip(ranges, tasks, instructions)]
    return sorted(windows, key=lambda window: (window.start, window.end, window.task))


def _scene_ranges(folder: Path) -> dict[str, tuple[int, int]]:
    """`scene_info.npy`: {"calvin_scene_A": [first, last], ...}; absent in single-scene splits."""
    path = folder / "scene_info.npy"
    if not path.is_file():
        return {}
    info = load_plain_npy(path).item()
    return {name.removeprefix("calvin_scene_"): (int(first), int(last)) for name, (first, last) in info.items()}


def _scene_of(frame: int, scenes: dict[str, tuple[int, int]]) -> str:
    for scene, (first, last) in scenes.items():
        if first <= frame <= last:
            return scene
    return "D" if not scenes else "unknown"  # single-scene splits (D->D, ABC->D's validation) are scene D


def read_frame(folder: Path, frame: int) -> dict[str, np.ndarray]:
    path = folder / f"episode_{frame:07d}.npz"
    try:
        with np.load(path) as arrays:
            return {key: arrays[key] for key in (*CAMERAS, "robot_obs", "rel_actions") if key in arrays.files}
    except FileNotFoundError:
        raise StoreError(f"frame file {path} is missing (an annotation names frame {frame}); is the split "
                         f"complete?") from None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
        raise StoreError(f"frame file {path} is truncated or corrupt ({error}); download it again, then re-run "
                         f"the import with --resume") from None


def _read_window(folder: Path, window: AnnotatedWindow, cameras: Sequence[str], image_size: int) -> Episode:
    images = {camera: [] for camera in cameras}
    states, actions = [], []
    for frame in range(window.start, window.end + 1):
        arrays = read_frame(folder, frame)
        missing = [key for key in (*cameras, "robot_obs", "rel_actions") if key not in arrays]
        if missing:
            raise StoreError(f"frame file {folder / f'episode_{frame:07d}.npz'} has no {', '.join(missing)}")
        for camera in cameras:
            images[camera].append(square_image(arrays[camera], image_size))
        states.append(arrays["robot_obs"])
        actions.append(arrays["rel_actions"])
    return Episode(task=window.task, instruction=window.instruction, scene=window.scene, seed=window.start,
                   images={camera: np.stack(frames) for camera, frames in images.items()},
                   state=np.stack(states).astype(np.float32), actions=np.stack(actions).astype(np.float32))


def import_calvin(split: str | Path, out: str | Path, *, folder: str = "training", image_size: int = 200,
                  cameras: Sequence[str] = CAMERAS, overwrite: bool = False, resume: bool = False,
                  progress: bool = True) -> EpisodeStore:
    """Write the annotated windows of `split/folder` (a CALVIN dataset such as task_ABC_D) to a store at `out`.

    Every camera is resized to `image_size` (rgb_static is 200x200, rgb_gripper 84x84 in CALVIN). State is
    `robot_obs` (15-D), actions are `rel_actions` (7-D).
    """
    split = Path(split)
    source = split / folder
    if not source.is_dir():
        found = sorted(p.name for p in split.iterdir() if p.is_dir()) if split.is_dir() else []
        raise ConfigError(f"{split} is not a CALVIN split: no {folder}/ folder (found: {', '.join(found) or 'nothing'}"
                          f"); point at a dataset such as .../task_ABC_D")
    for camera in cameras:
        if camera not in CAMERAS:
            raise UnknownNameError("CALVIN camera", camera, CAMERAS)
    if not 32 <= image_size <= 400:
        raise ConfigError(f"image_size {image_size} is out of range 32 to 400")
    windows = annotated_windows(source)
    if not windows:
        raise StoreError(f"{source / ANNOTATIONS} holds no annotated windows")
    layout = FrameLayout(tuple(cameras), image_size, STATE_DIM, ACTION_DIM)
    options = {"image_size": image_size, "cameras": list(cameras), "dataset": str(split.resolve())}
    metadata = {"benchmark": "calvin", "benchmark_options": options,
                "source": f"CALVIN {split.name}/{folder}", "dataset": str(split.resolve()), "folder": folder,
                "scenes": sorted({window.scene for window in windows})}
    writer = EpisodeStoreWriter(out, layout, overwrite=overwrite, resume=resume, metadata=metadata)
    with writer:
        done = len(writer)
        for row, window in zip(writer.index, windows):
            if (row["seed"], row["task"]) != (window.start, window.task):
                raise StoreError(f"cannot resume {writer.partial}: it was imported from other annotations "
                                 f"(episode {row['episode']} starts at frame {row['seed']}, here {window.start})")
        for window in tqdm(windows[done:], desc=f"import {split.name}/{folder}", unit="window",
                           initial=done, total=len(windows), disable=not progress):
            writer.add(_read_window(source, window, cameras, image_size))
        return writer.commit()
