"""A run directory: the files that rebuild a trained policy, the settings it was trained with, its training time.

    config.yaml        the resolved TrainingConfig
    statistics.json    the store's action and state statistics the formulation normalises with
    backbone/          the backbone's architecture files (config, tokenizer, processor), before training
    checkpoints/       Lightning checkpoints: last.ckpt and one every `checkpoint_every` steps
    training_time.json the wall time of every training attempt together, updated at each checkpoint; the
                       processes (GPUs) the last one trained on and the most GPU memory its rank 0 held
    logs/, tensorboard/  the CSV and TensorBoard logs of Lightning's loggers
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from robovlms.atomic_files import write_json_atomically
from robovlms.backbone import rebuild_backbone
from robovlms.data.store import Statistics
from robovlms.errors import ConfigError
from robovlms.formulation import Formulation, create_formulation
from robovlms.training.checkpoints import LAST_CHECKPOINT, CheckpointError, read_weights
from robovlms.training.config import TrainingConfig, load_config
from robovlms.training.precision import as_trained, hold_backbone_weights

CONFIG_FILE = "config.yaml"
STATISTICS_FILE = "statistics.json"
BACKBONE_DIR = "backbone"
CHECKPOINT_DIR = "checkpoints"
TRAINING_TIME_FILE = "training_time.json"


def build_formulation(config: TrainingConfig, backbone, action_statistics: Statistics,
                      state_statistics: Statistics | None) -> Formulation:
    formulation = create_formulation(config.formulation.name, backbone, action_statistics, state_statistics,
                                     history=config.history, chunk=config.chunk, use_state=config.use_state,
                                     state_input=config.state_input, **config.formulation.options)
    backbone.freeze(config.backbone.freeze, lora_rank=config.backbone.lora_rank,
                    lora_targets=config.backbone.lora_targets, lora_alpha=config.backbone.lora_alpha,
                    lora_dropout=config.backbone.lora_dropout)
    return formulation


def load_formulation(run_dir: str | Path, checkpoint: str = LAST_CHECKPOINT, device=None
                     ) -> tuple[Formulation, TrainingConfig]:
    """The trained formulation of a run directory, rebuilt from its files alone, in eval mode, each weight in the
    dtype it was trained in, on `device` (default: the CPU)."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / CONFIG_FILE)
    statistics = json.loads((run_dir / STATISTICS_FILE).read_text())
    checkpoint_path = run_dir / CHECKPOINT_DIR / checkpoint
    if not checkpoint_path.exists():
        raise ConfigError(f"{run_dir} holds no checkpoint {checkpoint}; train it first with `robovlms train`")
    backbone = rebuild_backbone(config.backbone.name, run_dir / BACKBONE_DIR, config.backbone.size,
                                config.backbone.path)
    hold_backbone_weights(backbone, config)
    formulation = build_formulation(config, backbone, Statistics(**statistics["actions"]),
                                    Statistics(**statistics["state"]) if statistics["state"] else None)
    formulation = as_trained(formulation, config)
    formulation.load_state_dict(read_weights(checkpoint_path))
    return formulation.to(device).eval(), config


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


class TrainingClock(L.Callback):
    """Adds this attempt's wall time (from the start of `train`) to the run's training_time.json at every
    checkpoint and when training ends or fails, so an attempt killed later counts up to its last checkpoint."""

    def __init__(self, run_dir: Path, every: int):
        self.file, self.every = run_dir / TRAINING_TIME_FILE, every
        self.before = training_seconds(run_dir) or 0.0
        self.started = time.perf_counter()

    def _record(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            device = trainer.strategy.root_device
            write_json_atomically(self.file, {
                "seconds": self.before + time.perf_counter() - self.started, "processes": trainer.world_size,
                "gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            self._record(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._record(trainer)


def check_run_dir(run_dir: Path, config: TrainingConfig) -> None:
    """A run directory being resumed (it holds a checkpoint) was trained with the same settings as `config`, but
    for max_steps. A run directory without a checkpoint holds nothing trained, whatever config it holds."""
    saved_file = run_dir / CONFIG_FILE
    if saved_file.exists() and any((run_dir / CHECKPOINT_DIR).glob("*.ckpt")):
        resolved = config.model_dump(mode="json")
        # through load_config, a setting added since that run was written compares as its default
        saved = load_config(yaml.safe_load(saved_file.read_text())).model_dump(mode="json")
        changed = sorted(key for key in resolved if key != "max_steps" and saved.get(key) != resolved[key])
        if changed:
            raise ConfigError(f"{run_dir} holds a run trained with other settings ({', '.join(changed)}); "
                              f"choose another run_dir, or only raise max_steps to continue it")


def claim_run_dir(run_dir: Path, config: TrainingConfig) -> None:
    """Write the resolved config, after `check_run_dir`."""
    check_run_dir(run_dir, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
