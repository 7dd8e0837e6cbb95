"""Qwen2-VL as a robovlms backbone plugin, written from docs/adding-a-backbone.md alone; a test-only module (not
shipped) that proves the doc's steps for a Qwen2-VL-class model. The tests register it through an entry point of
a throw-away distribution, `robovlms-qwen2vl`, as a package installed with pip would.

What Qwen2-VL needs beyond LLaVA: its image processor's size is a pixel count, so the image side is declared;
Qwen2VLProcessor cannot be built without torchvision (its video processor), so the tokenizer and the PIL image
processor are kept and saved side by side; image tokens take M-RoPE positions (temporal, height, width) from
`get_rope_index`; and every image block is framed by <|vision_start|> ... <|vision_end|>, without which the
blocks of several camera views would read as one image."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen2VLImageProcessorPil)

from robovlms.backbone import Context, TransformersBackbone, options_to_config, resolve_pretrained
from robovlms.errors import ConfigError
from robovlms.tokenizer import train_instruction_tokenizer

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
PRETRAINED_IMAGE_SIZE = 224  # fixed-size square images: (224 / 28)^2 = 64 image tokens for Qwen2-VL-2B/7B


@dataclass
class Qwen2VLTinyConfig:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    image_size: int = 64
    patch_size: int = 8
    merge_size: int = 2  # 2x2 patches merge into one image token: (64 / 16)^2 = 16 tokens per image
    tokenizer_vocab_size: int = 512


class Qwen2VLParts:
    """What Qwen2VLProcessor holds for images and text, without its video processor (which needs torchvision)."""

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, tokenizer: PreTrainedTokenizerFast):
        self.image_processor, self.tokenizer = image_processor, tokenizer

    @classmethod
    def from_pretrained(cls, directory: Path) -> Qwen2VLParts:
        return cls(Qwen2VLImageProcessorPil.from_pretrained(directory, local_files_only=True),
                   PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True))

    def save_pretrained(self, directory: Path) -> None:
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


class Qwen2VLBackbone(TransformersBackbone):
    """Qwen2-VL (test plugin): ViT with 2x2 patch merger, image tokens at M-RoPE positions in a Qwen2 decoder."""

    name = "qwen2vl"
    description = "Qwen2-VL: ViT + 2x2 patch merger, image tokens at M-RoPE positions in a Qwen2 decoder"
    model_class = Qwen2VLForConditionalGeneration
    model_types = ("qwen2_vl",)
    lora_target_modules = r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

    def __init__(self, model, parts: Qwen2VLParts, size: str, origin: str | None):
        pixels = parts.image_processor.size
        if pixels["shortest_edge"] != pixels["longest_edge"] or math.isqrt(pixels["shortest_edge"]) ** 2 != \
                pixels["shortest_edge"]:
            raise ConfigError(f"qwen2vl takes fixed-size square images: the image processor's min and max pixels "
                              f"must be one square number, got {pixels['shortest_edge']} and {pixels['longest_edge']}")
        super().__init__(model, parts, size, origin, image_size=math.isqrt(pixels["shortest_edge"]))

    @classmethod
    def tiny(cls, **options) -> Qwen2VLBackbone:
        tiny = options_to_config(Qwen2VLTinyConfig, options, cls.name)
        tokenizer = train_instruction_tokenizer(tiny.tokenizer_vocab_size, [VISION_START, VISION_END, IMAGE_PAD,
                                                                            VIDEO_PAD])
        image_processor = Qwen2VLImageProcessorPil(min_pixels=tiny.image_size ** 2, max_pixels=tiny.image_size ** 2,
                                                   patch_size=tiny.patch_size, merge_size=tiny.merge_size)
        half = tiny.hidden_size // tiny.heads // 2  # rotary frequencies per head, split over (t, h, w) as Qwen2-VL's
        mrope_section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # 128-dim heads: 16, 24, 24
        start, end, image, video = tokenizer.convert_tokens_to_ids([VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD])
        config = Qwen2VLConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=tiny.hidden_size,
                             intermediate_size=4 * tiny.hidden_size, num_hidden_layers=tiny.layers,
                             num_attention_heads=tiny.heads, num_key_value_heads=tiny.heads,
                             max_position_embeddings=1024,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": mrope_section},
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id),
            vision_config=dict(depth=tiny.layers, embed_dim=tiny.hidden_size, hidden_size=tiny.hidden_size,
                               num_heads=tiny.heads, patch_size=tiny.patch_size, spatial_merge_size=tiny.merge_size,
                               temporal_patch_size=2),
            image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)
        return cls(Qwen2VLForConditionalGeneration(config), Qwen2VLParts(image_processor, tokenizer), "tiny", None)

    @classmethod
    def pretrained(cls, path: str) -> Qwen2VLBackbone:
        directory = resolve_pretrained(path, cls.model_types, cls.name)
        parts = Qwen2VLParts.from_pretrained(directory)
        parts.image_processor.size = {"shortest_edge": PRETRAINED_IMAGE_SIZE ** 2,
                                      "longest_edge": PRETRAINED_IMAGE_SIZE ** 2}
        model = Qwen2VLForConditionalGeneration.from_pretrained(directory, local_files_only=True)
        return cls(model, parts, "pretrained", str(path))

    @classmethod
    def from_saved(cls, directory: Path, size: str, origin: str | None) -> Qwen2VLBackbone:
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(directory, local_files_only=True))
        return cls(model, Qwen2VLParts.from_pretrained(directory), size, origin)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def image_block(self) -> tuple[list[int], int, list[int]]:
        start, end = self.tokenizer.convert_tokens_to_ids([VISION_START, VISION_END])
        merge = self.model.config.vision_config.spatial_merge_size
        return [start], (self.image_size // (self.model.config.vision_config.patch_size * merge)) ** 2, [end]

    def patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) -> flattened patches (N * h * w, 3 * 2 * p * p) and their grid (N, 3), in the order
        Qwen2VLImageProcessor gives them: a still image is two identical temporal patches."""
        vision = self.model.config.vision_config
        p, m, t = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        N, C, S, _ = images.shape
        h = w = S // p
        x = images.unsqueeze(1).expand(N, t, C, S, S)
        x = x.reshape(N, t, C, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        grid = torch.tensor([1, h, w], device=images.device).expand(N, 3)
        return x.reshape(N * h * w, C * t * p * p), grid

    def contextualise(self, context: Context, images: torch.Tensor, suffix_embeds: torch.Tensor) -> torch.Tensor:
        patches, grid = self.patches(images)
        image_tokens = torch.cat(self.model.model.get_image_features(patches, grid).pooler_output)  # (N * n, D)
        embeds = self.merge_embeddings(context, image_tokens, suffix_embeds)
        positions, _ = self.model.model.get_rope_index(context.input_ids, context.image_slots.int(), grid,
                                                       attention_mask=context.attention_mask)  # (3, R, L)
        return self.model.model.language_model(inputs_embeds=embeds, attention_mask=context.attention_mask,
                                                position_ids=positions, use_cache=False).last_hidden_state

    def reference_hidden_state(self, image: torch.Tensor, instruction: str, suffix_embed: torch.Tensor):
        config = self.model.config
        processed = self.processor.image_processor(images=[image.numpy()], return_tensors="pt")
        tokens = int(processed.image_grid_thw.prod()) // config.vision_config.spatial_merge_size ** 2
        ids = torch.tensor([[self.tokenizer.bos_token_id, config.vision_start_token_id]
                            + [config.image_token_id] * tokens + [config.vision_end_token_id]
                            + self.tokenizer(instruction, add_special_tokens=False)["input_ids"]
                            + [self.tokenizer.pad_token_id]])  # the last id stands for the suffix embedding
        embeds = self.model.get_input_embeddings()(ids)
        embeds[0, -1] = suffix_embed
        out = self.model(input_ids=ids, inputs_embeds=embeds, pixel_values=processed.pixel_values,
                         image_grid_thw=processed.image_grid_thw, mm_token_type_ids=(ids == config.image_token_id)
                         .int(), output_hidden_states=True)
        return out.hidden_states[-1][0, -1]

    def vision_modules(self) -> list[nn.Module]:
        return [self.model.model.visual]

    def language_modules(self) -> list[nn.Module]:
        return [self.model.model.language_model, self.model.lm_head]
