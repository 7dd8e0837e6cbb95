"""The LightningModule every formulation trains through: what one step computes; the Trainer owns the rest."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from robovlms.augmentation import augment_images
from robovlms.errors import RobovlmsError
from robovlms.formulation import Formulation
from robovlms.training.checkpoints import LAST_CHECKPOINT
from robovlms.training.config import TrainingConfig
from robovlms.training.run_dir import CHECKPOINT_DIR


class TrainingDivergedError(RobovlmsError):
    """The loss or a gradient stopped being finite; the last good checkpoint is kept."""


class FormulationModule(L.LightningModule):
    """What one training step computes for any formulation; the Trainer owns the rest."""

    def __init__(self, formulation: Formulation, config: TrainingConfig):
        super().__init__()
        self.formulation = formulation
        self.config = config
        self._bad_loss = torch.zeros(())  # the last non-finite loss of this step's micro-batches, or 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        micro_batch = batch_idx % self.config.accumulate_grad_batches  # checkpoints fall between steps
        generator = step_generator(self.config.seed, self.global_step, micro_batch, self.global_rank)
        if self.config.augment:
            batch = {**batch, "images": augment_images(batch["images"], generator)}
        loss, metrics = self.formulation.loss(batch, generator)
        # checked once per optimiser step, by every process together (on_before_optimizer_step)
        self._bad_loss = torch.where(torch.isfinite(loss.detach()), self._bad_loss, loss.detach().float())
        if (self.global_step + 1) % self.config.log_every == 0:  # only where the loggers write: self.log is not free
            batch_size = len(batch["instruction"])
            self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
            self.log_dict({f"train/{name}": value for name, value in metrics.items()}, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, _ = self.formulation.loss(batch, torch.Generator().manual_seed(batch_idx))  # the same noise each time
        self.log("val/loss", loss, batch_size=len(batch["instruction"]), sync_dist=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.config.accumulate_grad_batches == 0:
            self._bad_loss = torch.zeros((), device=self.device)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop before the update when a loss of this step or the gradient stopped being finite. Every process
        decides together (a process that stopped alone would leave the others waiting in a collective); under
        16-mixed an infinite gradient is the loss scaler's to skip, and under DeepSpeed the gradients are the
        engine's, so there the loss alone is checked."""
        gradients = [p.grad for p in self.parameters() if p.grad is not None]
        if gradients and self.config.precision != "16-mixed":
            norm = torch.nn.utils.get_total_norm(gradients)
        else:
            norm = torch.zeros((), device=self.device)
        flags = torch.stack([~torch.isfinite(self._bad_loss), ~torch.isfinite(norm)]).float()
        loss_stopped, gradient_stopped = self.trainer.strategy.reduce(flags, reduce_op="sum").tolist()
        if loss_stopped:
            value = self._bad_loss.item() if not torch.isfinite(self._bad_loss) else "non-finite in another process"
            self._diverged(f"the loss became {value} at step {self.global_step}")
        if gradient_stopped:
            value = norm.item() if not torch.isfinite(norm) else "non-finite in another process"
            self._diverged(f"the gradient norm became {value} at step {self.global_step}")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            # Lightning clips FSDP's gradients by value only; FSDP's own clip_grad_norm_ takes the norm over every
            # shard (torch.nn.utils.clip_grad_norm_ would take each shard's alone)
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)  # Lightning's own

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


def step_generator(seed: int, step: int, micro_batch: int, rank: int) -> torch.Generator:
    """Where augmentation and a sampling objective's noise draw from for one micro-batch of one process: a function
    of (seed, step, micro-batch, process), so a resumed run draws what an uninterrupted one would. Micro-batch 0 of
    process 0 draws what a run without accumulation or several processes draws."""
    base = seed * 1_000_003 + step
    if micro_batch or rank:
        base = int(np.random.SeedSequence([base % 2**64, micro_batch, rank]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(base)


class WarmupCosine:
    """Linear warm-up to the full learning rate, then cosine decay to zero at the last step."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
