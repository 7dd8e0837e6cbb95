"""one-step-continuous: the backbone's hidden state at a learnable [LRN] token, appended after the current
observation and the instruction, is the condition from which the action objective (an MLP by default, or a
flow-matching or diffusion action expert) produces the next L actions (arm continuous, gripper binary)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robovlms.formulation import ContinuousActionConfig, ContinuousFormulation


@dataclass
class OneStepContinuousConfig(ContinuousActionConfig):
    pass


class OneStepContinuous(ContinuousFormulation):
    name = "one-step-continuous"
    description = "current observation -> [LRN] hidden state -> action objective -> chunk of L continuous actions"
    single_frame = True
    batched_rollouts = True  # checked by tests/test_batched_policy.py
    config_class = OneStepContinuousConfig

    def __init__(self, backbone, action_statistics, state_statistics, **settings):
        super().__init__(backbone, action_statistics, state_statistics, **settings)
        self.head = self.action_objective(backbone.hidden_size)

    def forward(self, encoded: dict[str, torch.Tensor], instructions: list[str]) -> torch.Tensor:
        hidden = self.backbone(encoded["pixel_values"], instructions, self.lrn_embeds(encoded))  # (B, 1, K, D)
        return hidden[:, :, -1].to(self.weight_dtype)  # (B, 1, D): the [LRN] state, the action objective's condition
