"""LLaVA as a robovlms backbone: CLIP patch features, projected by a two-layer MLP, fill the <image> slots of a
Llama decoder. The entry point in this package's pyproject.toml registers it under the name `llava`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from robovlms.backbone import Context, TransformersBackbone, options_to_config
from robovlms.tokenizer import train_instruction_tokenizer

IMAGE_TOKEN = "<image>"


@dataclass
class LlavaTinyConfig:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    image_size: int = 64
    patch_size: int = 8  # (64 / 8)^2 = 64 image tokens per image
    tokenizer_vocab_size: int = 512


class LlavaBackbone(TransformersBackbone):
    name = "llava"
    description = "LLaVA (example plugin): CLIP ViT + MLP projector, image tokens in a Llama decoder"
    model_class = LlavaForConditionalGeneration
    model_types = ("llava",)
    lora_target_modules = r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

    @classmethod
    def tiny(cls, **options) -> LlavaBackbone:
        tiny = options_to_config(LlavaTinyConfig, options, cls.name)
        tokenizer = train_instruction_tokenizer(tiny.tokenizer_vocab_size, [IMAGE_TOKEN])
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": tiny.image_size},
                                                crop_size={"height": tiny.image_size, "width": tiny.image_size})
        processor = LlavaProcessor(image_processor, tokenizer, patch_size=tiny.patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
        config = LlavaConfig(
            vision_config=dict(model_type="clip_vision_model", hidden_size=tiny.hidden_size,
                               intermediate_size=4 * tiny.hidden_size, num_hidden_layers=tiny.layers,
                               num_attention_heads=tiny.heads, image_size=tiny.image_size,
                               patch_size=tiny.patch_size),
            text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=tiny.hidden_size,
                             intermediate_size=4 * tiny.hidden_size, num_hidden_layers=tiny.layers,
                             num_attention_heads=tiny.heads, num_key_value_heads=tiny.heads,
                             max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
            image_token_index=processor.image_token_id)
        return cls(LlavaForConditionalGeneration(config), processor, "tiny", None)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def image_block(self) -> tuple[list[int], int, list[int]]:
        vision = self.model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        keeps_cls = self.model.config.vision_feature_select_strategy == "full"
        return [], patches + int(keeps_cls), []

    def contextualise(self, context: Context, images: torch.Tensor, suffix_embeds: torch.Tensor) -> torch.Tensor:
        config = self.model.config
        features = self.model.model.get_image_features(
            pixel_values=images, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy).pooler_output
        embeds = self.merge_embeddings(context, torch.stack(features), suffix_embeds)
        return self.model.model.language_model(inputs_embeds=embeds, attention_mask=context.attention_mask,
                                               use_cache=False).last_hidden_state

    def reference_hidden_state(self, image: torch.Tensor, instruction: str, suffix_embed: torch.Tensor):
        pixel_values, _, embeds, _ = self.reference_inputs(image, instruction, suffix_embed,
                                                           self.model.config.image_token_id)
        return self.model(pixel_values=pixel_values, inputs_embeds=embeds,
                          output_hidden_states=True).hidden_states[-1][0, -1]

    def vision_modules(self) -> list[nn.Module]:
        return [self.model.model.vision_tower, self.model.model.multi_modal_projector]

    def language_modules(self) -> list[nn.Module]:
        return [self.model.model.language_model, self.model.lm_head]
