"""The episode store: one directory of memory-mapped frames, an episode index and action statistics.

Layout of a finished store:
    meta.json          schema version, what each frame holds, statistics, provenance, the SHA-256 of every other
                       file (written last)
    episodes.parquet   one row per episode: task, instruction, scene, seed, first frame, length
    images.<camera>.u8 (frames, H, W, 3) uint8, raw, memory-mapped
    state.f32          (frames, state_dim) float32
    actions.f32        (frames, action_dim) float32

A store is written into `<path>.partial/` and renamed into place only once complete, so a crash never leaves a
directory that loads. The partial directory keeps a journal of the episodes already flushed, so an interrupted
write (a long import) resumes where it stopped.

Opening a store checks what is cheap (meta.json and episodes.parquet parse, array file sizes, every episode within
the frames, finite statistics); `verify_store` reads every byte against the checksums. Stores written before
checksums were recorded still open; `verify_store` says they have none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow
from tqdm.auto import tqdm

from robovlms.atomic_files import write_json_atomically
from robovlms.errors import ConfigError, StoreError

SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"
VALIDATION_SEED = 7919
INDEX_COLUMNS = ["episode", "task", "instruction", "scene", "seed", "start", "length"]
INDEX_FILE = "episodes.parquet"
META_FILE = "meta.json"
CHECKSUM_CHUNK = 8 << 20


@dataclass(frozen=True)
class FrameLayout:
    """What every frame of a store holds."""

    cameras: tuple[str, ...]
    image_size: int
    state_dim: int
    action_dim: int

    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)


@dataclass(frozen=True)
class Statistics:
    """Per-dimension statistics of one array over every frame of a store."""

    p01: list[float]
    p99: list[float]
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]

    @classmethod
    def of(cls, values: np.ndarray) -> Statistics:
        values = np.asarray(values, dtype=np.float64)
        return cls(p01=np.percentile(values, 1, axis=0).tolist(), p99=np.percentile(values, 99, axis=0).tolist(),
                   mean=values.mean(axis=0).tolist(), std=values.std(axis=0).tolist(),
                   min=values.min(axis=0).tolist(), max=values.max(axis=0).tolist())


@dataclass
class Episode:
    task: str
    instruction: str
    scene: str
    seed: int
    images: dict[str, np.ndarray]  # camera -> (T, H, W, 3) uint8
    state: np.ndarray  # (T, state_dim) float32
    actions: np.ndarray  # (T, action_dim) float32

    def __len__(self) -> int:
        return len(self.actions)


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _array_files(layout: FrameLayout) -> dict[str, tuple[str, np.dtype, tuple[int, ...]]]:
    files = {f"images.{camera}": (f"images.{camera}.u8", np.dtype(np.uint8), layout.image_shape())
             for camera in layout.cameras}
    files["state"] = ("state.f32", np.dtype(np.float32), (layout.state_dim,))
    files["actions"] = ("actions.f32", np.dtype(np.float32), (layout.action_dim,))
    return files


class EpisodeStoreWriter:
    """Appends episodes to `<path>.partial/`; `commit()` computes statistics and renames it to `path`.

    Use as a context manager: on an exception the partial directory stays (never loadable) for `resume=True`.
    """

    def __init__(self, path: str | Path, layout: FrameLayout, *, overwrite: bool = False, resume: bool = False,
                 metadata: dict[str, Any] | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.layout = layout
        self.overwrite = overwrite
        self.metadata = metadata or {}
        if self.path.exists() and not overwrite:
            raise StoreError(f"{self.path} already exists; pass --overwrite to replace it")
        if self.partial.exists() and not resume:
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        self._journal = self.partial / "journal.jsonl"
        self.index: list[dict[str, Any]] = self._read_journal() if resume else []
        if resume and self.index:
            self._check_resumed_layout()
        frames = sum(row["length"] for row in self.index)
        self._files = {}
        for key, (filename, dtype, shape) in _array_files(layout).items():
            handle = open(self.partial / filename, "ab")
            handle.truncate(frames * int(np.prod(shape)) * dtype.itemsize)  # drop frames of an unjournaled episode
            handle.seek(0, os.SEEK_END)
            self._files[key] = handle
        write_json_atomically(self.partial / "layout.json", asdict(layout))
        if not resume:
            self._journal.write_text("")

    def _read_journal(self) -> list[dict[str, Any]]:
        if not self._journal.exists():
            return []
        rows = []
        for line in self._journal.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by the crash: that episode was never completed
        return rows

    def _check_resumed_layout(self) -> None:
        saved = json.loads((self.partial / "layout.json").read_text())
        saved["cameras"] = tuple(saved["cameras"])
        if FrameLayout(**saved) != self.layout:
            raise StoreError(f"cannot resume {self.partial}: it was written with {saved}, not {asdict(self.layout)}")

    @property
    def frames(self) -> int:
        return sum(row["length"] for row in self.index)

    def __len__(self) -> int:
        return len(self.index)

    def add(self, episode: Episode) -> None:
        length = len(episode)
        if length == 0:
            raise ConfigError(f"episode of task {episode.task!r} has no frames")
        arrays = {f"images.{camera}": episode.images.get(camera) for camera in self.layout.cameras}
        arrays["state"], arrays["actions"] = episode.state, episode.actions
        for key, (_, dtype, shape) in _array_files(self.layout).items():
            array = arrays[key]
            if array is None:
                raise ConfigError(f"episode of task {episode.task!r} has no camera {key.split('.', 1)[1]!r}; "
                                  f"the store holds {list(self.layout.cameras)}")
            if array.shape != (length, *shape):
                raise ConfigError(f"episode array {key} has shape {array.shape}; expected {(length, *shape)}")
        for key in ("state", "actions"):
            bad = np.flatnonzero(~np.isfinite(arrays[key]).all(axis=1))
            if len(bad):
                raise StoreError(f"episode {len(self.index)} (task {episode.task!r}, scene {episode.scene!r}, seed "
                                 f"{episode.seed}) has non-finite {key} at frames {bad[:5].tolist()}; it was not "
                                 f"written to {self.partial}")
        for key, (_, dtype, _) in _array_files(self.layout).items():
            handle = self._files[key]
            handle.write(np.ascontiguousarray(arrays[key], dtype=dtype).tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        row = {"episode": len(self.index), "task": episode.task, "instruction": episode.instruction,
               "scene": episode.scene, "seed": int(episode.seed), "start": self.frames, "length": length}
        with open(self._journal, "a") as journal:
            journal.write(json.dumps(row) + "\n")
            journal.flush()
            os.fsync(journal.fileno())
        self.index.append(row)

    def commit(self) -> EpisodeStore:
        for handle in self._files.values():
            handle.close()
        if not self.index:
            raise StoreError(f"no episodes were written to {self.path}")
        frames = self.frames
        files = _array_files(self.layout)
        actions = np.memmap(self.partial / files["actions"][0], np.float32, "r", shape=(frames, self.layout.action_dim))
        state = np.memmap(self.partial / files["state"][0], np.float32, "r", shape=(frames, self.layout.state_dim))
        pd.DataFrame(self.index, columns=INDEX_COLUMNS).to_parquet(self.partial / INDEX_FILE, index=False)
        checksums = {name: _sha256(self.partial / name) for name in _store_files(self.layout)}
        meta = {
            "schema_version": SCHEMA_VERSION,
            "layout": asdict(self.layout),
            "episodes": len(self.index),
            "frames": frames,
            "statistics": {"actions": asdict(Statistics.of(actions)), "state": asdict(Statistics.of(state))},
            "metadata": self.metadata,
            "checksums": {"algorithm": "sha256", "files": checksums},
        }
        write_json_atomically(self.partial / META_FILE, meta)
        self._journal.unlink()
        (self.partial / "layout.json").unlink()
        _fsync_directory(self.partial)
        if self.path.exists():
            replaced = self.path.with_name(self.path.name + ".replaced")
            os.rename(self.path, replaced)
            os.rename(self.partial, self.path)
            shutil.rmtree(replaced)
        else:
            os.rename(self.partial, self.path)
        _fsync_directory(self.path.parent)
        return EpisodeStore(self.path)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()

    def __enter__(self) -> EpisodeStoreWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close()


class EpisodeStore:
    """A finished store, memory-mapped: nothing is loaded until indexed. With `verify`, every file is also checked
    against its checksum (`verify_store`), once per change of the files: the verdict is cached."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.exists():
            partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
            if self.path.name.endswith(PARTIAL_SUFFIX) or partial.exists():
                raise StoreError(f"the store at {self.path} was left half-written (a crash interrupted writing "
                                 f"{partial if partial.exists() else self.path}); re-run the command with --resume "
                                 f"to finish it, or delete it")
            if self.path.exists():
                raise StoreError(f"{self.path} is not an episode store (no meta.json)")
            raise StoreError(f"no episode store at {self.path}; create one with `robovlms data generate` "
                             f"(`robovlms data import-calvin` for CALVIN)")
        meta = _read_meta(meta_path)
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema version {meta.get('schema_version')}; this robovlms "
                             f"reads version {SCHEMA_VERSION}: regenerate or re-import it")
        self.meta = meta
        try:
            layout = dict(meta["layout"])
            layout["cameras"] = tuple(layout["cameras"])
            self.layout = FrameLayout(**layout)
            self.frames = int(meta["frames"])
            self.action_statistics = Statistics(**meta["statistics"]["actions"])
            self.state_statistics = Statistics(**meta["statistics"]["state"])
        except (KeyError, TypeError, ValueError) as error:
            raise StoreError(f"{meta_path} is damaged ({type(error).__name__}: {error}); regenerate or re-import "
                             f"the store") from None
        self.metadata: dict[str, Any] = meta.get("metadata", {})
        self.episodes = _read_index(self.path / INDEX_FILE, self.frames, meta.get("episodes"))
        arrays = {}
        for key, (filename, dtype, shape) in _array_files(self.layout).items():
            file = self.path / filename
            expected = self.frames * int(np.prod(shape)) * dtype.itemsize
            if not file.exists() or file.stat().st_size != expected:
                raise StoreError(f"{file} is missing or truncated: expected {expected} bytes")
            arrays[key] = np.memmap(file, dtype, "r", shape=(self.frames, *shape))
        for name, statistics in (("actions", self.action_statistics), ("state", self.state_statistics)):
            if not np.isfinite(arrays[name]).all():  # a few bytes per frame beside the images: cheap to read
                self._raise_non_finite(name, arrays[name])
            if not np.isfinite(np.concatenate([statistics.mean, statistics.std])).all():
                raise StoreError(f"{meta_path} holds non-finite {name} statistics of finite {name}; the store is "
                                 f"damaged: regenerate or re-import it")
        self.images = {camera: arrays[f"images.{camera}"] for camera in self.layout.cameras}
        self.state = arrays["state"]
        self.actions = arrays["actions"]
        if verify:
            self.verify()

    def verify(self, progress: bool | None = None) -> list[str]:
        """`verify_store`, skipping the files whose size, time and inode are those of a file this machine already
        verified (the verdicts are cached in the user's cache directory, see `VerdictCache`)."""
        return _verify(self, progress, VerdictCache(self.path))

    def _raise_non_finite(self, name: str, array: np.ndarray) -> None:
        """Only reached for a damaged store: which episodes hold the non-finite values."""
        finite = np.isfinite(array).all(axis=1)
        bad = [row for row in self.episodes.itertuples() if not finite[row.start:row.start + row.length].all()]
        raise StoreError(f"{self.path} holds non-finite {name} in {len(bad)} episode(s), first episode "
                         f"{bad[0].episode} (task {bad[0].task!r}, scene {bad[0].scene!r}); regenerate or re-import "
                         f"the store")

    def __len__(self) -> int:
        return len(self.episodes)

    def tasks(self) -> list[str]:
        return sorted(self.episodes["task"].unique())

    def episode(self, index: int) -> Episode:
        row = self.episodes.iloc[index]
        frames = slice(int(row["start"]), int(row["start"] + row["length"]))
        return Episode(task=row["task"], instruction=row["instruction"], scene=row["scene"], seed=int(row["seed"]),
                       images={camera: np.asarray(images[frames]) for camera, images in self.images.items()},
                       state=np.asarray(self.state[frames]), actions=np.asarray(self.actions[frames]))

    def subset(self, fraction: float, seed: int = 0, exclude: Sequence[int] = (),
               per_task: int | None = None) -> list[int]:
        """Episode indices of a deterministic per-task fraction of the episodes not in `exclude`, at most
        `per_task` of each task (few-shot); a smaller fraction or count is a subset of a larger one."""
        if not 0 < fraction <= 1:
            raise ConfigError(f"data fraction must be in (0, 1], got {fraction}")
        if per_task is not None and per_task < 1:
            raise ConfigError(f"episodes per task must be at least 1, got {per_task}")
        rng = np.random.default_rng(seed)
        excluded = set(exclude)
        chosen = []
        for task in self.tasks():
            episodes = [i for i in self.episodes.index[self.episodes["task"] == task] if i not in excluded]
            order = rng.permutation(episodes)
            take = max(1, math.ceil(fraction * len(order)))
            chosen.extend(order[: min(take, per_task or take)].tolist())
        return sorted(chosen)

    def holdout(self, fraction: float) -> list[int]:
        """Validation episodes: the same per-task fraction whatever the training seed, so every cell of a sweep
        validates on the same episodes. At least one episode of each task stays for training."""
        if not 0 <= fraction < 1:
            raise ConfigError(f"validation fraction must be in [0, 1), got {fraction}")
        if fraction == 0:
            return []
        rng = np.random.default_rng(VALIDATION_SEED)
        chosen = []
        for task in self.tasks():
            order = rng.permutation(self.episodes.index[self.episodes["task"] == task].to_numpy())
            chosen.extend(order[: min(len(order) - 1, math.ceil(fraction * len(order)))].tolist())
        return sorted(chosen)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "episodes": len(self), "frames": self.frames,
                "tasks": self.tasks(), "scenes": sorted(self.episodes["scene"].unique()),
                "layout": asdict(self.layout), "metadata": self.metadata}



