"""PaliGemma (PaliGemmaForConditionalGeneration): SigLIP patch tokens, linearly projected, fill the <image>
slots of a Gemma decoder. Gemma attends bidirectionally over the prefix (everything before the first suffix
token) and causally after it, as PaliGemma's prefix-LM does for prompt and answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from pydantic import Field
from torch import nn
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessorPil

from robovlms.backbone import Context, TransformersBackbone, options_to_config
from robovlms.backbone.language_modeling import language_modeling_rows
from robovlms.tokenizer import stand_in_tokenizer, train_instruction_tokenizer

# The sizes of the published model, from its config.json (https://huggingface.co/google/paligemma-3b-pt-224/blob/
# main/config.json, gated; the same file is copied into its fine-tunes, e.g. https://huggingface.co/merve/
# paligemma_vqav2), for estimates where its weights are not on this machine. Its tokenizer's last token is <image>,
# id 257152 (image_token_index).
PUBLISHED_CONFIGS = {
    "google/paligemma-3b-pt-224": dict(
        bos_token_id=2, eos_token_id=1, pad_token_id=0, hidden_size=2048, image_token_index=257152,
        projection_dim=2048, vocab_size=257216,
        text_config=dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_attention_heads=8,
                         num_hidden_layers=18, num_image_tokens=256, num_key_value_heads=1, vocab_size=257216),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_attention_heads=16, num_hidden_layers=27, num_image_tokens=256, patch_size=14,
                           projection_dim=2048, projector_hidden_act="gelu_fast", vision_use_head=False)),
}
PUBLISHED_TOKENIZER_LENGTH = 257153


@dataclass
class PaliGemmaTinyConfig:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    image_size: int = 64
    patch_size: int = 8  # small patches learn fast; (64 / 8)^2 = 64 image tokens per image in the sequence
    tokenizer_vocab_size: int = 512  # BPE trained in code; PaliGemma's processor adds <image>, <loc>, <seg> tokens
    init_std: Annotated[float, Field(gt=0)] = 0.02  # Gemma's and the projector's; SigLIP's own scales with width (docs/demo.md)


class PaliGemmaBackbone(TransformersBackbone):
    name = "paligemma"
    description = "PaliGemma: SigLIP ViT + linear projector, image tokens in a prefix-LM Gemma decoder"
    model_class = PaliGemmaForConditionalGeneration
    model_types = ("paligemma",)
    tiny_config = PaliGemmaTinyConfig
    lora_target_modules = r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

    published_models: ClassVar[dict[str, str]] = {
        model: "config.json of the model" for model in PUBLISHED_CONFIGS}

    @classmethod
    def tiny(cls, **options) -> PaliGemmaBackbone:
        tiny = options_to_config(PaliGemmaTinyConfig, options, cls.name)
        processor = _processor(tiny.image_size, tiny.patch_size, train_instruction_tokenizer(tiny.tokenizer_vocab_size))
        tokenizer = processor.tokenizer
        config = PaliGemmaConfig(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=tiny.hidden_size,
                               intermediate_size=4 * tiny.hidden_size, num_hidden_layers=tiny.layers,
                               num_attention_heads=tiny.heads, image_size=tiny.image_size,
                               patch_size=tiny.patch_size, vision_use_head=False),  # patches, no pooled vector
            text_config=dict(model_type="gemma", vocab_size=len(tokenizer), hidden_size=tiny.hidden_size,
                             intermediate_size=4 * tiny.hidden_size, num_hidden_layers=tiny.layers,
                             num_attention_heads=tiny.heads, num_key_value_heads=1,
                             head_dim=tiny.hidden_size // tiny.heads, max_position_embeddings=1024,
                             initializer_range=tiny.init_std,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id),
            image_token_index=processor.image_token_id, vocab_size=len(tokenizer),
            projection_dim=tiny.hidden_size, hidden_size=tiny.hidden_size)
        return cls(PaliGemmaForConditionalGeneration(config), processor, "tiny", None)

    @classmethod
    def published_architecture(cls, model_id: str) -> PaliGemmaBackbone:
        config = PaliGemmaConfig(**PUBLISHED_CONFIGS[model_id])
        vision = config.vision_config
        processor = _processor(vision.image_size, vision.patch_size, stand_in_tokenizer(PUBLISHED_TOKENIZER_LENGTH))
        processor.tokenizer.mark_published()  # <image>, which the processor adds, is the published tokenizer's last
        return cls(PaliGemmaForConditionalGeneration(config), processor, "pretrained", model_id)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.hidden_size

    def image_block(self) -> tuple[list[int], int, list[int]]:
        return [], self.model.config.text_config.num_image_tokens, []

    def contextualise(self, context: Context, images: torch.Tensor, suffix_embeds: torch.Tensor) -> torch.Tensor:
        image_tokens = self.model.model.get_image_features(images).pooler_output  # (N, n, D)
        # Gemma's embedding layer scales by sqrt(D); image tokens and suffix embeddings go in as they are
        embeds = self.merge_embeddings(context, image_tokens, suffix_embeds)
        in_prefix = context.suffix_slots.long().cumsum(dim=1) == 0
        return self.model.model(inputs_embeds=embeds, attention_mask=context.attention_mask,
                                token_type_ids=(~in_prefix).long(), use_cache=False).last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden)
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)  # PaliGemma 2 has one
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def reference_hidden_state(self, image: torch.Tensor, instruction: str, suffix_embed: torch.Tensor):
        pixel_values, ids, embeds, _ = self.reference_inputs(image, instruction, suffix_embed,
                                                             self.model.config.image_token_id)
        token_type_ids = torch.zeros_like(ids)
        token_type_ids[0, -1] = 1  # the suffix is PaliGemma's causal "answer"; the rest its bidirectional prefix
        out = self.model(pixel_values=pixel_values, inputs_embeds=embeds, token_type_ids=token_type_ids,
                         output_hidden_states=True)
        return out.hidden_states[-1][0, -1]

    def language_modeling_loss(self, images: torch.Tensor, prompts: list[str], targets: list[str]) -> torch.Tensor:
        # PaliGemma's prefix-LM: bidirectional over image and prompt (token type 0), causal over the target (1)
        rows = language_modeling_rows(self.tokenizer, self.image_block(), prompts, targets,
                                      self.model.config.image_token_id)
        return self.model(input_ids=rows.input_ids.to(images.device), pixel_values=images,
                          attention_mask=rows.attention_mask.to(images.device),
                          token_type_ids=rows.in_target.long().to(images.device), labels=rows.labels.to(images.device),
                          use_cache=False).loss

    def grounded_phrase(self, phrase: str, box: tuple[float, float, float, float]) -> str:
        """PaliGemma's detection text: y_min, x_min, y_max, x_max as <locXXXX> tokens of 1024 bins, then the name."""
        x0, y0, x1, y1 = box
        return "".join(f"<loc{min(int(value * 1024), 1023):04d}>" for value in (y0, x0, y1, x1)) + f" {phrase}"

    def vision_modules(self) -> list[nn.Module]:
        return [self.model.model.vision_tower, self.model.model.multi_modal_projector]

    def language_modules(self) -> list[nn.Module]:
        return [self.model.model.language_model, self.model.lm_head]


def _processor(image_size: int, patch_size: int, tokenizer) -> PaliGemmaProcessor:
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    image_processor.image_seq_length = (image_size // patch_size) ** 2
    return PaliGemmaProcessor(image_processor, tokenizer)
