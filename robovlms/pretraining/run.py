"""`pretrain`: a backbone pre-trained on frames and texts by Lightning's Trainer, written where
`backbone: {size: pretrained, path: ...}` loads it; cached by the content of its settings, resumable.

    <root>/frames-<hash>/             the rendered views (robovlms/pretraining/frames.py), shared by every backbone
    <root>/<backbone>-<hash>/         the pre-trained backbone: its `save_pretrained` files (for a transformers model:
                                      config.json, model.safetensors, tokenizer and processor files), then
        pretraining.json              the settings, their hash, losses and times (written last: the cache's mark)
        training/                     the Lightning run: config.yaml, checkpoints/, logs/, training_time.json

A run is deterministic for its settings: the backbone's initial weights follow from the seed, and batch k (which
views, which texts) from (seed, k) alone, so a run killed and started again resumes from its last checkpoint and
ends with the weights an uninterrupted run would have. Processes asking for the same pre-training at once (two
sweep workers) take turns on a lock: the first trains, the others then find it done.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import yaml
from filelock import FileLock
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from robovlms.atomic_files import write_json_atomically
from robovlms.backbone import create_backbone
from robovlms.data.windows import batch_as_is
from robovlms.errors import ConfigError
from robovlms.pretraining.config import PretrainingConfig, content_hash, load_pretraining_config
from robovlms.pretraining.frames import FrameSet, frame_set
from robovlms.pretraining.module import TEXTS_PER_VIEW, PretrainingModule, ViewTexts
from robovlms.results import cpu_seconds
from robovlms.training import CHECKPOINT_DIR, CONFIG_FILE, StepBatchSampler, training_seconds
from robovlms.training.checkpoints import resume_point
from robovlms.training.run_dir import TrainingClock
from robovlms.training.trainer import _without_lightning_notices

PRETRAINING_FILE = "pretraining.json"
TRAINING_DIR = "training"
VALIDATION_SEED = 7919  # which episodes a frame set holds out for val/loss, whatever the run's seed


def pretrained_path(config: PretrainingConfig | dict[str, Any], root: str | Path) -> Path:
    """Where the backbone of these settings is (or will be) pre-trained under `root`."""
    config = load_pretraining_config(config)
    return Path(root) / f"{config.backbone.name}-{content_hash(config)[:12]}"


def pretraining_record(path: str | Path) -> dict[str, Any] | None:
    """The record of a finished pre-training at `path` (settings, hash, losses, times); None when unfinished."""
    record = Path(path) / PRETRAINING_FILE
    return json.loads(record.read_text()) if record.is_file() else None


def pretrain(config: PretrainingConfig | dict[str, Any] | str | Path, root: str | Path, *, workers: int = 1,
             progress: bool = False, callbacks: Sequence[L.Callback] = ()) -> Path:
    """Pre-train the backbone of `config` under `root` and return its directory; a directory already finished with
    these settings is returned as it is. `workers`: processes rendering the frames."""
    config = load_pretraining_config(config)
    out = pretrained_path(config, root)
    if _finished(out, config):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not _finished(out, config):  # not finished by the process that held the lock before
            _pretrain(config, out, workers, progress, callbacks)
    return out


def _finished(out: Path, config: PretrainingConfig) -> bool:
    record = pretraining_record(out)
    return record is not None and record["hash"] == content_hash(config)


def _pretrain(config: PretrainingConfig, out: Path, workers: int, progress: bool,
              callbacks: Sequence[L.Callback]) -> None:
    started, cpu_started = time.perf_counter(), cpu_seconds()
    frames = frame_set(config.frames, out.parent, workers, progress)
    frame_cpu_seconds = cpu_seconds() - cpu_started
    training, validation = split_views(frames, config.validation_fraction)
    L.seed_everything(config.seed, workers=True, verbose=False)
    backbone = create_backbone(config.backbone.name, config.backbone.size, config.backbone.path,
                               **config.backbone.options)
    module = PretrainingModule(backbone, config)
    run_dir = out / TRAINING_DIR
    _claim(run_dir, config)
    resume_from, start = resume_point(run_dir / CHECKPOINT_DIR)
    texts = ViewTexts(frames, training, config.text, backbone.grounded_phrase, config.seed)
    loader = DataLoader(texts, batch_sampler=StepBatchSampler(len(texts), config.batch_size, config.seed, start,
                                                              config.max_steps), collate_fn=batch_as_is)
    validation_loader = _validation_loader(frames, validation, config, backbone) if validation else None
    with _without_lightning_notices():
        trainer = L.Trainer(
            max_steps=config.max_steps, gradient_clip_val=config.gradient_clip, accelerator="cpu", devices=1,
            log_every_n_steps=config.log_every, enable_progress_bar=progress, enable_model_summary=False,
            num_sanity_val_steps=0, val_check_interval=config.validate_every, check_val_every_n_epoch=None,
            limit_val_batches=config.validation_batches if validation else 0, use_distributed_sampler=False,
            logger=CSVLogger(run_dir, name="logs"),
            callbacks=[ModelCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, filename="step{step}", save_last=True,
                                       every_n_train_steps=config.checkpoint_every, save_top_k=1,
                                       auto_insert_metric_name=False, enable_version_counter=False),
                       TrainingClock(run_dir, config.checkpoint_every), *callbacks])
        if start < config.max_steps:
            trainer.fit(module, loader, validation_loader, ckpt_path=resume_from, weights_only=True)
    _save_quietly(backbone, out, progress)
    curve = _curve(run_dir)
    write_json_atomically(out / PRETRAINING_FILE, {
        "hash": content_hash(config), "settings": config.model_dump(mode="json"), "backbone": backbone.label,
        "frames": str(frames.path), "training_views": len(training), "validation_views": len(validation),
        "steps": config.max_steps, "final_train_loss": curve.get("train/loss"), "final_val_loss": curve.get("val/loss"),
        "train_seconds": training_seconds(run_dir), "frame_cpu_seconds": frame_cpu_seconds,
        "seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu_started})


def _save_quietly(backbone, out: Path, progress: bool) -> None:
    """`save_pretrained`, with transformers' progress bar only where progress is shown."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    if not progress:
        transformers_logging.disable_progress_bar()
    try:
        backbone.save_pretrained(out)
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def split_views(frames: FrameSet, validation_fraction: float) -> tuple[list[int], list[int]]:
    """(training, validation) views: the views of a fixed `validation_fraction` of the frame set's episodes are
    held out, so no validation view shares an episode with a training one."""
    episodes = frames.views.groupby(["task", "scene", "seed"], sort=True).ngroup().to_numpy()
    count = round(validation_fraction * float(episodes.max() + 1))
    held_out = np.random.default_rng(VALIDATION_SEED).permutation(episodes.max() + 1)[:count]
    validation = np.isin(episodes, held_out)
    return np.flatnonzero(~validation).tolist(), np.flatnonzero(validation).tolist()


