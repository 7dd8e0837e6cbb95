"""one-step-continuous: the backbone's hidden state at a learnable [LRN] token, appended after the current
observation and the instruction, feeds an MLP that predicts the next L actions (arm regressed, gripper binary)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robovlms.formulation import ContinuousActionConfig, ContinuousActionHead, ContinuousFormulation


@dataclass
class OneStepContinuousConfig(ContinuousActionConfig):
    pass


class OneStepContinuous(ContinuousFormulation):
    name = "one-step-continuous"
    description = "current observation -> [LRN] hidden state -> MLP -> chunk of L continuous actions"
    single_frame = True
    config_class = OneStepContinuousConfig

    def __init__(self, backbone, action_statistics, state_statistics, **settings):
        super().__init__(backbone, action_statistics, state_statistics, **settings)
        self.head = ContinuousActionHead(backbone.hidden_size, self.config.head_width, self.chunk, self.action_dim)

    def forward(self, encoded: dict[str, torch.Tensor], instructions: list[str]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.backbone(encoded["pixel_values"], instructions, self.lrn_embeds(encoded))  # (B, 1, K, D)
        return self.head(hidden[:, :, -1])  # at the [LRN]: (B, 1, L, A-1), (B, 1, L)
