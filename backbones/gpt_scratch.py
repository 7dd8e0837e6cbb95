"""gpt-scratch: the no-VLM-pretraining baseline. A small conv stem turns each image into a grid of tokens
that take their place in the sequence of a nanoGPT-style causal decoder; everything trains from scratch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedTokenizerFast

from robovlms.backbone import SPEC_FILE, Backbone, Context, load_backbone, options_to_config, resolve_pretrained
from robovlms.backbone.activations import Elements, Layers, Saved, training_flags, trains
from robovlms.errors import ConfigError
from robovlms.tokenizer import train_instruction_tokenizer


@dataclass
class GPTScratchConfig:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    image_size: int = 64
    conv_channels: int = 64  # 4 stride-2 convs: an S x S image becomes (S/16)^2 tokens
    max_positions: int = 512
    vocab_size: int = 512  # the tokenizer's size; grows when action tokens are appended
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    init_std: Annotated[float, Field(gt=0)] = 0.02  # of every linear and embedding weight (nanoGPT's; docs/demo.md)


class ConvImageEncoder(nn.Module):
    def __init__(self, config: GPTScratchConfig):
        super().__init__()
        channels = [3, config.conv_channels // 2, config.conv_channels, config.conv_channels, config.conv_channels]
        layers = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(config.conv_channels, config.hidden_size)
        self.position = nn.Parameter(torch.zeros((config.image_size // 16) ** 2, config.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.convs(images)  # (N, C, S/16, S/16)
        x = x.flatten(2).transpose(1, 2)  # (N, n, C)
        return self.proj(x) + self.position  # (N, n, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTScratchConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, L, d)
        # right padding comes after every real token, so causality alone keeps it out of their view
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, config: GPTScratchConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, 4 * config.hidden_size), nn.GELU(),
                                 nn.Linear(4 * config.hidden_size, config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPTScratch(nn.Module):
    image_encoder_class = ConvImageEncoder

    def __init__(self, config: GPTScratchConfig):
        super().__init__()
        self.config = config
        self.image_encoder = self.image_encoder_class(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_positions, config.hidden_size)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.layers)])
        self.ln_f = nn.LayerNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.gradient_checkpointing = False  # recompute each block's activations in backward
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=config.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        L = inputs_embeds.shape[1]
        if L > self.config.max_positions:
            raise ConfigError(f"context of {L} tokens exceeds max_positions={self.config.max_positions}")
        x = inputs_embeds + self.wpe(torch.arange(L, device=inputs_embeds.device))
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.gradient_checkpointing and self.training else block(x)
        return self.ln_f(x)  # (B, L, D)


class GPTScratchBackbone(Backbone):
    name = "gpt-scratch"
    description = "no VLM pre-training: conv image stem + nanoGPT-style decoder, trained from scratch"
    model_types = ("gpt-scratch",)
    tiny_config = GPTScratchConfig
    lora_target_modules = r"blocks\.\d+\.attn\.(qkv|proj)"
    config_class = GPTScratchConfig
    model_class = GPTScratch

    def __init__(self, config: GPTScratchConfig, tokenizer, size: str, origin: str | None):
        super().__init__(size=size, origin=origin, tokenizer=tokenizer, image_size=config.image_size,
                         image_mean=config.image_mean, image_std=config.image_std)
        self.model = self.model_class(config)

    @classmethod
    def tiny(cls, **options) -> GPTScratchBackbone:
        tokenizer_vocab_size = options.pop("vocab_size", cls.config_class.vocab_size)
        tokenizer = train_instruction_tokenizer(tokenizer_vocab_size)
        config = options_to_config(cls.config_class, {**options, "vocab_size": len(tokenizer)}, cls.name)
        return cls(config, tokenizer, "tiny", None)

    @classmethod
    def pretrained(cls, path: str) -> GPTScratchBackbone:
        """No public weights: `path` is a directory saved from a backbone of this kind trained earlier."""
        directory = resolve_pretrained(path, cls.model_types, cls.name)
        if not (directory / SPEC_FILE).is_file():
            raise ConfigError(f"{directory} holds no saved {cls.name} backbone ({SPEC_FILE} is missing)")
        backbone = load_backbone(directory)
        backbone.size, backbone.origin = "pretrained", str(path)
        return backbone

    @classmethod
    def from_saved(cls, directory: Path, size: str, origin: str | None) -> GPTScratchBackbone:
        saved = json.loads((directory / "config.json").read_text())
        saved.pop("model_type")
        config = cls.config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        return cls(config, PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True), size, origin)

    def save_files(self, directory: Path) -> None:
        config = {"model_type": self.model_types[0], **asdict(self.model.config)}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        self.tokenizer.save_pretrained(directory)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def supports_gradient_checkpointing(cls) -> bool:
        return True

    def enable_gradient_checkpointing(self) -> None:
        self.model.gradient_checkpointing = True

    def block_classes(self) -> set[type[nn.Module]]:
        return {Block}

    def image_block(self) -> tuple[list[int], int, list[int]]:
        return [], (self.image_size // 16) ** 2, []

    def contextualise(self, context: Context, images: torch.Tensor, suffix_embeds: torch.Tensor) -> torch.Tensor:
        embeds = self.merge_embeddings(context, self.model.image_encoder(images), suffix_embeds)
        return self.model(embeds)

    def activation_layers(self, images: int, rows: int, context: int) -> list[Layers | Saved]:
        """The conv stem over each image, then the decoder's blocks over the contexts (causal attention without
        a mask) and its final norm."""
        config = self.model.config
        described = []
        if self.image_encoder_on_gradient_path():
            described.append(Saved("image encoder", Elements(other=images * self.image_encoder_elements())))
        described.append(Layers("decoder", config.layers, rows, context, config.hidden_size, 4 * config.hidden_size,
                                config.heads, input_projections=1, **training_flags(self.model.blocks[0])))
        return described + [Saved("final norm", Elements(norms=rows * context * (config.hidden_size + 2)))]

    def image_encoder_on_gradient_path(self) -> bool:
        return trains([self.model.image_encoder])

    def image_encoder_elements(self) -> int:
        """Per image: the pixels, and each conv layer's output three times (kept by its group norm, its GELU and
        the next layer)."""
        S, c = self.image_size, self.model.config.conv_channels
        return 3 * S * S + sum(3 * channels * (S >> (i + 1)) ** 2 for i, channels in enumerate([c // 2, c, c, c]))

    def input_embeddings(self) -> nn.Embedding:
        return self.model.wte

    def output_embeddings(self) -> nn.Module:
        return self.model.lm_head

    def resize_vocabulary(self, vocab_size: int) -> None:
        old = self.model.wte
        new = nn.Embedding(vocab_size, old.embedding_dim).to(old.weight.device, old.weight.dtype)
        nn.init.normal_(new.weight, std=self.model.config.init_std)
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
