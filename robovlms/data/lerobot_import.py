"""Import a local LeRobot dataset (codebase version v2.0, v2.1 or v3.0) into an episode store.

A LeRobot dataset is described by `meta/info.json`: its `codebase_version`, `fps`, `features` (name -> dtype and
shape) and the templates of its file paths. Frames (state, action, timestamp, task_index) live in parquet files and
cameras in MP4 files:

    v2.x  one parquet and one MP4 per camera for each episode, in chunks of `chunks_size` episodes
          (data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet); episodes in meta/episodes.jsonl,
          tasks in meta/tasks.jsonl. v2.0 and v2.1 differ only in their statistics files, which are not read.
    v3.0  several episodes per parquet file and per MP4 file (data/chunk-{chunk_index:03d}/file-{file_index:03d}...);
          meta/episodes/chunk-*/file-*.parquet says where each episode lies: data/chunk_index, data/file_index, and
          for each camera videos/<key>/chunk_index, file_index and from_timestamp, where its frames start in the MP4;
          tasks in meta/tasks.parquet (indexed by the task string).

A spec (`LeRobotSpec`, built in by name or a YAML file) says which features become the store's cameras, state and
action. As LeRobot does, the image of a frame is the video frame at the row's `timestamp` (plus the episode's
`from_timestamp` in v3.0) within `TOLERANCE_S`. Episodes are read and flushed to the store's journal one at a time,
so an interrupted import re-run with `resume=True` continues from the first episode not yet written. The store's
statistics are computed from the imported frames; the dataset's own meta/stats.json is not read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import av
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm.auto import tqdm

from robovlms.benchmark import square_image
from robovlms.data.store import Episode, EpisodeStore, EpisodeStoreWriter, FrameLayout
from robovlms.errors import ConfigError, StoreError, UnknownNameError, config_error
from robovlms.yaml_files import read_yaml_mapping

SUPPORTED_VERSIONS = ("v2.0", "v2.1", "v3.0")
TOLERANCE_S = 1e-4  # LeRobotDataset's default tolerance_s between a row's timestamp and its video frame
INFO = Path("meta") / "info.json"
SIMPLER_ROBOTS = ("widowx", "google_robot")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureSelection(_Strict):
    key: str  # a 1-D numeric feature of the dataset, e.g. observation.state
    indices: list[int] | None = Field(None, min_length=1)  # the dims to keep, in this order; None keeps them all


class GripperRule(_Strict):
    """How the last selected action dim becomes the store's gripper: +1.0 open, -1.0 closed."""

    open_above: float | None = None
    open_below: float | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> GripperRule:
        if (self.open_above is None) == (self.open_below is None):
            raise ValueError("give exactly one of open_above and open_below")
        return self

    def apply(self, values: np.ndarray) -> np.ndarray:
        is_open = values > self.open_above if self.open_above is not None else values < self.open_below
        return np.where(is_open, 1.0, -1.0).astype(np.float32)


class LeRobotSpec(_Strict):
    """How a LeRobot dataset's features become a store's frames, and what the store records about them."""

    cameras: dict[str, str] = Field(min_length=1)  # store camera -> LeRobot video key
    state: FeatureSelection
    action: FeatureSelection  # the selected dims are the store's action; the last one is the gripper
    gripper: GripperRule
    benchmark: Literal["simpler"] | None = None  # the benchmark the store's policies are evaluated on
    benchmark_options: dict[str, Any] = {}
    # A store episode's task: its LeRobot task string, or the dataset's folder name for every episode (one task, so
    # that per-task holdouts and subsets find more than one episode when every instruction is different).
    task: Literal["instruction", "dataset"] = "instruction"

    @model_validator(mode="after")
    def _simpler_robot(self) -> LeRobotSpec:
        if self.benchmark == "simpler" and self.benchmark_options.get("robot") not in SIMPLER_ROBOTS:
            raise ValueError(f"benchmark simpler needs benchmark_options.robot, one of {', '.join(SIMPLER_ROBOTS)} "
                             f"(got {self.benchmark_options.get('robot')!r})")
        return self


