"""Training and validation batches: drawn by step, so batch k of a run depends only on (seed, k)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from robovlms.data.store import VALIDATION_SEED, EpisodeStore
from robovlms.data.windows import WindowDataset, batch_as_is
from robovlms.training.config import TrainingConfig


class StepBatchSampler(Sampler[list[int]]):
    """The micro-batches of a whole run, `accumulate` per optimiser step: micro-batch m of step k is a function of
    (seed, k, m) only. Under DDP each of W processes takes its own slice of one global micro-batch of
    W * batch_size windows.

    Its length is the whole run's (`end` * `accumulate`) while it yields from step `start` on: Lightning, resuming
    from a checkpoint of step `start`, counts the micro-batches before it as done and takes the rest from here, so
    the epoch ends exactly at the last step and a resumed run sees the batches an uninterrupted one would."""

    def __init__(self, windows: int, batch_size: int, seed: int, start: int, end: int, accumulate: int = 1):
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.start, self.end, self.accumulate = start, end, accumulate

    def __len__(self) -> int:
        return self.end * self.accumulate

    def __iter__(self):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        size = self.batch_size * world
        for step in range(self.start, self.end):
            for micro in range(self.accumulate):
                # micro-batch 0 draws what a run without accumulation draws at that step
                rng = np.random.default_rng([self.seed, step, micro] if micro else [self.seed, step])
                windows = rng.choice(self.windows, size, replace=size > self.windows)
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
