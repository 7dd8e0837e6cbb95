"""one-step-discrete (RT-2, OpenVLA): every normalised action dimension of the next L actions is discretised into
bins mapped onto reserved vocabulary tokens, the gripper being one more token (its bin at -1 or +1). The backbone
predicts them one after another after the current observation and the instruction: cross-entropy over the action
tokens in training, greedy decoding constrained to the action tokens at rollout.

The first suffix position holds the [LRN] start token (carrying the proprio state if used); position i holds the
embedding of action token i, and the hidden state at position i predicts token i + 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from robovlms.formulation import ActionDiscretiser, Formulation


@dataclass
class OneStepDiscreteConfig:
    bins: int = 256  # uniform over [-1, 1] per dimension
    token_mode: str = "overwrite"  # overwrite the last ordinary vocabulary tokens, or append new ones


class OneStepDiscrete(Formulation):
    name = "one-step-discrete"
    description = "current observation -> action tokens (bins per dimension) decoded by the language model"
    single_frame = True
    config_class = OneStepDiscreteConfig

    def __init__(self, backbone, action_statistics, state_statistics, **settings):
        super().__init__(backbone, action_statistics, state_statistics, **settings)
        self.discretiser = ActionDiscretiser(self.config.bins)
        self.register_buffer("action_token_ids", backbone.reserve_action_tokens(self.config.bins,
                                                                                self.config.token_mode))

    def tokens(self, actions: torch.Tensor) -> torch.Tensor:
        """Raw actions (B, L, A) -> bin indices (B, L * A), dimension by dimension, action by action."""
        arm, gripper = self.actions.normalise(actions)
        values = torch.cat([arm, (2 * gripper - 1).unsqueeze(-1)], dim=-1)
        return self.discretiser.discretise(values).flatten(1)

    def forward(self, encoded: dict[str, torch.Tensor], instructions: list[str], bins: torch.Tensor
                ) -> torch.Tensor:
        """bins (B, n) of the tokens decoded so far -> logits over the bins (B, n + 1, bins) of the next ones."""
        start = self.lrn_embeds(encoded)[:, -1:]  # (B, 1, 1, D)
        previous = self.backbone.embed_tokens(self.action_token_ids[bins]).unsqueeze(1)  # (B, 1, n, D)
        suffix = torch.cat([start, previous.to(start.dtype)], dim=2)
        hidden = self.backbone(encoded["pixel_values"][:, -1:], instructions, suffix)  # (B, 1, n + 1, D)
        return self.backbone.lm_logits(hidden[:, 0])[..., self.action_token_ids]

    def predict(self, encoded, instructions):
        B = encoded["pixel_values"].shape[0]
        bins = torch.zeros(B, 0, dtype=torch.long, device=self.lrn.device)
        for _ in range(self.chunk * self.action_dim):
            next_bin = self(encoded, instructions, bins)[:, -1].argmax(-1)
            bins = torch.cat([bins, next_bin.unsqueeze(1)], dim=1)
        values = self.discretiser.undiscretise(bins).view(B, self.chunk, self.action_dim)
        return torch.cat([values[..., :-1], (values[..., -1:] > 0).float()], dim=-1)

    def loss(self, batch: dict[str, Any]):
        encoded = self.encode(batch["images"], batch["state"], batch["instruction"])
        targets = self.tokens(batch["actions"][:, -1])  # (B, L * A)
        logits = self(encoded, batch["instruction"], targets[:, :-1])  # (B, L * A, bins)
        mask = batch["action_mask"][:, -1].repeat_interleave(self.action_dim, dim=1).float()  # (B, L * A)
        count = mask.sum().clamp_min(1)
        loss = (F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none") * mask).sum() / count
        with torch.no_grad():
            predicted = logits.argmax(-1)
            correct = (predicted == targets).float()
            error = (self.discretiser.undiscretise(predicted) - self.discretiser.undiscretise(targets)).abs()
            dims = torch.arange(targets.shape[1], device=targets.device) % self.action_dim
            arm, gripper = mask * (dims < self.action_dim - 1), mask * (dims == self.action_dim - 1)
            metrics = {"token_accuracy": (correct * mask).sum() / count,
                       "arm_error": (error * arm).sum() / arm.sum().clamp_min(1),
                       "gripper_accuracy": (correct * gripper).sum() / gripper.sum().clamp_min(1)}
        return loss, metrics