# The community conversions of Open-X's Bridge V2 and RT-1 (fractal) data to LeRobot (codebase v2.0),
# IPEC-COMMUNITY/bridge_orig_lerobot and IPEC-COMMUNITY/fractal20220817_data_lerobot. Fractal's info.json lists
# observation.images.image (AV1 video, 3 fps), observation.state 8-D (xyz, quaternion xyzw, gripper) and action 7-D
# (xyz, roll/pitch/yaw, gripper). Bridge's camera observation.images.image_0, state 8-D (xyz, rpy, pad, gripper) and
# action 7-D come from GR00T's SimplerEnv configuration for that dataset, not from its info.json. Both were written
# after OpenVLA's Open-X standardisation transforms, whose gripper action is 1 open, 0 closed. Every instruction of
# these datasets is different, so each is one task (the dataset) and the instruction conditions the policy. A spec
# file overrides any of this.
BUILTIN_SPECS = {
    "bridge": LeRobotSpec(cameras={"rgb_static": "observation.images.image_0"},
                          state=FeatureSelection(key="observation.state"), action=FeatureSelection(key="action"),
                          gripper=GripperRule(open_above=0.5), benchmark="simpler",
                          benchmark_options={"robot": "widowx"}, task="dataset"),
    "fractal": LeRobotSpec(cameras={"rgb_static": "observation.images.image"},
                           state=FeatureSelection(key="observation.state"), action=FeatureSelection(key="action"),
                           gripper=GripperRule(open_above=0.5), benchmark="simpler",
                           benchmark_options={"robot": "google_robot"}, task="dataset"),
}


def load_spec(spec: LeRobotSpec | str | Path) -> LeRobotSpec:
    """A spec from itself, a built-in name (bridge, fractal) or a YAML file; every error names the bad key."""
    if isinstance(spec, LeRobotSpec):
        return spec
    if str(spec) in BUILTIN_SPECS:
        return BUILTIN_SPECS[str(spec)]
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        raise UnknownNameError("LeRobot spec (a built-in name or a YAML file)", str(spec), BUILTIN_SPECS)
    try:
        return LeRobotSpec.model_validate(read_yaml_mapping(path, "LeRobot import spec"))
    except ValidationError as error:
        raise config_error(f"invalid LeRobot import spec {path}", LeRobotSpec, error) from None


@dataclass(frozen=True)
class SourceEpisode:
    """Where one LeRobot episode lies on disk."""

    index: int  # episode_index
    length: int  # frames
    data_file: Path
    videos: dict[str, tuple[Path, float]]  # video key -> (MP4 file, from_timestamp: where the episode starts in it)


