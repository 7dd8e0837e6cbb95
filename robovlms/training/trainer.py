"""`train`: one configuration trained by Lightning's Trainer, resumed from its run directory's newest checkpoint.

Training resumes from the loadable checkpoint of the most steps: last.ckpt, unless it is truncated or a kill came
between Lightning's stepN.ckpt and last.ckpt, when that checkpoint is copied back to last.ckpt. Batches are drawn by
step (batch k of a run depends only on the seed and k), so a resumed run sees the batches an uninterrupted one
would have seen. Checkpoints are only ever loaded with `weights_only=True`: tensors and plain values, never code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from robovlms.backbone import create_backbone
from robovlms.data.store import EpisodeStore
from robovlms.data.windows import WindowDataset, check_windows_fit
from robovlms.formulation import check_statistics
from robovlms.data.windows import batch_as_is
from robovlms.training.batches import StepBatchSampler, validation_batches
from robovlms.training.checkpoints import AtomicCheckpointIO, resume_point
from robovlms.training.config import TrainingConfig, load_config
from robovlms.training.module import FormulationModule
from robovlms.training.run_dir import (BACKBONE_DIR, CHECKPOINT_DIR, STATISTICS_FILE, TrainingClock, build_formulation,
                                       claim_run_dir)


def train(config: TrainingConfig | dict[str, Any] | str | Path, progress: bool = False,
          callbacks: Sequence[L.Callback] = ()) -> Path:
    """Train one configuration; resume from the run directory's newest loadable checkpoint if it has one.

    `callbacks` are added to Lightning's (an Optuna pruning callback, for one)."""
    config = load_config(config)
    run_dir = Path(config.run_dir)
    clock = TrainingClock(run_dir, config.checkpoint_every)
    store = EpisodeStore(config.store, verify=True)
    cameras = config.cameras or list(store.layout.cameras)
    config = config.model_copy(update={"cameras": cameras})
    validation = store.holdout(config.validation_fraction)
    episodes = store.subset(config.data_fraction, config.seed, exclude=validation, per_task=config.episodes_per_task)
    check_windows_fit(store, episodes, config.history, config.chunk, config.frame_stride)
    action_statistics = check_statistics(store.action_statistics, "action", store.layout.action_dim, store.path)
    state_statistics = (check_statistics(store.state_statistics, "state", store.layout.state_dim, store.path)
                        if config.use_state else None)

    L.seed_everything(config.seed, workers=True, verbose=False)
    # built before anything is written: a bad backbone or formulation option leaves no run directory behind
    backbone = create_backbone(config.backbone.name, config.backbone.size, config.backbone.path,
                               **config.backbone.options)
    module = FormulationModule(build_formulation(config, backbone, action_statistics, state_statistics), config)
    claim_run_dir(run_dir, config)
    (run_dir / STATISTICS_FILE).write_text(json.dumps(
        {"actions": asdict(action_statistics), "state": asdict(state_statistics) if state_statistics else None},
        indent=2))
    (run_dir / BACKBONE_DIR).mkdir(exist_ok=True)
    backbone.save_files(run_dir / BACKBONE_DIR)

    resume_from, start = resume_point(run_dir / CHECKPOINT_DIR)
    dataset = WindowDataset(store, config.history, config.chunk, episodes, cameras, config.frame_stride)
    loader = DataLoader(dataset, batch_sampler=StepBatchSampler(len(dataset), config.batch_size, config.seed, start,
                                                                config.max_steps), collate_fn=batch_as_is)
    validation_loader = validation_batches(store, validation, config, cameras) if validation else None
    with _without_lightning_notices():
        trainer = L.Trainer(
            max_steps=config.max_steps, precision=config.precision, gradient_clip_val=config.gradient_clip,
            accelerator=config.accelerator, devices=config.devices, num_nodes=config.num_nodes,
            strategy=config.strategy, accumulate_grad_batches=config.accumulate_grad_batches,
            log_every_n_steps=config.log_every, enable_progress_bar=progress, enable_model_summary=progress,
            num_sanity_val_steps=0, val_check_interval=config.validate_every, check_val_every_n_epoch=None,
            limit_val_batches=config.validation_batches if validation else 0, use_distributed_sampler=False,
            logger=[CSVLogger(run_dir, name="logs"), TensorBoardLogger(run_dir, name="tensorboard")],
            plugins=[AtomicCheckpointIO()],
            callbacks=[ModelCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, filename="step{step}", save_last=True,
                                       every_n_train_steps=config.checkpoint_every, save_top_k=-1,
                                       auto_insert_metric_name=False,
                                       enable_version_counter=False),  # a resumed run rewrites stepN.ckpt, never -v1
                       clock, *callbacks])
        if start < config.max_steps:
            trainer.fit(module, loader, validation_loader, ckpt_path=resume_from, weights_only=True)
    return run_dir


# Said by Lightning at every fit and harmless here: a run without validation episodes skips the validation loop,
# torch deprecates the LeafSpec check Lightning still makes, and tips to install its cloud logger and registry.
LIGHTNING_NOTICES = (r"You defined a `validation_step` but have no `val_dataloader`",
                     r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"💡 Tip: ")


class _NoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(re.search(notice, record.getMessage()) for notice in LIGHTNING_NOTICES)


@contextlib.contextmanager
def _without_lightning_notices():
    handlers = logging.getLogger("lightning.pytorch").handlers
    notice_filter = _NoticeFilter()
    for handler in handlers:
        handler.addFilter(notice_filter)
    try:
        with warnings.catch_warnings():
            for notice in LIGHTNING_NOTICES:
                warnings.filterwarnings("ignore", message=notice)
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(notice_filter)
