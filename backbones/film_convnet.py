"""film-convnet: the reference, not a VLM. RT-1's recipe in miniature: a small ConvNet whose every layer is
modulated by the instruction (FiLM), its feature map flattened into a few image tokens, and a one-layer
nanoGPT-style decoder (gpt-scratch's) over the image tokens, the instruction and the suffix. Everything trains from
scratch.

It shows the headroom of the tiny VLM backbones: a plain behaviour-cloning network with the same data, budget and
formulations. Reports label it "reference, no VLM".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robovlms.backbone import Context
from robovlms.backbone.activations import trains
from robovlms.backbones.gpt_scratch import GPTScratch, GPTScratchBackbone, GPTScratchConfig
from robovlms.errors import ConfigError


@dataclass
class FiLMConvNetConfig(GPTScratchConfig):
    layers: int = 1  # decoder blocks over image tokens, instruction and suffix
    image_tokens: int = 4  # the flattened (S/16)^2 feature map projected to this many tokens


class FiLMConvEncoder(nn.Module):
    """Images (N, 3, S, S) and an instruction embedding per image (N, D) -> image tokens (N, n, D)."""

    def __init__(self, config: FiLMConvNetConfig):
        super().__init__()
        c = config.conv_channels
        channels = [3, c // 2, c, c, c]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(channels, channels[1:]))
        self.norms = nn.ModuleList(nn.GroupNorm(8, b) for b in channels[1:])
        self.films = nn.ModuleList(nn.Linear(config.hidden_size, 2 * b) for b in channels[1:])
        side = config.image_size // 16
        self.tokens, self.hidden_size = config.image_tokens, config.hidden_size
        self.proj = nn.Linear(c * side * side, config.image_tokens * config.hidden_size)

    def forward(self, images: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        x = images
        for conv, norm, film in zip(self.convs, self.norms, self.films):
            gamma, beta = film(instruction)[:, :, None, None].chunk(2, dim=1)  # (N, C, 1, 1) each
            x = F.gelu(norm(conv(x)) * (1 + gamma) + beta)  # (N, C, S', S')
        return self.proj(x.flatten(1)).view(-1, self.tokens, self.hidden_size)  # (N, n, D)


class FiLMConvNet(GPTScratch):
    image_encoder_class = FiLMConvEncoder

    def __init__(self, config: FiLMConvNetConfig):
        super().__init__(config)
        for film in self.image_encoder.films:  # FiLM starts as the identity
            nn.init.zeros_(film.weight)


class FiLMConvNetBackbone(GPTScratchBackbone):
    name = "film-convnet"
    description = "reference, no VLM: FiLM-conditioned ConvNet (RT-1 in miniature) + one decoder layer, from scratch"
    model_types = ("film-convnet",)
    config_class = FiLMConvNetConfig
    model_class = FiLMConvNet

    @property
    def label(self) -> str:
        return f"{super().label.removesuffix(')')}; reference, no VLM)"

    @classmethod
    def tiny(cls, **options) -> FiLMConvNetBackbone:
        if options.get("image_size", FiLMConvNetConfig.image_size) % 16:
            raise ConfigError(f"film-convnet image_size must be a multiple of 16, got {options['image_size']}")
        return super().tiny(**options)

    def image_block(self) -> tuple[list[int], int, list[int]]:
        return [], self.model.config.image_tokens, []

    def image_encoder_on_gradient_path(self) -> bool:
        """The instruction modulates the stem: a gradient to trainable word embeddings passes through it."""
        return super().image_encoder_on_gradient_path() or self.input_embeddings().weight.requires_grad

    def image_encoder_elements(self) -> int:
        """Per image: each conv layer's output four times (kept by its group norm, its FiLM, its GELU and the
        next layer), and the pixels; three times and no pixels when the stem is frozen (a frozen conv keeps no
        input)."""
        S, c = self.image_size, self.model.config.conv_channels
        stem_trains = trains([self.model.image_encoder])
        copies, pixels = (4, 3 * S * S) if stem_trains else (3, 0)
        return pixels + sum(copies * channels * (S >> (i + 1)) ** 2 for i, channels in enumerate([c // 2, c, c, c]))

    def contextualise(self, context: Context, images: torch.Tensor, suffix_embeds: torch.Tensor) -> torch.Tensor:
        words = self.embed_tokens(context.input_ids)  # (R, L, D)
        text = (context.attention_mask.bool() & ~context.image_slots & ~context.suffix_slots).unsqueeze(-1)
        instruction = (words * text).sum(1) / text.sum(1).clamp_min(1)  # (R, D): the row's mean word embedding
        per_image = instruction.repeat_interleave(images.shape[0] // instruction.shape[0], dim=0)  # (N, D)
        image_tokens = self.model.image_encoder(images, per_image)
        return self.model(self.merge_embeddings(context, image_tokens, suffix_embeds))
