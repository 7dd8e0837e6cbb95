"""interleaved (Octo, GR-1 style): the H most recent observations, each followed by its own [LRN] token, in one
causal backbone context; the hidden state at each [LRN] is the condition from which the action objective produces
that frame's chunk of L actions. The instruction
comes once, before the frames, or (`instruction: per-frame`, RoboVLMs' layout) before each frame's images."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robovlms.errors import UnknownNameError
from robovlms.formulation import ContinuousActionConfig, ContinuousFormulation


INSTRUCTION_PLACEMENTS = ("once", "per-frame")


@dataclass
class InterleavedConfig(ContinuousActionConfig):
    instruction: str = "once"  # once before the frames, or per-frame before each one's images (RoboVLMs)


class Interleaved(ContinuousFormulation):
    name = "interleaved"
    description = "H observations, each followed by [LRN], in one causal context; each [LRN] predicts its chunk"
    batched_rollouts = True  # checked by tests/test_batched_policy.py
    config_class = InterleavedConfig

    @classmethod
    def check_settings(cls, history, chunk, options):
        config = super().check_settings(history, chunk, options)
        if config.instruction not in INSTRUCTION_PLACEMENTS:
            raise UnknownNameError("instruction placement", config.instruction, INSTRUCTION_PLACEMENTS)
        return config

    def __init__(self, backbone, action_statistics, state_statistics, **settings):
        super().__init__(backbone, action_statistics, state_statistics, **settings)
        self.head = self.action_objective(backbone.hidden_size)

    def forward(self, encoded: dict[str, torch.Tensor], instructions: list[str]) -> torch.Tensor:
        hidden = self.backbone(encoded["pixel_values"], instructions, self.lrn_embeds(encoded), interleaved=True,
                               instruction_per_frame=self.config.instruction == "per-frame")  # (B, T, K, D)
        return hidden[:, :, -1].to(self.weight_dtype)  # (B, T, D): each frame's [LRN] state, the objective's condition