def _validation_loader(frames: FrameSet, views: list[int], config: PretrainingConfig, backbone) -> DataLoader:
    """The same items at every validation: each held-out view once, with its first text, in fixed batches."""
    texts = ViewTexts(frames, views, config.text, backbone.grounded_phrase, VALIDATION_SEED)
    items = [index * TEXTS_PER_VIEW for index in range(len(views))]
    batches = [items[i:i + config.batch_size] for i in range(0, len(items), config.batch_size)]
    return DataLoader(texts, batch_sampler=batches[:config.validation_batches], collate_fn=batch_as_is)


def _claim(run_dir: Path, config: PretrainingConfig) -> None:
    """The run's settings, written once; a directory is named by their hash, so a mismatch is a damaged one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / CONFIG_FILE
    resolved = config.model_dump(mode="json")
    if saved.is_file() and yaml.safe_load(saved.read_text()) != resolved:
        raise ConfigError(f"{run_dir} holds a pre-training run of other settings than its directory's name says; "
                          f"delete {run_dir.parent} to pre-train again")
    saved.write_text(yaml.safe_dump(resolved, sort_keys=False))


def _curve(run_dir: Path) -> dict[str, float]:
    """The last logged value of each metric of the run's CSV logs."""
    import pandas as pd

    files = sorted((run_dir / "logs").glob("version_*/metrics.csv"))
    if not files:
        return {}
    frame = pd.concat([pd.read_csv(file) for file in files], ignore_index=True)
    return {column: float(frame[column].dropna().iloc[-1]) for column in ("train/loss", "val/loss")
            if column in frame and frame[column].notna().any()}