def _store_files(layout: FrameLayout) -> list[str]:
    """Every file of a finished store but meta.json, which records their checksums."""
    return [INDEX_FILE, *(filename for filename, _, _ in _array_files(layout).values())]


def _sha256(path: Path, progress: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHECKSUM_CHUNK):
            digest.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StoreError(f"{path} is truncated or corrupt ({error}); the store cannot be read: regenerate or "
                         f"re-import it") from None
    if not isinstance(meta, dict):
        raise StoreError(f"{path} is not a store's meta.json (it holds no JSON object); regenerate or re-import "
                         f"the store")
    return meta


def _read_index(path: Path, frames: int, episodes_in_meta: int | None = None) -> pd.DataFrame:
    """The episode index, checked: integer bounds, text names, no missing values, no episode listed twice or
    overlapping another, every episode within the frames. Every problem is one line naming the file."""
    if not path.is_file():
        raise StoreError(f"{path} is missing (the store's episode index); the store cannot be read: regenerate or "
                         f"re-import it")
    try:
        episodes = pd.read_parquet(path)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        reason = " ".join(str(error).split())
        raise StoreError(f"{path} is corrupt ({reason}); the store cannot be read: regenerate or re-import "
                         f"it") from None
    problem = _index_problem(episodes, frames, episodes_in_meta)
    if problem:
        raise StoreError(f"{path}: {problem}; the index is damaged: regenerate or re-import the store")
    return episodes


