"""Small LeRobot datasets written by tests, in LeRobot's own on-disk layouts (codebase v2.x and v3.0): the same
meta files, path templates, parquet columns and MP4 videos (H.264 through PyAV, a key frame every 2 frames as
LeRobot encodes them), with values that say which episode and frame they come from."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd

FPS = 5
SIZE = 32  # height and width of every camera
CAMERAS = ("observation.images.image_0", "observation.images.image_1")
EPISODES = [  # (task string, frames)
    ("put the spoon on the towel", 5),
    ("put the carrot on the plate", 4),
    ("put the spoon on the towel", 6),
    ("stack the green block on the yellow block", 3),
]
TASKS = list(dict.fromkeys(task for task, _ in EPISODES))  # task_index -> task string


def pixel(episode: int, frame: int, camera: int = 0) -> int:
    """The grey level of every pixel of a frame: distinct for every (episode, frame) beyond codec error."""
    value = 12 + 48 * episode + 8 * frame
    return value if camera == 0 else 255 - value


def state(episode: int, frame: int) -> np.ndarray:
    """8-D like Bridge's (xyz, rpy, pad, gripper): dim 0 the episode, dim 1 the frame, dim d of the others d."""
    return np.array([episode, frame, 2, 3, 4, 5, 6, 7], dtype=np.float32)


def action(episode: int, frame: int) -> np.ndarray:
    """7-D (xyz, rpy deltas, gripper 1 open / 0 closed): the gripper closes on odd frames."""
    deltas = np.random.default_rng(100 * episode + frame).uniform(-0.05, 0.05, 6)
    return np.concatenate([deltas, [0.0 if frame % 2 else 1.0]]).astype(np.float32)


def _features(image_dtype: str) -> dict:
    features = {key: {"dtype": image_dtype, "shape": [SIZE, SIZE, 3], "names": ["height", "width", "channels"]}
                for key in CAMERAS}
    features["observation.state"] = {"dtype": "float32", "shape": [8], "names": None}
    features["action"] = {"dtype": "float32", "shape": [7], "names": None}
    for key, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                       ("index", "int64"), ("task_index", "int64")):
        features[key] = {"dtype": dtype, "shape": [1], "names": None}
    return features


def _frames(episode: int, first_index: int, fps: int) -> pd.DataFrame:
    task, length = EPISODES[episode]
    return pd.DataFrame({
        "observation.state": [state(episode, f) for f in range(length)],
        "action": [action(episode, f) for f in range(length)],
        "timestamp": (np.arange(length) / fps).astype(np.float32),
        "frame_index": np.arange(length),
        "episode_index": np.full(length, episode),
        "index": first_index + np.arange(length),
        "task_index": np.full(length, TASKS.index(task)),
    })


