"""Training one configuration: the config, the LightningModule every formulation trains through, and `train`.

A run directory holds everything that rebuilds the trained policy, and nothing else is needed:
    config.yaml        the resolved TrainingConfig
    statistics.json    the store's action and state statistics the formulation normalises with
    backbone/          the backbone's architecture files (config, tokenizer, processor), before training
    checkpoints/       Lightning checkpoints: last.ckpt and one every `checkpoint_every` steps
    training_time.json the wall time of every training attempt together, updated at each checkpoint
    logs/, tensorboard/  the CSV and TensorBoard logs of Lightning's loggers

Training resumes from the loadable checkpoint of the most steps: last.ckpt, unless it is truncated or a kill came
between Lightning's stepN.ckpt and last.ckpt, when that checkpoint is copied back to last.ckpt. Batches are drawn by
step (batch k of a run depends only on the seed and k), so a resumed run sees the batches an uninterrupted one
would have seen. Checkpoints are only ever loaded with `weights_only=True`: tensors and plain values, never code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import pickle
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch.utils.data import DataLoader, Sampler

from robovlms.atomic_files import write_atomically, write_json_atomically
from robovlms.augmentation import augment_images
from robovlms.backbone import create_backbone, rebuild_backbone
from robovlms.data.store import VALIDATION_SEED, EpisodeStore, Statistics
from robovlms.data.windows import WindowDataset
from robovlms.errors import ConfigError, RobovlmsError, WindowError, config_error
from robovlms.formulation import Formulation, check_statistics, create_formulation
from robovlms.yaml_files import read_yaml_mapping

CONFIG_FILE = "config.yaml"
STATISTICS_FILE = "statistics.json"
BACKBONE_DIR = "backbone"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
TRAINING_TIME_FILE = "training_time.json"


class TrainingDivergedError(RobovlmsError):
    """The loss or a gradient stopped being finite; the last good checkpoint is kept."""


# Upper bounds of plausible settings: beyond them a value is a typo (1e15 steps, a batch of a billion windows).
MAX_STEPS = 10_000_000
MAX_BATCH_SIZE = 65_536
MAX_COUNT = 1_000_000
MAX_WINDOW = 1024  # frames of history, actions of a chunk


class CheckpointError(RobovlmsError):
    """A file of a run directory's training state (a checkpoint, training_time.json) that is truncated, corrupt,
    or not written by robovlms."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackboneSettings(_Strict):
    name: str = "gpt-scratch"
    size: Literal["tiny", "pretrained"] = "tiny"
    path: str | None = None  # a local directory or cached model id, for size "pretrained"
    options: dict[str, Any] = {}  # overrides of the tiny config
    freeze: Literal["full", "frozen-vision", "frozen-language", "frozen-vision-and-embeddings", "lora"] = "full"
    lora_rank: int = Field(8, ge=1, le=4096, strict=True)
    lora_targets: Literal["attention", "all-linear"] = "attention"  # all-linear: RoboVLMs' choice


class FormulationSettings(_Strict):
    name: str = "policy-head"
    options: dict[str, Any] = {}  # the formulation's own settings (its config dataclass)


class TrainingConfig(_Strict):
    store: str
    run_dir: str
    backbone: BackboneSettings = BackboneSettings()
    formulation: FormulationSettings = FormulationSettings()
    history: int = Field(1, ge=1, le=MAX_WINDOW, strict=True)  # H frames per window
    chunk: int = Field(1, ge=1, le=MAX_WINDOW, strict=True)  # L future actions predicted per frame
    # env steps between history frames; = chunk for `execution: chunk` with H > 1
    frame_stride: int = Field(1, ge=1, le=MAX_WINDOW, strict=True)
    use_state: bool = True  # proprio state as an input
    state_input: Literal["add", "token"] = "add"  # added to the [LRN] embedding, or a token of its own (RoboVLMs)
    cameras: list[str] | None = None  # default: every camera of the store
    augment: bool = False  # random shifts and colour jitter of training images (robovlms/augmentation.py)
    data_fraction: float = Field(1.0, gt=0, le=1)  # of the episodes left after validation's, nested across fractions
    # few-shot: at most N training episodes of each task, nested
    episodes_per_task: int | None = Field(None, ge=1, le=MAX_COUNT, strict=True)
    validation_fraction: float = Field(0.0, ge=0, lt=1)  # episodes per task held out for val/loss (same for any seed)
    validate_every: int = Field(100, ge=1, le=MAX_STEPS, strict=True)  # steps between validations
    validation_batches: int = Field(4, ge=1, le=MAX_COUNT, strict=True)
    batch_size: int = Field(32, ge=1, le=MAX_BATCH_SIZE, strict=True)  # per device
    max_steps: int = Field(1000, ge=1, le=MAX_STEPS, strict=True)
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, strict=True)
    weight_decay: float = Field(0.01, ge=0)
    precision: Literal["32", "bf16-mixed"] = "32"
    gradient_clip: float | None = Field(1.0, gt=0)
    seed: int = Field(0, strict=True)
    execution: Literal["first", "ensemble", "chunk"] = "first"  # how a rollout executes a predicted chunk
    checkpoint_every: int = Field(100, ge=1, le=MAX_STEPS, strict=True)
    log_every: int = Field(10, ge=1, le=MAX_STEPS, strict=True)
    accelerator: str = "auto"  # Lightning's: cpu, gpu, auto
    devices: int | str = 1  # several GPUs train one cell with the strategy below
    strategy: str = "auto"  # e.g. ddp


