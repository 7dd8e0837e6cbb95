"""Flamingo (IdeficsForVisionText2Text, the transformers reproduction of Flamingo): a perceiver resampler
turns each image into a few latents; gated cross-attention layers before the decoder layers let each text
position attend to the images of its frame. Images are not in the token sequence; an
<fake_token_around_image><image><fake_token_around_image> block marks where each image was seen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
from pydantic import Field
from torch import nn
from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessorPil, IdeficsProcessor

from robovlms.backbone import Context, TransformersBackbone, options_to_config
from robovlms.backbone.activations import Elements, Layers, Saved, config_layers, trains
from robovlms.backbone.language_modeling import language_modeling_rows
from robovlms.backbone.transformers_backbone import decoder_activations, vision_encoder_activations
from robovlms.tokenizer import stand_in_tokenizer, train_instruction_tokenizer

IMAGE_TOKEN, AROUND_IMAGE_TOKEN = "<image>", "<fake_token_around_image>"

# The sizes of the published model, for estimates where its weights are not on this machine: the decoder, gates,
# perceiver and vision widths from the config.json of HuggingFaceM4/idefics-9b-instruct (https://huggingface.co/
# HuggingFaceM4/idefics-9b-instruct/blob/main/config.json), which fine-tunes idefics-9b without changing its
# architecture; the vision tower is OpenCLIP ViT-H/14 (32 layers, 16 heads), as the model card says. Its tokenizer
# is LLaMA's 32,000 tokens and the two image tokens (additional_vocab_size).
PUBLISHED_CONFIGS = {
    "HuggingFaceM4/idefics-9b": dict(
        vocab_size=32000, additional_vocab_size=2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, hidden_act="silu", rms_norm_eps=1e-6, cross_layer_interval=4, qk_layer_norms=True,
        alpha_initializer="zeros", alpha_type="float", use_resampler=True, tie_word_embeddings=False,
        freeze_text_layers=False, freeze_vision_layers=False, freeze_lm_head=False, max_position_embeddings=2048,
        vision_config=dict(embed_dim=1280, image_size=224, intermediate_size=5120, patch_size=14,
                           num_attention_heads=16, num_hidden_layers=32, hidden_act="gelu"),
        perceiver_config=dict(use_resampler=True, resampler_depth=6, resampler_head_dim=96, resampler_n_heads=16,
                              resampler_n_latents=64, qk_layer_norms_perceiver=True)),
}
PUBLISHED_TOKENIZER_LENGTH = 32002


@dataclass
class FlamingoTinyConfig:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    image_size: int = 64
    patch_size: int = 8
    latents: int = 16  # perceiver resampler outputs per image
    resampler_depth: int = 2
    gate_init_std: float = 0.1  # tanh gates start open a little: a random model must not ignore the image
    tokenizer_vocab_size: int = 512
    init_std: Annotated[float, Field(gt=0)] = 0.02  # IDEFICS's, for every weight but its gates and latents (docs/demo.md)


class FlamingoBackbone(TransformersBackbone):
    name = "flamingo"
    description = "Flamingo (IDEFICS): CLIP ViT + perceiver resampler, gated cross-attention into the decoder"
    model_class = IdeficsForVisionText2Text
    model_types = ("idefics",)
    tiny_config = FlamingoTinyConfig
    lora_target_modules = r"model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

    published_models: ClassVar[dict[str, str]] = {
        model: "config.json of idefics-9b-instruct (same architecture)" for model in PUBLISHED_CONFIGS}

    @classmethod
    def tiny(cls, **options) -> FlamingoBackbone:
        tiny = options_to_config(FlamingoTinyConfig, options, cls.name)
        tokenizer = train_instruction_tokenizer(tiny.tokenizer_vocab_size, [IMAGE_TOKEN, AROUND_IMAGE_TOKEN])
        processor = _processor(tiny.image_size, tokenizer)
        config = IdeficsConfig(
            vocab_size=len(tokenizer), hidden_size=tiny.hidden_size, intermediate_size=4 * tiny.hidden_size,
            num_hidden_layers=tiny.layers, num_attention_heads=tiny.heads, max_position_embeddings=1024,
            initializer_range=tiny.init_std,
            # IDEFICS defaults: closed gates (zeros) and frozen layers, right for a pretrained LM, not for a tiny one
            alpha_initializer="normal", alpha_type="vector", alphas_initializer_range=tiny.gate_init_std,
            freeze_text_layers=False, freeze_vision_layers=False, use_resampler=True,
            vision_config=dict(embed_dim=tiny.hidden_size, intermediate_size=4 * tiny.hidden_size,
                               num_hidden_layers=tiny.layers, num_attention_heads=tiny.heads,
                               image_size=tiny.image_size, patch_size=tiny.patch_size,
                               initializer_range=tiny.init_std),
            perceiver_config=dict(use_resampler=True, resampler_n_latents=tiny.latents,
                                  resampler_depth=tiny.resampler_depth, resampler_n_heads=tiny.heads,
                                  resampler_head_dim=tiny.hidden_size // tiny.heads),
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id)
        return cls(IdeficsForVisionText2Text(config), processor, "tiny", None)

    @classmethod
    def published_architecture(cls, model_id: str) -> FlamingoBackbone:
        config = IdeficsConfig(**PUBLISHED_CONFIGS[model_id])
        tokenizer = stand_in_tokenizer(PUBLISHED_TOKENIZER_LENGTH, [IMAGE_TOKEN, AROUND_IMAGE_TOKEN])
        tokenizer.mark_published()  # the image tokens are the published tokenizer's last two
        return cls(IdeficsForVisionText2Text(config), _processor(config.vision_config.image_size, tokenizer),
                   "pretrained", model_id)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def activation_layers(self, images: int, rows: int, context: int) -> list[Layers | Saved]:
        """The ViT; the perceiver's latents attending (explicit softmax) over each image's patches and latents;
        gated cross-attention layers, every `cross_layer_interval` decoder layers, from each context position to
        the latents of its row's images; the decoder."""
        config, decoder = self.model.config, self.model.model
        vision_modules = self.vision_modules()
        described = vision_encoder_activations(vision_modules, config.vision_config, images, self.image_size)
        patches, width = described[0].tokens, config.vision_config.embed_dim
        perceiver = config.perceiver_config
        latents = perceiver.resampler_n_latents if config.use_resampler else patches
        if config.use_resampler:
            heads = perceiver.resampler_n_heads
            described.append(Layers(
                "perceiver", perceiver.resampler_depth, images, latents, width, 4 * width, heads,
                kv_hidden=heads * perceiver.resampler_head_dim, key_tokens=patches + latents, key_input=width,
                explicit_attention=True, activation_copies=0,  # ReLU keeps its output, the projection's input
                qk_norms=perceiver.qk_layer_norms_perceiver, on_gradient_path=trains(vision_modules),
                checkpointed=False))
        keys = images // rows * latents
        cross = config_layers("gated cross-attention", decoder.gated_cross_attn_layers, config, rows, context, True,
                              key_tokens=keys, key_input=width, attention_mask=True)
        gates = Saved("cross-attention gates", Elements(other=cross.count * rows * context * 2 * cross.hidden))
        return described + [cross, gates, *decoder_activations([decoder.layers], config, rows, context,
                                                                 qk_norms=config.qk_layer_norms)]

    def image_block(self) -> tuple[list[int], int, list[int]]:
        around, image = self.tokenizer.convert_tokens_to_ids([AROUND_IMAGE_TOKEN, IMAGE_TOKEN])
        return [around, image, around], 0, []

    def contextualise(self, context: Context, images: torch.Tensor, suffix_embeds: torch.Tensor) -> torch.Tensor:
        rows = context.input_ids.shape[0]
        images_per_row = context.frames_per_row * context.views
        frame_of_image = torch.arange(images_per_row, device=images.device) // context.views
        # each position cross-attends to every view of its own frame and to no other frame
        image_attention_mask = (context.frame.unsqueeze(-1) == frame_of_image).long()  # (R, L, images per row)
        embeds = self.merge_embeddings(context, None, suffix_embeds)
        return self.model.model(inputs_embeds=embeds, attention_mask=context.attention_mask,
                                pixel_values=images.view(rows, images_per_row, *images.shape[1:]),
                                image_attention_mask=image_attention_mask, use_cache=False).last_hidden_state

    def reference_hidden_state(self, image: torch.Tensor, instruction: str, suffix_embed: torch.Tensor):
        pixel_values, ids, embeds, _ = self.reference_inputs(image, instruction, suffix_embed)
        image_attention_mask = torch.ones(1, ids.shape[1], 1, dtype=torch.long)
        image_attention_mask[0, 0] = 0  # <s> comes before the image
        out = self.model(pixel_values=pixel_values.unsqueeze(1), inputs_embeds=embeds,
                         image_attention_mask=image_attention_mask, output_hidden_states=True)
        return out.hidden_states[-1][0, -1]

    def language_modeling_loss(self, images: torch.Tensor, prompts: list[str], targets: list[str]) -> torch.Tensor:
        rows = language_modeling_rows(self.tokenizer, self.image_block(), prompts, targets)
        image_attention_mask = rows.attention_mask.clone()
        image_attention_mask[:, 0] = 0  # <s> comes before the image; every later position cross-attends to it
        return self.model(input_ids=rows.input_ids.to(images.device), pixel_values=images.unsqueeze(1),
                          attention_mask=rows.attention_mask.to(images.device),
                          image_attention_mask=image_attention_mask.unsqueeze(-1).to(images.device),
                          labels=rows.labels.to(images.device), use_cache=False).loss

    def vision_modules(self) -> list[nn.Module]:
        # an IDEFICS without a perceiver resampler (use_resampler false) cross-attends to the patch embeddings
        resampler = getattr(self.model.model, "perceiver_resampler", None)
        return [self.model.model.vision_model] + ([resampler] if resampler is not None else [])

    def language_modules(self) -> list[nn.Module]:
        decoder = self.model.model
        return [decoder.embed_tokens, decoder.layers, decoder.norm, self.model.lm_head]


def _processor(image_size: int, tokenizer) -> IdeficsProcessor:
    return IdeficsProcessor(IdeficsImageProcessorPil(image_size=image_size), tokenizer, image_size=image_size)