def read_info(dataset: Path) -> dict[str, Any]:
    """meta/info.json of a LeRobot dataset of a supported codebase version."""
    path = dataset / INFO
    if not path.is_file():
        raise ConfigError(f"{dataset} is not a LeRobot dataset: {path} is missing (point at the folder holding "
                          f"meta/, data/ and videos/)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StoreError(f"{path} is not valid JSON: {error}") from None
    version = info.get("codebase_version")
    if version not in SUPPORTED_VERSIONS:
        raise StoreError(f"{dataset} is a LeRobot dataset of codebase version {version!r}; this importer reads "
                         f"{', '.join(SUPPORTED_VERSIONS)} (convert it with LeRobot's conversion scripts)")
    required = ["fps", "features", "data_path"] + (["chunks_size"] if version != "v3.0" else [])
    missing = [key for key in required if key not in info]
    if missing:
        raise StoreError(f"{path} lacks {', '.join(missing)}")
    return info


def check_spec(spec: LeRobotSpec, info: dict[str, Any], dataset: Path) -> None:
    """Every key of the spec is a feature of the dataset of the right kind, and every index is in range."""
    features = info["features"]
    videos = [key for key, feature in features.items() if feature["dtype"] == "video"]
    for camera, key in spec.cameras.items():
        if key in features and features[key]["dtype"] == "image":
            raise ConfigError(f"spec camera {camera}: {key} is stored as images in the parquet files; image "
                              f"features not supported, only video (the dataset's video features: "
                              f"{', '.join(videos) or 'none'})")
        if key not in videos:
            raise ConfigError(f"spec camera {camera}: {key!r} is not a video feature of {dataset}; its video "
                              f"features: {', '.join(videos) or 'none'}")
    vectors = [key for key, feature in features.items()
               if feature["dtype"] not in ("video", "image", "string") and len(feature.get("shape", ())) == 1]
    for name, selection in (("state", spec.state), ("action", spec.action)):
        if selection.key not in vectors:
            raise ConfigError(f"spec {name}.key: {selection.key!r} is not a vector feature of {dataset}; its vector "
                              f"features: {', '.join(vectors)}")
        size = features[selection.key]["shape"][0]
        bad = [i for i in selection.indices or [] if not 0 <= i < size]
        if bad:
            raise ConfigError(f"spec {name}.indices {bad} are out of range: {selection.key} has {size} dims "
                              f"(indices 0 to {size - 1})")


def _selected(selection: FeatureSelection, info: dict[str, Any]) -> list[int]:
    return selection.indices or list(range(info["features"][selection.key]["shape"][0]))


def source_episodes(dataset: Path, info: dict[str, Any], video_keys: Sequence[str]) -> list[SourceEpisode]:
    """Every episode of the dataset, by episode_index, with its files."""
    if video_keys and not info.get("video_path"):
        raise StoreError(f"{dataset / INFO} has no video_path, but the spec reads videos {', '.join(video_keys)}")
    if info["codebase_version"] == "v3.0":
        return _episodes_v30(dataset, info, video_keys)
    return _episodes_v2(dataset, info, video_keys)


def _episodes_v2(dataset: Path, info: dict[str, Any], video_keys: Sequence[str]) -> list[SourceEpisode]:
    path = dataset / "meta" / "episodes.jsonl"
    if not path.is_file():
        raise StoreError(f"{path} is missing (the episode list of a v2 dataset)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    episodes = []
    for row in sorted(rows, key=lambda row: row["episode_index"]):
        index = int(row["episode_index"])
        names = {"episode_chunk": index // int(info["chunks_size"]), "episode_index": index}
        videos = {key: (dataset / info["video_path"].format(video_key=key, **names), 0.0) for key in video_keys}
        episodes.append(SourceEpisode(index, int(row["length"]), dataset / info["data_path"].format(**names), videos))
    return episodes


def _episodes_v30(dataset: Path, info: dict[str, Any], video_keys: Sequence[str]) -> list[SourceEpisode]:
    files = sorted((dataset / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise StoreError(f"{dataset / 'meta' / 'episodes'} holds no chunk-*/file-*.parquet (the episode list of a "
                         f"v3.0 dataset)")
    columns = ["episode_index", "length", "data/chunk_index", "data/file_index"]
    for key in video_keys:
        columns += [f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp"]
    try:
        table = pd.concat([pd.read_parquet(file, columns=columns) for file in files], ignore_index=True)
    except (KeyError, ValueError) as error:  # pyarrow names a missing column in either
        raise StoreError(f"the episode files {files[0].parent.parent} lack a column ({error}); expected "
                         f"{', '.join(columns)}") from None
    episodes = []
    for row in table.sort_values("episode_index").itertuples(index=False):
        row = dict(zip(columns, row))
        data = info["data_path"].format(chunk_index=int(row["data/chunk_index"]),
                                        file_index=int(row["data/file_index"]))
        videos = {key: (dataset / info["video_path"].format(video_key=key,
                                                            chunk_index=int(row[f"videos/{key}/chunk_index"]),
                                                            file_index=int(row[f"videos/{key}/file_index"])),
                        float(row[f"videos/{key}/from_timestamp"]))
                  for key in video_keys}
        episodes.append(SourceEpisode(int(row["episode_index"]), int(row["length"]), dataset / data, videos))
    return episodes


def read_tasks(dataset: Path, info: dict[str, Any]) -> dict[int, str]:
    """task_index -> task string (the instruction)."""
    if info["codebase_version"] != "v3.0":
        path = dataset / "meta" / "tasks.jsonl"
        if not path.is_file():
            raise StoreError(f"{path} is missing (the task strings of a v2 dataset)")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {int(row["task_index"]): str(row["task"]) for row in rows}
    path = dataset / "meta" / "tasks.parquet"
    if not path.is_file():
        raise StoreError(f"{path} is missing (the task strings of a v3.0 dataset)")
    tasks = pd.read_parquet(path)
    strings = tasks["task"] if "task" in tasks.columns else tasks.index  # LeRobot indexes the table by the string
    return {int(index): str(task) for index, task in zip(tasks["task_index"], strings)}


def check_files_exist(episodes: Sequence[SourceEpisode]) -> None:
    """Every parquet and MP4 file the episodes read exists, before anything is written."""
    needed = dict.fromkeys(path for episode in episodes
                           for path in (episode.data_file, *(file for file, _ in episode.videos.values())))
    missing = [path for path in needed if not path.is_file()]
    if missing:
        listed = ", ".join(str(path) for path in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                                                 else "")
        raise StoreError(f"{len(missing)} file(s) of the selected episodes are missing: {listed}; download them "
                         f"(or import fewer episodes with --episodes)")


def decode_frames(path: Path, timestamps: Sequence[float], image_size: int) -> np.ndarray:
    """(T, image_size, image_size, 3) uint8: for each timestamp (seconds into the MP4) the frame within
    TOLERANCE_S of it. Decoding starts at the key frame before the first timestamp, as LeRobot's PyAV backend does."""
    wanted = np.asarray(timestamps, dtype=np.float64)
    order = np.argsort(wanted, kind="stable")
    images = np.empty((len(wanted), image_size, image_size, 3), dtype=np.uint8)
    found = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            container.seek(int(wanted[order[0]] / stream.time_base), stream=stream)
            for frame in container.decode(stream):
                image = None
                while found < len(wanted) and abs(frame.time - wanted[order[found]]) < TOLERANCE_S:
                    image = square_image(frame.to_ndarray(format="rgb24"), image_size) if image is None else image
                    images[order[found]] = image
                    found += 1
                if found == len(wanted) or frame.time > wanted[order[found]]:
                    break
    except av.FFmpegError as error:
        raise StoreError(f"cannot decode {path}: {error}; is the file complete?") from None
    if found < len(wanted):
        raise StoreError(f"{path} has no frame at {wanted[order[found]]:.4f} s (within {TOLERANCE_S} s); its "
                         f"timestamps do not match the dataset's parquet rows")
    return images


def _vectors(frames: pd.DataFrame, key: str) -> np.ndarray:
    return np.asarray(frames[key].tolist(), dtype=np.float32).reshape(len(frames), -1)  # (T, dims)


class _DataFiles:
    """The frames of one episode from its parquet file; v3.0 files hold several episodes, so the last file read is
    kept for the next episode."""

    def __init__(self, columns: Sequence[str]):
        self.columns = list(columns)
        self.path: Path | None = None
        self.table: pd.DataFrame | None = None

    def frames(self, episode: SourceEpisode) -> pd.DataFrame:
        if episode.data_file != self.path:
            try:
                self.table = pd.read_parquet(episode.data_file, columns=self.columns)
            except (KeyError, ValueError, OSError) as error:
                raise StoreError(f"cannot read {episode.data_file} (columns {', '.join(self.columns)}): "
                                 f"{error}") from None
            self.path = episode.data_file
        frames = self.table[self.table["episode_index"] == episode.index].sort_values("frame_index")
        if len(frames) != episode.length:
            raise StoreError(f"{episode.data_file} holds {len(frames)} frames of episode {episode.index}; the "
                             f"dataset's episode list says {episode.length}")
        return frames


def _read_episode(episode: SourceEpisode, frames: pd.DataFrame, spec: LeRobotSpec, info: dict[str, Any],
                  tasks: dict[int, str], scene: str, image_size: int) -> Episode:
    task_index = int(frames["task_index"].iloc[0])
    if task_index not in tasks:
        raise StoreError(f"episode {episode.index} has task_index {task_index}, which the dataset's task list lacks")
    instruction = tasks[task_index]
    timestamps = frames["timestamp"].to_numpy(dtype=np.float64)
    images = {}
    for camera, key in spec.cameras.items():
        path, start = episode.videos[key]
        images[camera] = decode_frames(path, start + timestamps, image_size)
    state = _vectors(frames, spec.state.key)[:, _selected(spec.state, info)]
    actions = _vectors(frames, spec.action.key)[:, _selected(spec.action, info)]
    actions[:, -1] = spec.gripper.apply(actions[:, -1])
    return Episode(task=instruction if spec.task == "instruction" else scene, instruction=instruction, scene=scene,
                   seed=episode.index, images=images, state=state, actions=actions)


def _episode_stream(episodes: Sequence[SourceEpisode], spec: LeRobotSpec, info: dict[str, Any],
                    tasks: dict[int, str], scene: str, image_size: int) -> Iterator[Episode]:
    data = _DataFiles(list(dict.fromkeys(["episode_index", "frame_index", "timestamp", "task_index", spec.state.key,
                                          spec.action.key])))
    for episode in episodes:
        yield _read_episode(episode, data.frames(episode), spec, info, tasks, scene, image_size)


def import_lerobot(dataset: str | Path, out: str | Path, *, spec: LeRobotSpec | str | Path, image_size: int = 224,
                   episodes: int | None = None, overwrite: bool = False, resume: bool = False,
                   progress: bool = True) -> EpisodeStore:
    """Write the episodes of the LeRobot dataset folder `dataset` (all, or the first `episodes`) to a store at `out`.

    Every camera is resized to a square `image_size` (bilinear). A store episode's scene is the dataset's folder
    name, its seed the LeRobot episode_index, its instruction the LeRobot task string.
    """
    dataset = Path(dataset).resolve()
    spec = load_spec(spec)
    if not 32 <= image_size <= 400:
        raise ConfigError(f"image_size {image_size} is out of range 32 to 400")
    if episodes is not None and episodes < 1:
        raise ConfigError(f"--episodes must be at least 1, got {episodes}")
    info = read_info(dataset)
    check_spec(spec, info, dataset)
    layout = FrameLayout(tuple(spec.cameras), image_size, len(_selected(spec.state, info)),
                         len(_selected(spec.action, info)))
    options = {**spec.benchmark_options, "image_size": image_size, "cameras": list(spec.cameras)}
    if spec.benchmark is not None:
        from robovlms.benchmark import create_benchmark

        create_benchmark(spec.benchmark, **options).check_frames(layout.cameras, image_size, layout.action_dim,
                                                                 f"the spec's selection of {dataset}")
    selected = source_episodes(dataset, info, list(dict.fromkeys(spec.cameras.values())))[:episodes]
    if not selected:
        raise StoreError(f"{dataset} holds no episodes")
    check_files_exist(selected)
    tasks = read_tasks(dataset, info)
    scene = dataset.name
    metadata = {"benchmark_options": options,
                "source": f"LeRobot {dataset.name}", "dataset": str(dataset),
                "codebase_version": info["codebase_version"], "fps": info["fps"], "spec": spec.model_dump()}
    if spec.benchmark is not None:  # a store without one trains under any benchmark a sweep names
        metadata["benchmark"] = spec.benchmark
    writer = EpisodeStoreWriter(out, layout, overwrite=overwrite, resume=resume, metadata=metadata)
    with writer:
        done = len(writer)
        if done > len(selected):
            raise StoreError(f"cannot resume {writer.partial}: it holds {done} episodes, more than the {len(selected)} "
                             f"selected")
        for row, episode in zip(writer.index, selected):
            if (row["seed"], row["length"]) != (episode.index, episode.length):
                raise StoreError(f"cannot resume {writer.partial}: it was imported from other episodes (its episode "
                                 f"{row['episode']} is LeRobot episode {row['seed']} of {row['length']} frames, here "
                                 f"episode {episode.index} of {episode.length})")
        stream = _episode_stream(selected[done:], spec, info, tasks, scene, image_size)
        for episode in tqdm(stream, desc=f"import {dataset.name}", unit="episode", initial=done, total=len(selected),
                            disable=not progress):
            writer.add(episode)
        return writer.commit()
