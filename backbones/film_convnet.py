"""film-convnet: the reference, not a VLM. RT-1's recipe in miniature: a small ConvNet whose every layer is
modulated by the instruction (FiLM), its feature map flattened into a few image tokens, and a one-layer
nanoGPT-style decoder over the image tokens, the instruction and the suffix. Everything trains from scratch.

It shows the headroom of the tiny VLM backbones: a plain behaviour-cloning network with the same data, budget and
formulations. Reports label it "reference, no VLM".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerFast

from robovlms.backbone import SPEC_FILE, Backbone, Context, load_backbone, options_to_config, resolve_pretrained
from robovlms.backbones.gpt_scratch import Block
from robovlms.errors import ConfigError
from robovlms.tokenizer import train_instruction_tokenizer


@dataclass
class FiLMConvNetConfig:
    hidden_size: int = 64
    layers: int = 1  # decoder blocks over image tokens, instruction and suffix
    heads: int = 4
    image_size: int = 64
    conv_channels: int = 64  # 4 stride-2 convs: 32, 64, 64, 64 channels
    image_tokens: int = 4  # the flattened (S/16)^2 feature map projected to this many tokens
    max_positions: int = 512
    vocab_size: int = 512  # the tokenizer's size; grows when action tokens are appended
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)


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


class FiLMConvNet(nn.Module):
    def __init__(self, config: FiLMConvNetConfig):
        super().__init__()
        self.config = config
        self.image_encoder = FiLMConvEncoder(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_positions, config.hidden_size)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for film in self.image_encoder.films:  # FiLM starts as the identity
            nn.init.zeros_(film.weight)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        L = inputs_embeds.shape[1]
        if L > self.config.max_positions:
            raise ConfigError(f"context of {L} tokens exceeds film-convnet max_positions={self.config.max_positions}")
        x = inputs_embeds + self.wpe(torch.arange(L, device=inputs_embeds.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)  # (B, L, D)


class FiLMConvNetBackbone(Backbone):
    name = "film-convnet"
    description = "reference, no VLM: FiLM-conditioned ConvNet (RT-1 in miniature) + one decoder layer, from scratch"
    model_types = ("film-convnet",)
    lora_target_modules = r"blocks\.\d+\.attn\.(qkv|proj)"

    def __init__(self, config: FiLMConvNetConfig, tokenizer, size: str, origin: str | None):
        super().__init__(size=size, origin=origin, tokenizer=tokenizer, image_size=config.image_size,
                         image_mean=config.image_mean, image_std=config.image_std)
        self.model = FiLMConvNet(config)

    @property
    def label(self) -> str:
        return f"{super().label.removesuffix(')')}; reference, no VLM)"

    @classmethod
    def tiny(cls, **options) -> FiLMConvNetBackbone:
        tokenizer = train_instruction_tokenizer(options.pop("vocab_size", FiLMConvNetConfig.vocab_size))
        config = options_to_config(FiLMConvNetConfig, {**options, "vocab_size": len(tokenizer)}, cls.name)
        if config.image_size % 16:
            raise ConfigError(f"film-convnet image_size must be a multiple of 16, got {config.image_size}")
        return cls(config, tokenizer, "tiny", None)

    @classmethod
    def pretrained(cls, path: str) -> FiLMConvNetBackbone:
        """film-convnet has no public weights: `path` is a directory saved from a film-convnet trained earlier."""
        directory = resolve_pretrained(path, cls.model_types, cls.name)
        if not (directory / SPEC_FILE).is_file():
            raise ConfigError(f"{directory} holds no saved film-convnet backbone ({SPEC_FILE} is missing)")
        backbone = load_backbone(directory)
        backbone.size, backbone.origin = "pretrained", str(path)
        return backbone

    @classmethod
    def from_saved(cls, directory: Path, size: str, origin: str | None) -> FiLMConvNetBackbone:
        saved = json.loads((directory / "config.json").read_text())
        saved.pop("model_type")
        config = FiLMConvNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        return cls(config, PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True), size, origin)

    def save_files(self, directory: Path) -> None:
        config = {"model_type": "film-convnet", **asdict(self.model.config)}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        self.tokenizer.save_pretrained(directory)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def image_block(self) -> tuple[list[int], int, list[int]]:
        return [], self.model.config.image_tokens, []

    def contextualise(self, context: Context, images: torch.Tensor, suffix_embeds: torch.Tensor) -> torch.Tensor:
        words = self.embed_tokens(context.input_ids)  # (R, L, D)
        text = (context.attention_mask.bool() & ~context.image_slots & ~context.suffix_slots).unsqueeze(-1)
        instruction = (words * text).sum(1) / text.sum(1).clamp_min(1)  # (R, D): the row's mean word embedding
        per_image = instruction.repeat_interleave(images.shape[0] // instruction.shape[0], dim=0)  # (N, D)
        image_tokens = self.model.image_encoder(images, per_image)
        return self.model(self.merge_embeddings(context, image_tokens, suffix_embeds))

    def input_embeddings(self) -> nn.Embedding:
        return self.model.wte

    def output_embeddings(self) -> nn.Module:
        return self.model.lm_head

    def resize_vocabulary(self, vocab_size: int) -> None:
        old = self.model.wte
        new = nn.Embedding(vocab_size, old.embedding_dim).to(old.weight.device)
        nn.init.normal_(new.weight, std=0.02)
        with torch.no_grad():
            new.weight[:old.num_embeddings] = old.weight
        new.weight.requires_grad_(old.weight.requires_grad)
        self.model.wte = new
        self.model.lm_head = nn.Linear(old.embedding_dim, vocab_size, bias=False)
        self.model.lm_head.weight = new.weight
        self.model.config.vocab_size = vocab_size

    def vision_modules(self) -> list[nn.Module]:
        return [self.model.image_encoder]

    def language_modules(self) -> list[nn.Module]:
        return [self.model.wte, self.model.wpe, self.model.blocks, self.model.ln_f, self.model.lm_head]
