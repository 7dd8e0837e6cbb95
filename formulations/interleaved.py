"""interleaved (Octo, GR-1 style): the H most recent observations, each followed by its own [LRN] token, in one
causal backbone context; the hidden state at each [LRN] predicts that frame's chunk of L actions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robovlms.formulation import ContinuousActionConfig, ContinuousActionHead, ContinuousFormulation


@dataclass
class InterleavedConfig(ContinuousActionConfig):
    pass


class Interleaved(ContinuousFormulation):
    name = "interleaved"
    description = "H observations, each followed by [LRN], in one causal context; each [LRN] predicts its chunk"
    config_class = InterleavedConfig

    def __init__(self, backbone, action_statistics, state_statistics, **settings):
        super().__init__(backbone, action_statistics, state_statistics, **settings)
        self.head = ContinuousActionHead(backbone.hidden_size, self.config.head_width, self.chunk, self.action_dim)

    def forward(self, encoded: dict[str, torch.Tensor], instructions: list[str]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.backbone(encoded["pixel_values"], instructions, self.lrn_embeds(encoded),
                               interleaved=True)  # (B, T, 1, D)
        return self.head(hidden[:, :, 0])  # (B, T, L, A-1), (B, T, L)