def write_video(path: Path, episodes: list[int], camera: int, codec: str, fps: int) -> None:
    """The frames of `episodes` one after another in one MP4, timestamps continuing across episodes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scheduling = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        _encode(path, episodes, camera, codec, fps)
    finally:
        # SVT-AV1, run as root, switches the calling thread to real-time SCHED_FIFO at priority 99; processes
        # started afterwards (sweep workers) would inherit it and starve each other on a small machine.
        os.sched_setscheduler(0, *scheduling)


def _encode(path: Path, episodes: list[int], camera: int, codec: str, fps: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options={"g": "2"})
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        frames = [pixel(e, f, camera) for e in episodes for f in range(EPISODES[e][1])]
        for pts, value in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.full((SIZE, SIZE, 3), value, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_lerobot_dataset(root: Path, version: str = "v3.0", episodes_per_file: int = 2, image_dtype: str = "video",
                          codec: str = "libx264", fps: int = FPS) -> Path:
    """EPISODES as a LeRobot dataset at `root`, videos encoded with `codec` (libx264, or libsvtav1 as LeRobot
    does by default). v3.0 packs `episodes_per_file` episodes in each data file and `episodes_per_file + 1` in each
    video file (the two are grouped independently, as LeRobot does by size)."""
    info = {"codebase_version": version, "robot_type": "widowx", "total_episodes": len(EPISODES),
            "total_frames": sum(length for _, length in EPISODES), "total_tasks": len(TASKS), "chunks_size": 1000,
            "fps": fps, "splits": {"train": f"0:{len(EPISODES)}"}, "features": _features(image_dtype)}
    starts = np.cumsum([0] + [length for _, length in EPISODES]).tolist()
    (root / "meta").mkdir(parents=True)
    # statistics a reader must not trust: the store computes its own
    (root / "meta" / "stats.json").write_text(json.dumps({"action": {"min": [-9.0] * 7, "max": [9.0] * 7}}))
    if version in ("v2.0", "v2.1"):  # the same layout; v2.1 only changed the statistics files
        info.update(data_path="data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                    video_path="videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
                    total_chunks=1, total_videos=len(EPISODES) * len(CAMERAS))
        _write_v21(root, info, starts, codec)
    else:
        info.update(data_path="data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                    video_path="videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
                    data_files_size_in_mb=100, video_files_size_in_mb=500)
        _write_v30(root, info, starts, episodes_per_file, codec)
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=4))
    return root


def _write_v21(root: Path, info: dict, starts: list[int], codec: str) -> None:
    lines = [json.dumps({"episode_index": e, "tasks": [task], "length": length})
             for e, (task, length) in enumerate(EPISODES)]
    (root / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    (root / "meta" / "tasks.jsonl").write_text(
        "\n".join(json.dumps({"task_index": i, "task": task}) for i, task in enumerate(TASKS)) + "\n")
    for e in range(len(EPISODES)):
        names = {"episode_chunk": e // info["chunks_size"], "episode_index": e}
        path = root / info["data_path"].format(**names)
        path.parent.mkdir(parents=True, exist_ok=True)
        _frames(e, starts[e], info["fps"]).to_parquet(path, index=False)
        if info["features"][CAMERAS[0]]["dtype"] == "video":
            for camera, key in enumerate(CAMERAS):
                write_video(root / info["video_path"].format(video_key=key, **names), [e], camera, codec, info["fps"])


def _write_v30(root: Path, info: dict, starts: list[int], episodes_per_file: int, codec: str) -> None:
    rows = [{"episode_index": e, "tasks": [task], "length": length, "dataset_from_index": starts[e],
             "dataset_to_index": starts[e + 1], "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
            for e, (task, length) in enumerate(EPISODES)]
    for file, first in enumerate(range(0, len(EPISODES), episodes_per_file)):
        group = list(range(first, min(first + episodes_per_file, len(EPISODES))))
        path = root / info["data_path"].format(chunk_index=0, file_index=file)
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.concat([_frames(e, starts[e], info["fps"]) for e in group], ignore_index=True).to_parquet(path, index=False)
        for e in group:
            rows[e].update({"data/chunk_index": 0, "data/file_index": file})
    per_video = episodes_per_file + 1
    videos = info["features"][CAMERAS[0]]["dtype"] == "video"
    for file, first in enumerate(range(0, len(EPISODES), per_video) if videos else []):
        group = list(range(first, min(first + per_video, len(EPISODES))))
        for camera, key in enumerate(CAMERAS):
            write_video(root / info["video_path"].format(video_key=key, chunk_index=0, file_index=file), group,
                        camera, codec, info["fps"])
            start = 0.0
            for e in group:
                end = start + EPISODES[e][1] / info["fps"]
                rows[e].update({f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": file,
                                f"videos/{key}/from_timestamp": start, f"videos/{key}/to_timestamp": end})
                start = end
    path = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    pd.DataFrame({"task_index": range(len(TASKS))}, index=pd.Index(TASKS)).to_parquet(root / "meta" / "tasks.parquet")