def load_config(source: TrainingConfig | dict[str, Any] | str | Path) -> TrainingConfig:
    """A TrainingConfig from itself, a dict or a YAML file; every error names the bad key and the valid ones."""
    if isinstance(source, TrainingConfig):
        return source
    if not isinstance(source, dict):
        source = read_yaml_mapping(source, "training settings")
    try:
        config = TrainingConfig.model_validate(source)
    except ValidationError as error:
        raise config_error("invalid training config", TrainingConfig, error) from None
    if config.state_input == "token" and not config.use_state:
        raise ConfigError("state_input token gives the proprio state a token of its own: it needs use_state true")
    return config


# ---- the Lightning side --------------------------------------------------------------------------------------


class FormulationModule(L.LightningModule):
    """What one training step computes for any formulation; the Trainer owns the rest."""

    def __init__(self, formulation: Formulation, config: TrainingConfig):
        super().__init__()
        self.formulation = formulation
        self.config = config

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # augmentation and a sampling objective's noise are drawn from (seed, step): a resumed run draws what an
        # uninterrupted one would
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.global_step)
        if self.config.augment:
            batch = {**batch, "images": augment_images(batch["images"], generator)}
        loss, metrics = self.formulation.loss(batch, generator)
        if not torch.isfinite(loss):
            self._diverged(f"the loss became {loss.item()} at step {self.global_step}")
        if (self.global_step + 1) % self.config.log_every == 0:  # only where the loggers write: self.log is not free
            batch_size = len(batch["instruction"])
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            self.log_dict({f"train/{name}": value for name, value in metrics.items()}, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, _ = self.formulation.loss(batch, torch.Generator().manual_seed(batch_idx))  # the same noise each time
        self.log("val/loss", loss, batch_size=len(batch["instruction"]), sync_dist=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # the norm clipping computes anyway tells whether a gradient stopped being finite, before the update
        norm = torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val or math.inf)
        if not torch.isfinite(norm):
            self._diverged(f"the gradient norm became {norm.item()} at step {self.global_step}")

    def _diverged(self, what: str) -> None:
        last = Path(self.config.run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint had been written yet"
        raise TrainingDivergedError(f"{what}; training stopped before the weights were updated, and {kept}. "
                                    f"Try a lower learning_rate (now {self.config.learning_rate}), "
                                    f"more warmup_steps or gradient_clip")

    def configure_optimizers(self):
        decay, no_decay = [], []
        partly_frozen = {id(p) for p in self.formulation.backbone.partly_frozen_parameters()}
        for parameter in self.parameters():
            if parameter.requires_grad:
                (decay if parameter.dim() >= 2 and id(parameter) not in partly_frozen else no_decay).append(parameter)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.config.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=self.config.learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _WarmupCosine(self.config.warmup_steps, self.config.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class _WarmupCosine:
    """Linear warm-up to the full learning rate, then cosine decay to zero at the last step."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


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


def _batch_as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


# ---- building a formulation from a run directory --------------------------------------------------------------


def build_formulation(config: TrainingConfig, backbone, action_statistics: Statistics,
                      state_statistics: Statistics | None) -> Formulation:
    formulation = create_formulation(config.formulation.name, backbone, action_statistics, state_statistics,
                                     history=config.history, chunk=config.chunk, use_state=config.use_state,
                                     state_input=config.state_input, **config.formulation.options)
    backbone.freeze(config.backbone.freeze, lora_rank=config.backbone.lora_rank,
                    lora_targets=config.backbone.lora_targets)
    return formulation


def load_formulation(run_dir: str | Path, checkpoint: str = LAST_CHECKPOINT) -> tuple[Formulation, TrainingConfig]:
    """The trained formulation of a run directory, rebuilt from its files alone, in eval mode."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / CONFIG_FILE)
    statistics = json.loads((run_dir / STATISTICS_FILE).read_text())
    checkpoint_path = run_dir / CHECKPOINT_DIR / checkpoint
    if not checkpoint_path.is_file():
        raise ConfigError(f"{run_dir} holds no checkpoint {checkpoint}; train it first with `robovlms train`")
    backbone = rebuild_backbone(config.backbone.name, run_dir / BACKBONE_DIR, config.backbone.size,
                                config.backbone.path)
    formulation = build_formulation(config, backbone, Statistics(**statistics["actions"]),
                                    Statistics(**statistics["state"]) if statistics["state"] else None)
    state = read_checkpoint(checkpoint_path)["state_dict"]
    formulation.load_state_dict({k.removeprefix("formulation."): v for k, v in state.items()})
    return formulation.eval(), config


def read_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint written by `train`, loaded as tensors and plain values only."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # torch's text would suggest unsafe loading: never pass it on
        raise CheckpointError(f"{path} is not a robovlms checkpoint: it holds objects other than tensors and plain "
                              f"values, so it was not loaded; delete it (train again to replace it)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise CheckpointError(f"{path} is truncated or corrupt ({reason}); delete it (training resumes from an "
                              f"earlier checkpoint)") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "global_step"} <= checkpoint.keys():
        raise CheckpointError(f"{path} is not a robovlms checkpoint (no state_dict and global_step); delete it "
                              f"(train again to replace it)")
    return checkpoint


def training_seconds(run_dir: str | Path) -> float | None:
    """The wall time of every training attempt of a run directory together; None before any was recorded."""
    path = Path(run_dir) / TRAINING_TIME_FILE
    if not path.is_file():
        return None
    try:
        return float(json.loads(path.read_text())["seconds"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} is damaged; delete it (the training time recorded so far is then "
                              f"lost)") from None


class _TrainingClock(L.Callback):
    """Adds this attempt's wall time (from the start of `train`) to the run's training_time.json at every
    checkpoint and when training ends or fails, so an attempt killed later counts up to its last checkpoint."""

    def __init__(self, run_dir: Path, every: int):
        self.file, self.every = run_dir / TRAINING_TIME_FILE, every
        self.before = training_seconds(run_dir) or 0.0
        self.started = time.perf_counter()

    def _record(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            write_json_atomically(self.file, {"seconds": self.before + time.perf_counter() - self.started})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._record(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._record(trainer)


def _resume_point(checkpoints: Path) -> tuple[Path | None, int]:
    """The checkpoint training continues from and its step. Every checkpoint that loads is a candidate and the one
    of the most steps wins; when that is not last.ckpt (truncated, or older after a kill between Lightning's
    stepN.ckpt and last.ckpt) it is copied back to last.ckpt."""
    found = []
    for path in sorted(checkpoints.glob("*.ckpt")):
        try:
            found.append((int(read_checkpoint(path, mmap=True)["global_step"]), path.name == LAST_CHECKPOINT, path))
        except CheckpointError as error:
            warnings.warn(f"skipped for resuming: {error}", stacklevel=3)
    if not found:
        return None, 0
    step, is_last, newest = max(found)
    last = checkpoints / LAST_CHECKPOINT
    if not is_last:
        write_atomically(last, lambda temporary: shutil.copyfile(newest, temporary))
    return last, step


# ---- train ---------------------------------------------------------------------------------------------------


def train(config: TrainingConfig | dict[str, Any] | str | Path, progress: bool = False,
          callbacks: Sequence[L.Callback] = ()) -> Path:
    """Train one configuration; resume from the run directory's newest loadable checkpoint if it has one.

    `callbacks` are added to Lightning's (an Optuna pruning callback, for one)."""
    config = load_config(config)
    run_dir = Path(config.run_dir)
    clock = _TrainingClock(run_dir, config.checkpoint_every)
    store = EpisodeStore(config.store)
    cameras = config.cameras or list(store.layout.cameras)
    config = config.model_copy(update={"cameras": cameras})
    validation = store.holdout(config.validation_fraction)
    episodes = store.subset(config.data_fraction, config.seed, exclude=validation, per_task=config.episodes_per_task)
    shortest = int(store.episodes.iloc[episodes]["length"].min())
    history_span = (config.history - 1) * config.frame_stride + 1
    if history_span > shortest or config.chunk > shortest:
        raise WindowError(f"history {config.history} (spanning {history_span} frames at frame stride "
                          f"{config.frame_stride}) and chunk {config.chunk} must each be at most the length of the "
                          f"shortest episode used for training ({shortest} frames in {store.path})")
    action_statistics = check_statistics(store.action_statistics, "action", store.layout.action_dim, store.path)
    state_statistics = (check_statistics(store.state_statistics, "state", store.layout.state_dim, store.path)
                        if config.use_state else None)

    L.seed_everything(config.seed, workers=True, verbose=False)
    # built before anything is written: a bad backbone or formulation option leaves no run directory behind
    backbone = create_backbone(config.backbone.name, config.backbone.size, config.backbone.path,
                               **config.backbone.options)
    module = FormulationModule(build_formulation(config, backbone, action_statistics, state_statistics), config)
    _claim_run_dir(run_dir, config)
    (run_dir / STATISTICS_FILE).write_text(json.dumps(
        {"actions": asdict(action_statistics), "state": asdict(state_statistics) if state_statistics else None},
        indent=2))
    (run_dir / BACKBONE_DIR).mkdir(exist_ok=True)
    backbone.save_files(run_dir / BACKBONE_DIR)

    resume_from, start = _resume_point(run_dir / CHECKPOINT_DIR)
    dataset = WindowDataset(store, config.history, config.chunk, episodes, cameras, config.frame_stride)
    loader = DataLoader(dataset, batch_sampler=StepBatchSampler(len(dataset), config.batch_size, config.seed, start,
                                                                config.max_steps), collate_fn=_batch_as_is)
    validation_loader = _validation_loader(store, validation, config, cameras) if validation else None
    with _without_lightning_notices():
        trainer = L.Trainer(
            max_steps=config.max_steps, precision=config.precision, gradient_clip_val=config.gradient_clip,
            accelerator=config.accelerator, devices=config.devices, strategy=config.strategy,
            log_every_n_steps=config.log_every, enable_progress_bar=progress, enable_model_summary=progress,
            num_sanity_val_steps=0, val_check_interval=config.validate_every, check_val_every_n_epoch=None,
            limit_val_batches=config.validation_batches if validation else 0, use_distributed_sampler=False,
            logger=[CSVLogger(run_dir, name="logs"), TensorBoardLogger(run_dir, name="tensorboard")],
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


def _validation_loader(store: EpisodeStore, episodes: list[int], config: TrainingConfig,
                       cameras: list[str]) -> DataLoader:
    """The same windows at every validation: `validation_batches` batches drawn once from the held-out episodes."""
    dataset = WindowDataset(store, config.history, config.chunk, episodes, cameras, config.frame_stride)
    rng = np.random.default_rng(VALIDATION_SEED)
    count = min(len(dataset), config.validation_batches * config.batch_size)
    windows = sorted(rng.choice(len(dataset), count, replace=False).tolist())
    batches = [windows[i:i + config.batch_size] for i in range(0, count, config.batch_size)]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=_batch_as_is)


def _claim_run_dir(run_dir: Path, config: TrainingConfig) -> None:
    """Write the resolved config, or check that a run directory being resumed was trained with the same one.
    A run directory without a checkpoint holds nothing trained, whatever config it holds: it starts afresh."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = config.model_dump(mode="json")
    saved_file = run_dir / CONFIG_FILE
    if saved_file.exists() and any((run_dir / CHECKPOINT_DIR).glob("*.ckpt")):
        # through load_config, a setting added since that run was written compares as its default
        saved = load_config(yaml.safe_load(saved_file.read_text())).model_dump(mode="json")
        changed = sorted(key for key in resolved if key != "max_steps" and saved.get(key) != resolved[key])
        if changed:
            raise ConfigError(f"{run_dir} holds a run trained with other settings ({', '.join(changed)}); "
                              f"choose another run_dir, or only raise max_steps to continue it")
    saved_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