def _index_problem(episodes: pd.DataFrame, frames: int, episodes_in_meta: int | None) -> str | None:
    missing = [column for column in INDEX_COLUMNS if column not in episodes]
    if missing:
        return f"no column {', '.join(missing)}"
    if episodes.empty:
        return "it holds no episodes"
    for column in INDEX_COLUMNS:
        absent = episodes[column].isna().to_numpy()
        if absent.any():
            return f"column {column!r} has missing values (episode {_episode_name(episodes, absent)})"
    for column in ("episode", "seed", "start", "length"):
        if not pd.api.types.is_integer_dtype(episodes[column]):
            held = "text" if pd.api.types.is_string_dtype(episodes[column]) else episodes[column].dtype
            return f"column {column!r} must hold integers; it holds {held}"
    for column in ("task", "instruction", "scene"):
        text = episodes[column].map(lambda value: isinstance(value, str)).to_numpy()
        if not text.all():
            return f"column {column!r} must hold text (episode {_episode_name(episodes, ~text)})"
    counts = episodes["episode"].value_counts()
    if (counts > 1).any():
        return f"episode {counts.index[0]} appears {counts.iloc[0]} times"
    start, length = episodes["start"].to_numpy(), episodes["length"].to_numpy()
    outside = np.flatnonzero((start < 0) | (length < 1) | (start > frames) | (length > frames - start))
    if len(outside):
        first = episodes.iloc[outside[0]]
        return (f"{len(outside)} episode(s) lie outside the store's {frames} frames (episode {first['episode']} "
                f"starts at {first['start']} with length {first['length']})")
    order = np.argsort(start, kind="stable")
    ends = start[order] + length[order]
    overlap = np.flatnonzero(start[order][1:] < ends[:-1])
    if len(overlap):
        a, b = episodes.iloc[order[overlap[0]]], episodes.iloc[order[overlap[0] + 1]]
        return (f"episodes {a['episode']} and {b['episode']} overlap (frames {a['start']}-{a['start'] + a['length'] - 1}"
                f" and {b['start']}-{b['start'] + b['length'] - 1})")
    if episodes_in_meta is not None and episodes_in_meta != len(episodes):
        return f"it lists {len(episodes)} episodes; meta.json says the store holds {episodes_in_meta}"
    return None


