"""gru-head, an example formulation plugin: each frame passes the backbone once with a learnable [LRN] token after
it, giving one hidden state per frame; a GRU reads them in order, and its output at each frame is the condition from
which the action objective (regression, flow matching or diffusion, robovlms' `ContinuousActionConfig`) produces that
frame's chunk of L actions. The entry point in this package's pyproject.toml registers it under the name
`gru-head`; docs/adding-a-formulation.md walks through it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from robovlms.errors import ConfigError
from robovlms.formulation import ContinuousActionConfig, ContinuousFormulation


@dataclass
class GRUHeadConfig(ContinuousActionConfig):
    """The options of `formulation.options`: the action objective's (inherited), then the GRU's own."""

    gru_width: int = 256
    gru_layers: int = 1


class GRUHead(ContinuousFormulation):
    name = "gru-head"
    description = "each frame through the backbone once -> [LRN] state; a GRU over the H most recent (example plugin)"
    config_class = GRUHeadConfig

    @classmethod
    def check_settings(cls, history, chunk, options):
        config = super().check_settings(history, chunk, options)  # unknown options, the action objective's
        for option in ("gru_width", "gru_layers"):
            value = getattr(config, option)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"gru-head: {option} must be a positive integer, got {value!r}")
        return config

    def __init__(self, backbone, action_statistics, state_statistics, **settings):
        super().__init__(backbone, action_statistics, state_statistics, **settings)
        self.gru = nn.GRU(backbone.hidden_size, self.config.gru_width, self.config.gru_layers, batch_first=True)
        self.head = self.action_objective(self.config.gru_width)

    def encode(self, images: torch.Tensor, state: torch.Tensor, instructions: list[str]) -> dict[str, torch.Tensor]:
        inputs = super().encode(images, state, instructions)  # pixel values (B, T, V, 3, S, S), state (B, T, S)
        hidden = self.backbone(inputs["pixel_values"], instructions, self.lrn_embeds(inputs))  # (B, T, K, D)
        return {"frame_state": hidden[:, :, -1]}  # (B, T, D): each frame's [LRN] state, kept by rollouts

    def forward(self, encoded: dict[str, torch.Tensor], instructions: list[str]) -> torch.Tensor:
        return self.gru(encoded["frame_state"])[0]  # (B, T, W): each frame's condition, from the frames up to it
