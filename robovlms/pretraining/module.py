"""What one pre-training step computes: the backbone's own language-modelling loss on views and their texts; and
the views and texts it computes it on. The Trainer owns the rest, as for policy training."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from robovlms.backbone import Backbone
from robovlms.pretraining.config import PretrainingConfig, TextSettings
from robovlms.pretraining.frames import FrameSet
from robovlms.pretraining.text import KINDS, view_text
from robovlms.training import TrainingDivergedError, WarmupCosine

TEXTS_PER_VIEW = 1024  # the texts a view can be drawn with: item k is view k // 1024 with text draw k % 1024


class ViewTexts(Dataset):
    """Item k: the image of view `views[k // TEXTS_PER_VIEW]` and a text of a kind drawn by the text weights, written
    with a generator seeded by (seed, view, k % TEXTS_PER_VIEW): an item is always the same text, so batches drawn
    by step (robovlms/training/batches.py) make a run that resumes exactly."""

    def __init__(self, frames: FrameSet, views: list[int], text: TextSettings, ground, seed: int):
        self.frames, self.views, self.ground, self.seed = frames, np.asarray(views), ground, seed
        weights = np.array([getattr(text, kind) for kind in KINDS], dtype=float)
        self.kind_probabilities = weights / weights.sum()

    def __len__(self) -> int:
        return len(self.views) * TEXTS_PER_VIEW

    def text(self, index: int) -> tuple[str, str]:
        view, draw = int(self.views[index // TEXTS_PER_VIEW]), index % TEXTS_PER_VIEW
        rng = np.random.default_rng([self.seed, view, draw])
        kind = KINDS[rng.choice(len(KINDS), p=self.kind_probabilities)]
        return view_text(self.frames.objects(view), self.frames.views.camera.iloc[view], kind, rng, self.ground)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        views = self.views[np.asarray(indices) // TEXTS_PER_VIEW]
        prompts, targets = zip(*(self.text(index) for index in indices))
        return {"images": torch.from_numpy(np.asarray(self.frames.images[views])),  # (N, S, S, 3) uint8
                "prompts": list(prompts), "targets": list(targets)}


class PretrainingModule(L.LightningModule):
    """One step of the backbone's language-modelling loss (`Backbone.language_modeling_loss`); every parameter of
    the backbone trains."""

    def __init__(self, backbone: Backbone, config: PretrainingConfig):
        super().__init__()
        self.backbone = backbone
        self.config = config

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        images = self.backbone.preprocess_images(batch["images"][:, None, None])[:, 0, 0]  # (N, 3, S, S)
        return self.backbone.language_modeling_loss(images, batch["prompts"], batch["targets"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"the pre-training loss became {loss.item()} at step {self.global_step}; "
                                        f"try a lower learning_rate (now {self.config.learning_rate}) or more "
                                        f"warmup_steps")
        if (self.global_step + 1) % self.config.log_every == 0:
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompts"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch), batch_size=len(batch["prompts"]))

    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.config.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=self.config.learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(self.config.warmup_steps,
                                                                             self.config.max_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