def _episode_name(episodes: pd.DataFrame, rows: np.ndarray) -> object:
    """The `episode` number of the first of `rows`, or its row number when that is missing too."""
    row = int(np.flatnonzero(rows)[0])
    number = episodes["episode"].iloc[row]
    return f"row {row}" if pd.isna(number) else number


def verify_store(path: str | Path, progress: bool = False) -> list[str]:
    """Read every file of a store (streaming) against the SHA-256 checksums recorded at commit. Returns the files
    checked: none for a store written before checksums were recorded. Raises StoreError naming every damaged
    file, and for a meta.json whose checksums leave out a file of the store or name another."""
    return _verify(EpisodeStore(path), progress, cache=None)


def _verify(store: EpisodeStore, progress: bool | None, cache: VerdictCache | None) -> list[str]:
    recorded = _recorded_checksums(store)
    if not recorded:
        return []
    verdicts = cache.read() if cache is not None else {}
    stats = {name: (store.path / name).stat() for name in recorded}
    to_read = [name for name in recorded if verdicts.get(name) != _verdict(stats[name], recorded[name])]
    started = time.time_ns()
    damaged = []
    with tqdm(total=sum(stats[name].st_size for name in to_read), unit="B", unit_scale=True,
              desc=f"verify {store.path.name}", disable=None if progress is None else not progress) as bar:
        for name in to_read:
            if _sha256(store.path / name, bar) != recorded[name]:
                damaged.append(name)
    if damaged:
        raise StoreError(f"{store.path}: {', '.join(damaged)} changed since the store was written (SHA-256 differs "
                         f"from meta.json); the store is damaged: regenerate or re-import it")
    if cache is not None and to_read:
        # a file changed within the clock's resolution of this check would keep its time: such a "racy" verdict
        # (git's word) is not kept, and the file is read again next time
        cache.write({name: _verdict(stats[name], recorded[name]) for name in recorded
                     if started - stats[name].st_mtime_ns > RACY_NS})
    return list(recorded)


