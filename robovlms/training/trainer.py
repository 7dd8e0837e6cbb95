"""`train`: one configuration trained by Lightning's Trainer, resumed from its run directory's newest checkpoint.

Training resumes from the loadable checkpoint of the most steps: last.ckpt, unless it is truncated or a kill came
between Lightning's stepN.ckpt and last.ckpt, when that checkpoint is copied back to last.ckpt. Batches are drawn by
step (micro-batch m of step k depends only on the seed, k and m), so a resumed run sees the batches an
uninterrupted one would have seen, and ends with the same weights. Checkpoints are only ever loaded with
`weights_only=True`: tensors and plain values, never code. Several processes train one configuration in a process
group of their own (robovlms/training/launch.py); only rank 0 writes the run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from robovlms.backbone import create_backbone
from robovlms.data.store import EpisodeStore, Statistics
from robovlms.data.windows import WindowDataset, batch_as_is, check_windows_fit
from robovlms.errors import ConfigError
from robovlms.formulation import check_statistics
from robovlms.training.batches import StepBatchSampler, validation_batches
from robovlms.training.checkpoints import AtomicCheckpointIO, RunCheckpoints, resume_point
from robovlms.training.config import TrainingConfig, load_config
from robovlms.training.launch import ValidationHook, launched_by_robovlms, launched_externally, train_in_processes
from robovlms.training.module import FormulationModule
from robovlms.training.precision import hold_backbone_weights
from robovlms.training.run_dir import (BACKBONE_DIR, CHECKPOINT_DIR, STATISTICS_FILE, TrainingClock, build_formulation,
                                       check_run_dir, claim_run_dir)
from robovlms.training.strategies import (check_machine, check_training, is_distributed, lightning_accelerator,
                                          lightning_refused, lightning_strategy, processes_per_machine)


def train(config: TrainingConfig | dict[str, Any] | str | Path, progress: bool = False,
          on_validation: ValidationHook | None = None) -> Path:
    """Train one configuration; resume from the run directory's newest loadable checkpoint if it has one.

    A configuration of several processes (devices > 1) trains in processes started for it, in a process group of
    their own (robovlms/training/launch.py): this one waits for them and raises what they raised.
    `on_validation(step, metrics)` is called in this process after each validation; an error it raises stops
    training and is raised here (Optuna's pruning)."""
    config = load_config(config)
    check_training(config)
    if is_distributed(config) and not launched_externally():
        if config.num_nodes > 1:
            raise ConfigError(f"num_nodes {config.num_nodes}: a cell on several machines is started on each of them "
                              f"by its launcher (torchrun or srun running `python -m robovlms.training CONFIG`, "
                              f"docs/scaling.md)")
        check_machine(config)
        data = TrainingData.read(config)  # a bad store or window fails here, before any process starts
        check_run_dir(Path(config.run_dir), data.config)
        train_in_processes(data.config, processes_per_machine(config), progress, on_validation)
        return Path(config.run_dir)
    return train_here(config, progress, [ValidationCallback(on_validation)] if on_validation else [])


def train_here(config: TrainingConfig, progress: bool, callbacks: Sequence[L.Callback]) -> Path:
    """Train in this process: the whole run, or this rank's part of it (only rank 0 writes the run directory)."""
    check_training(config)
    check_machine(config)
    writes = rank_zero_only.rank == 0
    run_dir = Path(config.run_dir)
    clock = TrainingClock(run_dir, config.checkpoint_every)
    data = TrainingData.read(config)
    config = data.config

    L.seed_everything(config.seed, workers=True, verbose=False)
    # built before anything is written: a bad backbone or formulation option leaves no run directory behind
    backbone = create_backbone(config.backbone.name, config.backbone.size, config.backbone.path,
                               **config.backbone.options)
    hold_backbone_weights(backbone, config)
    if config.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    module = FormulationModule(build_formulation(config, backbone, data.action_statistics, data.state_statistics),
                               config)
    if writes:
        claim_run_dir(run_dir, config)
        (run_dir / STATISTICS_FILE).write_text(json.dumps(
            {"actions": asdict(data.action_statistics),
             "state": asdict(data.state_statistics) if data.state_statistics else None}, indent=2))
        (run_dir / BACKBONE_DIR).mkdir(exist_ok=True)
        backbone.save_files(run_dir / BACKBONE_DIR)

    resume_from, start = resume_point(run_dir / CHECKPOINT_DIR, repair=writes)
    loader = DataLoader(data.windows, batch_sampler=StepBatchSampler(
        len(data.windows), config.batch_size, config.seed, start, config.max_steps, config.accumulate_grad_batches),
        collate_fn=batch_as_is)
    validation_loader = (validation_batches(data.store, data.validation, config, config.cameras)
                         if data.validation else None)
    with _without_lightning_notices():
        try:
            trainer = L.Trainer(
                max_steps=config.max_steps, precision=config.precision, gradient_clip_val=config.gradient_clip,
                accelerator=lightning_accelerator(config), devices=processes_per_machine(config),
                num_nodes=config.num_nodes, strategy=lightning_strategy(config, backbone),
                accumulate_grad_batches=config.accumulate_grad_batches,
                plugins=lightning_plugins(config),
                log_every_n_steps=config.log_every, enable_progress_bar=progress, enable_model_summary=progress,
                num_sanity_val_steps=0, check_val_every_n_epoch=None,
                val_check_interval=config.validate_every * config.accumulate_grad_batches,  # in micro-batches
                limit_val_batches=config.validation_batches if data.validation else 0, use_distributed_sampler=False,
                logger=[CSVLogger(run_dir, name="logs"), TensorBoardLogger(run_dir, name="tensorboard")],
                callbacks=[RunCheckpoints(run_dir / CHECKPOINT_DIR, config.checkpoint_every), clock, *callbacks])
        except (MisconfigurationException, ValueError) as error:
            raise lightning_refused(error) from None
        if start < config.max_steps:
            # in training mode: a pretrained backbone comes out of from_pretrained in eval mode, which Lightning
            # keeps, and which would switch off dropout and transformers' gradient checkpointing
            trainer.fit(module.train(), loader, validation_loader, ckpt_path=resume_from, weights_only=True)
    return run_dir


def lightning_plugins(config: TrainingConfig) -> list:
    """Lightning's cluster environment when robovlms started the ranks, and atomic checkpoint files where a
    checkpoint is one file (DeepSpeed writes a directory of its own)."""
    plugins = [LightningEnvironment()] if launched_by_robovlms() else []
    if not config.strategy.startswith("deepspeed"):
        plugins.append(AtomicCheckpointIO())
    return plugins


@dataclass
class TrainingData:
    """What training reads of the store, checked against the config before any model is built."""

    config: TrainingConfig  # with `cameras` resolved
    store: EpisodeStore
    windows: WindowDataset
    validation: list[int]
    action_statistics: Statistics
    state_statistics: Statistics | None

    @classmethod
    def read(cls, config: TrainingConfig) -> TrainingData:
        store = EpisodeStore(config.store, verify=True)
        cameras = config.cameras or list(store.layout.cameras)
        config = config.model_copy(update={"cameras": cameras})
        validation = store.holdout(config.validation_fraction)
        episodes = store.subset(config.data_fraction, config.seed, exclude=validation,
                                per_task=config.episodes_per_task)
        check_windows_fit(store, episodes, config.history, config.chunk, config.frame_stride)
        action_statistics = check_statistics(store.action_statistics, "action", store.layout.action_dim, store.path)
        state_statistics = (check_statistics(store.state_statistics, "state", store.layout.state_dim, store.path)
                            if config.use_state else None)
        windows = WindowDataset(store, config.history, config.chunk, episodes, cameras, config.frame_stride)
        return cls(config, store, windows, validation, action_statistics, state_statistics)


class ValidationCallback(L.Callback):
    """`on_validation(step, metrics)` after each validation, in this process."""

    def __init__(self, on_validation: ValidationHook):
        self.on_validation = on_validation

    def on_validation_end(self, trainer, module) -> None:
        self.on_validation(trainer.global_step,
                           {name: float(value) for name, value in trainer.callback_metrics.items()})


# Said by Lightning at every fit and harmless here: a run without validation episodes skips the validation loop,
# torch deprecates the LeafSpec check Lightning still makes, and tips to install its cloud logger and registry.
LIGHTNING_NOTICES = (r"You defined a `validation_step` but have no `val_dataloader`",
                     # StepBatchSampler yields from the resumed step on, which Lightning cannot know
                     r".*your dataloader is not resumable",
                     r"Checkpoint directory .* exists and is not empty",  # resuming writes where it left off
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
