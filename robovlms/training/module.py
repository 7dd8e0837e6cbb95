"""The LightningModule every formulation trains through: what one step computes; the Trainer owns the rest."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from robovlms.augmentation import augment_images
from robovlms.errors import RobovlmsError
from robovlms.formulation import Formulation
from robovlms.training.config import TrainingConfig
from robovlms.training.checkpoints import LAST_CHECKPOINT
from robovlms.training.run_dir import CHECKPOINT_DIR


class TrainingDivergedError(RobovlmsError):
    """The loss or a gradient stopped being finite; the last good checkpoint is kept."""


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
            optimizer, WarmupCosine(self.config.warmup_steps, self.config.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class WarmupCosine:
    """Linear warm-up to the full learning rate, then cosine decay to zero at the last step."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