def _recorded_checksums(store: EpisodeStore) -> dict[str, str]:
    """The checksums meta.json records, one for each file of the store and for no other file; {} for a store
    written before checksums were recorded."""
    if "checksums" not in store.meta:
        return {}
    checksums = store.meta["checksums"]
    recorded = checksums.get("files") if isinstance(checksums, dict) else None
    if not isinstance(recorded, dict) or checksums.get("algorithm") != "sha256":
        raise StoreError(f"{store.path / META_FILE} holds no SHA-256 checksums under 'checksums'; the store is "
                         f"damaged: regenerate or re-import it")
    expected = _store_files(store.layout)
    for name in recorded:
        if name not in expected:
            raise StoreError(f"{store.path / META_FILE} records a checksum for {name!r}, which is not a file of the "
                             f"store ({', '.join(expected)}); the store is damaged: regenerate or re-import it")
    for name in expected:
        if not isinstance(recorded.get(name), str):
            raise StoreError(f"{store.path / META_FILE} records no checksum for {name}, so it cannot be verified; "
                             f"the store is damaged: regenerate or re-import it")
    return {name: recorded[name] for name in expected}


RACY_NS = 2_000_000_000  # a verdict is cached only for a file last changed this long before it was reached


def _verdict(stat: os.stat_result, checksum: str) -> list:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev, checksum]


class VerdictCache:
    """The files of one store verified on this machine, by size, modification time, inode and device: a JSON file
    in $XDG_CACHE_HOME/robovlms/verified-stores/ (default ~/.cache), named by the store's resolved path. A file
    rewritten, or a copy elsewhere, is read again; a cache that cannot be read or written is only a cost."""

    def __init__(self, store: Path):
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "robovlms" / "verified-stores"
        self.path = root / f"{hashlib.sha256(str(store.resolve()).encode()).hexdigest()[:32]}.json"

    def read(self) -> dict[str, list]:
        try:
            verdicts = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return verdicts if isinstance(verdicts, dict) else {}

    def write(self, verdicts: dict[str, list]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(self.path, verdicts)
        except OSError:
            pass
