"""Training windows served from an episode store without loading it: H past frames, each with its next L actions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from robovlms.data.store import EpisodeStore
from robovlms.errors import WindowError


def check_windows_fit(store: EpisodeStore, episodes: Sequence[int], history: int, chunk: int,
                      frame_stride: int) -> None:
    """A history of `history` frames `frame_stride` apart, and a chunk of `chunk` actions, each fit in the shortest
    of the training `episodes`."""
    shortest = int(store.episodes.iloc[list(episodes)]["length"].min())
    history_span = (history - 1) * frame_stride + 1
    if history_span > shortest or chunk > shortest:
        raise WindowError(f"history {history} (spanning {history_span} frames at frame stride {frame_stride}) and "
                          f"chunk {chunk} must each be at most the length of the shortest episode used for training "
                          f"({shortest} frames in {store.path})")


class WindowDataset(Dataset):
    """Window i ends at one frame t of one episode and holds frames t-(H-1)s, ..., t-s, t (s: `frame_stride`) and,
    for each frame j, actions j..j+L-1. A stride of L matches a policy that executes each chunk open-loop and
    observes again only after it.

    Frames before the episode start repeat its first frame and actions after its end repeat its last action;
    `frame_mask` and `action_mask` mark what is real. Batches are gathered in one vectorised read
    (`__getitems__`), so use `window_loader` or a DataLoader whose collate_fn returns the batch as it is.
    """

    def __init__(self, store: EpisodeStore, history: int = 1, chunk: int = 1, episodes: Sequence[int] | None = None,
                 cameras: Sequence[str] | None = None, frame_stride: int = 1):
        if history < 1 or chunk < 1 or frame_stride < 1:
            raise WindowError(f"history, chunk and frame_stride must be at least 1, got history={history}, "
                              f"chunk={chunk}, frame_stride={frame_stride}")
        self.store, self.history, self.chunk, self.frame_stride = store, history, chunk, frame_stride
        self.cameras = tuple(cameras or store.layout.cameras)
        for camera in self.cameras:
            if camera not in store.layout.cameras:
                raise WindowError(f"camera {camera!r} is not in {store.path}; it holds {list(store.layout.cameras)}")
        index = store.episodes if episodes is None else store.episodes.iloc[list(episodes)]
        if len(index) == 0:
            raise WindowError("no episodes selected")
        lengths = index["length"].to_numpy()
        span = (history - 1) * frame_stride + chunk
        if span > lengths.max():
            raise WindowError(f"a window of history {history} (frame stride {frame_stride}) and chunk {chunk} needs "
                              f"episodes of at least {span} frames; the longest episode of {store.path} has "
                              f"{lengths.max()}")
        self.task_names = store.tasks()
        task_ids = index["task"].map({task: i for i, task in enumerate(self.task_names)}).to_numpy()
        self.episode_ids = index.index.to_numpy()
        self._episode = np.repeat(np.arange(len(index)), lengths)
        self._start = np.repeat(index["start"].to_numpy(), lengths)
        self._length = np.repeat(lengths, lengths)
        self._time = np.concatenate([np.arange(n) for n in lengths])
        self._task = task_ids
        self._instructions = index["instruction"].tolist()

    def __len__(self) -> int:
        return len(self._time)

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Any]:
        indices = np.asarray(indices)
        episode, start, length, now = (self._episode[indices], self._start[indices], self._length[indices],
                                       self._time[indices])
        frame_time = now[:, None] + np.arange(1 - self.history, 1) * self.frame_stride  # (B, H)
        frame_mask = frame_time >= 0
        frame_time = np.maximum(frame_time, 0)
        frames = start[:, None] + frame_time  # (B, H)
        action_time = frame_time[:, :, None] + np.arange(self.chunk)  # (B, H, L)
        action_mask = (action_time < length[:, None, None]) & frame_mask[:, :, None]
        action_frames = start[:, None, None] + np.minimum(action_time, length[:, None, None] - 1)
        flat = frames.ravel()
        images = np.stack([self.store.images[camera][flat] for camera in self.cameras], axis=1)  # (B*H, V, h, w, 3)
        batch, history = frames.shape
        return {
            "images": torch.from_numpy(images.reshape(batch, history, *images.shape[1:])),  # (B, H, V, h, w, 3) uint8
            "state": torch.from_numpy(self.store.state[flat].reshape(batch, history, -1)),  # (B, H, S)
            "actions": torch.from_numpy(self.store.actions[action_frames.ravel()].reshape(batch, history, self.chunk, -1)),
            "action_mask": torch.from_numpy(action_mask),  # (B, H, L)
            "frame_mask": torch.from_numpy(frame_mask),  # (B, H)
            "task": torch.from_numpy(self._task[episode]),  # (B,)
            "instruction": [self._instructions[e] for e in episode],
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.__getitems__([index])
        return {key: value[0] for key, value in batch.items()}


def batch_as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def window_loader(dataset: WindowDataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                  num_workers: int = 0, drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=num_workers,
                      collate_fn=batch_as_is, drop_last=drop_last, persistent_workers=num_workers > 0)
