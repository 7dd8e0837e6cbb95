"""Training and validation batches: drawn by step, so batch k of a run depends only on (seed, k)."""

from __future__ import annotations


import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from robovlms.data.store import VALIDATION_SEED, EpisodeStore
from robovlms.data.windows import WindowDataset, batch_as_is
from robovlms.training.config import TrainingConfig


class StepBatchSampler(Sampler[list[int]]):
    """Batches `start`..`end`-1 of a run; batch k is a function of (seed, k) only. Under DDP each of W processes
    takes its own slice of one global batch of W * batch_size windows."""

    def __init__(self, windows: int, batch_size: int, seed: int, start: int, end: int):
        self.windows, self.batch_size, self.seed, self.start, self.end = windows, batch_size, seed, start, end

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        size = self.batch_size * world
        for step in range(self.start, self.end):
            windows = np.random.default_rng([self.seed, step]).choice(self.windows, size, replace=size > self.windows)
            yield windows[rank * self.batch_size:(rank + 1) * self.batch_size].tolist()


def validation_batches(store: EpisodeStore, episodes: list[int], config: TrainingConfig,
                       cameras: list[str]) -> DataLoader:
    """The same windows at every validation: `validation_batches` batches drawn once from the held-out episodes."""
    dataset = WindowDataset(store, config.history, config.chunk, episodes, cameras, config.frame_stride)
    rng = np.random.default_rng(VALIDATION_SEED)
    count = min(len(dataset), config.validation_batches * config.batch_size)
    windows = sorted(rng.choice(len(dataset), count, replace=False).tolist())
    batches = [windows[i:i + config.batch_size] for i in range(0, count, config.batch_size)]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=batch_as_is)
