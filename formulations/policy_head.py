"""policy-head (RoboFlamingo style, the RoboVLMs paper's best): each frame passes the backbone once, giving one
[LRN] hidden state per step; a head (LSTM, GPT or MLP) fuses the H most recent states into the condition from
which the action objective produces the chunk.

A training window of H frames is encoded once and every one of its frames is supervised, the head seeing the
frames up to it, so a frame costs one backbone pass per sampled sequence rather than one per overlapping window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from robovlms.errors import UnknownNameError
from robovlms.formulation import ContinuousActionConfig, ContinuousFormulation

HEADS = ("lstm", "gpt", "mlp")


@dataclass
class PolicyHeadConfig(ContinuousActionConfig):
    head: str = "lstm"  # lstm | gpt | mlp: how the H most recent frame states are fused
    fusion_width: int = 256
    fusion_layers: int = 2  # LSTM layers, GPT blocks or MLP hidden layers


class LSTMFusion(nn.Module):
    def __init__(self, hidden_size: int, width: int, layers: int, history: int):
        super().__init__()
        self.lstm = nn.LSTM(hidden_size, width, layers, batch_first=True)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.lstm(states)[0]  # (B, T, W)


class GPTFusion(nn.Module):
    def __init__(self, hidden_size: int, width: int, layers: int, history: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, width)
        self.position = nn.Parameter(torch.zeros(history, width))
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(width)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        T = states.shape[1]
        x = self.proj(states) + self.position[:T]
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=states.device, dtype=x.dtype)
        return self.ln_f(self.blocks(x, mask=causal, is_causal=True))  # (B, T, W)


class MLPFusion(nn.Module):
    """The H most recent states side by side; before the first frame, the first state repeats."""

    def __init__(self, hidden_size: int, width: int, layers: int, history: int):
        super().__init__()
        self.history = history
        sizes = [history * hidden_size] + [width] * max(layers, 1)
        blocks = []
        for n_in, n_out in zip(sizes, sizes[1:]):
            blocks += [nn.Linear(n_in, n_out), nn.GELU()]
        self.mlp = nn.Sequential(*blocks)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([states[:, :1].expand(-1, self.history - 1, -1), states], dim=1)  # (B, H-1+T, D)
        windows = padded.unfold(1, self.history, 1)  # (B, T, D, H)
        return self.mlp(windows.transpose(2, 3).flatten(2))  # (B, T, W)


FUSIONS = {"lstm": LSTMFusion, "gpt": GPTFusion, "mlp": MLPFusion}


class PolicyHead(ContinuousFormulation):
    name = "policy-head"
    description = "each frame through the backbone once -> [LRN] state; an LSTM/GPT/MLP head fuses H of them"
    batched_rollouts = True  # checked by tests/test_batched_policy.py
    config_class = PolicyHeadConfig

    @classmethod
    def check_settings(cls, history, chunk, options):
        config = super().check_settings(history, chunk, options)
        if config.head not in FUSIONS:
            raise UnknownNameError("policy head", config.head, HEADS)
        return config

    def __init__(self, backbone, action_statistics, state_statistics, **settings):
        super().__init__(backbone, action_statistics, state_statistics, **settings)
        self.fusion = FUSIONS[self.config.head](backbone.hidden_size, self.config.fusion_width,
                                                self.config.fusion_layers, self.history)
        self.head = self.action_objective(self.config.fusion_width)

    def encode(self, images, state, instructions):
        inputs = super().encode(images, state, instructions)
        hidden = self.backbone(inputs["pixel_values"], instructions, self.lrn_embeds(inputs))  # (B, T, K, D)
        return {"frame_state": hidden[:, :, -1].to(self.weight_dtype)}  # at each [LRN]

    def forward(self, encoded: dict[str, torch.Tensor], instructions: list[str]) -> torch.Tensor:
        return self.fusion(encoded["frame_state"])  # (B, T, W): each frame's condition of the action objective
