"""KOSMOS-2 (Kosmos2ForConditionalGeneration): a CLIP ViT whose patches a latent-query resampler turns into
a fixed number of image tokens, placed between <image> and </image> in the language model's sequence."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from transformers import CLIPImageProcessorPil, Kosmos2Config, Kosmos2ForConditionalGeneration, Kosmos2Processor
from transformers.models.kosmos2.processing_kosmos2 import coordinate_to_patch_index

from robovlms.backbone import Context, TransformersBackbone, options_to_config
from robovlms.backbone.activations import Elements, Layers, Saved, trains
from robovlms.backbone.language_modeling import language_modeling_rows
from robovlms.backbone.transformers_backbone import decoder_activations, vision_encoder_activations
from robovlms.tokenizer import stand_in_tokenizer, train_instruction_tokenizer

# The sizes of the published model, from its config.json (https://huggingface.co/microsoft/kosmos-2-patch14-224/
# blob/main/config.json; transformers' Kosmos2Config defaults are documented as these), for estimates where its
# weights are not on this machine. Its tokenizer holds exactly vocab_size tokens.
PUBLISHED_CONFIGS = {
    "microsoft/kosmos-2-patch14-224": dict(
        latent_query_num=64,
        text_config=dict(vocab_size=65037, embed_dim=2048, layers=24, ffn_dim=8192, attention_heads=32,
                         max_position_embeddings=2048, dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
                         scale_embedding=True, layer_norm_eps=1e-5),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)),
}


@dataclass
class Kosmos2TinyConfig:
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    image_size: int = 64
    patch_size: int = 8  # small patches: a 64x64 image gives 64 patches, enough detail to learn from quickly
    latent_queries: int = 16  # image tokens per image in the language model's sequence
    tokenizer_vocab_size: int = 512  # BPE trained in code; Kosmos-2's processor adds its own tokens on top
    # KOSMOS-2's std, for its text model, resampler and patch embeddings (its CLIP layers' own init scales with
    # width). At width 64 it starts the image tokens 300 times less varied than the word embeddings, yet 1/sqrt(64)
    # was not resolved better on the validation episodes: every backbone keeps its released model's std (docs/demo.md).
    init_std: Annotated[float, Field(gt=0)] = 0.02


class Kosmos2Backbone(TransformersBackbone):
    name = "kosmos2"
    description = "KOSMOS-2: CLIP ViT + latent-query resampler, image tokens in the decoder's sequence"
    model_class = Kosmos2ForConditionalGeneration
    model_types = ("kosmos-2",)
    tiny_config = Kosmos2TinyConfig
    lora_target_modules = r"text_model\.model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"

    published_models: ClassVar[dict[str, str]] = {
        model: "config.json of the model" for model in PUBLISHED_CONFIGS}

    @classmethod
    def tiny(cls, **options) -> Kosmos2Backbone:
        tiny = options_to_config(Kosmos2TinyConfig, options, cls.name)
        processor = _processor(tiny.image_size, train_instruction_tokenizer(tiny.tokenizer_vocab_size))
        tokenizer = processor.tokenizer
        config = Kosmos2Config(
            text_config=dict(vocab_size=len(tokenizer), embed_dim=tiny.hidden_size, layers=tiny.layers,
                             ffn_dim=4 * tiny.hidden_size, attention_heads=tiny.heads, dropout=0.0,
                             attention_dropout=0.0, max_position_embeddings=1024,
                             init_std=tiny.init_std,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id),
            vision_config=dict(hidden_size=tiny.hidden_size, intermediate_size=4 * tiny.hidden_size,
                               num_hidden_layers=tiny.layers, num_attention_heads=tiny.heads,
                               image_size=tiny.image_size, patch_size=tiny.patch_size,
                               initializer_range=tiny.init_std),
            latent_query_num=tiny.latent_queries)
        return cls(Kosmos2ForConditionalGeneration(config), processor, "tiny", None)

    @classmethod
    def published_architecture(cls, model_id: str) -> Kosmos2Backbone:
        config = Kosmos2Config(**PUBLISHED_CONFIGS[model_id])
        processor = _processor(config.vision_config.image_size, stand_in_tokenizer(config.text_config.vocab_size))
        processor.tokenizer.mark_published()  # the published tokenizer holds the processor's tokens already
        return cls(Kosmos2ForConditionalGeneration(config), processor, "pretrained", model_id)

    @property
    def hidden_size(self) -> int:
        return self.model.config.text_config.embed_dim

    def activation_layers(self, images: int, rows: int, context: int) -> list[Layers | Saved]:
        """The CLIP encoder; its patches normalised, projected and resampled by latent queries attending over
        patches and latents; the decoder, whose layers norm inside attention and MLP (sub-layer norms)."""
        config, vision_modules = self.model.config, self.vision_modules()
        text = config.text_config
        described = vision_encoder_activations(vision_modules, config.vision_config, images, self.image_size)
        patches, latents = described[0].tokens, config.latent_query_num
        if trains(vision_modules):
            width = config.vision_config.hidden_size
            described += [Saved("post-norm, normalisation and projection of the patches",
                                Elements(norms=images * patches * (2 * width + 3), other=images * patches * width)),
                          Layers("latent queries", 1, images, latents, text.embed_dim, 0, text.attention_heads,
                                 key_tokens=patches + latents, key_input=text.embed_dim, norms=0, checkpointed=False)]
        return described + decoder_activations(self.language_modules(), text, rows, context, attention_norm=True,
                                               mlp_norm=True, dropouts=2 if text.dropout else 0)

    def image_block(self) -> tuple[list[int], int, list[int]]:
        begin, end = self.tokenizer.convert_tokens_to_ids([self.processor.boi_token, self.processor.eoi_token])
        return [begin], self.model.config.latent_query_num, [end]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, latent_queries, D), as Kosmos2ForConditionalGeneration.forward computes them."""
        patches = self.model.vision_model(pixel_values=images).last_hidden_state
        patches = F.normalize(self.model.vision_model.model.post_layernorm(patches), dim=-1)
        image_tokens, _ = self.model.image_to_text_projection(patches)
        return image_tokens

    def contextualise(self, context: Context, images: torch.Tensor, suffix_embeds: torch.Tensor) -> torch.Tensor:
        # unscaled embeddings: the text model multiplies text and image embeddings alike by sqrt(D)
        embeds = self.merge_embeddings(context, self.encode_images(images), suffix_embeds)
        return self.model.text_model.model(inputs_embeds=embeds, attention_mask=context.attention_mask,
                                           use_cache=False).last_hidden_state

    def reference_hidden_state(self, image: torch.Tensor, instruction: str, suffix_embed: torch.Tensor):
        pixel_values, _, embeds, image_mask = self.reference_inputs(image, instruction, suffix_embed)
        out = self.model(pixel_values=pixel_values, inputs_embeds=embeds, image_embeds_position_mask=image_mask,
                         output_hidden_states=True)
        return out.hidden_states[-1][0, -1]

    def language_modeling_loss(self, images: torch.Tensor, prompts: list[str], targets: list[str]) -> torch.Tensor:
        rows = language_modeling_rows(self.tokenizer, self.image_block(), prompts, targets)
        return self.model(pixel_values=images, input_ids=rows.input_ids.to(images.device),
                          image_embeds_position_mask=rows.image_slots.long().to(images.device),
                          attention_mask=rows.attention_mask.to(images.device), labels=rows.labels.to(images.device),
                          use_cache=False).loss

    def grounded_phrase(self, phrase: str, box: tuple[float, float, float, float]) -> str:
        """KOSMOS-2's grounded text: the box's top-left and bottom-right cells of a 32 x 32 grid."""
        first, last = coordinate_to_patch_index(box, math.isqrt(self.processor.num_patch_index_tokens))
        return f"<phrase> {phrase}</phrase><object><patch_index_{first:04d}><patch_index_{last:04d}></object>"

    def vision_modules(self) -> list[nn.Module]:
        return [self.model.vision_model, self.model.image_to_text_projection]

    def language_modules(self) -> list[nn.Module]:
        return [self.model.text_model]


def _processor(image_size: int, tokenizer) -> Kosmos2Processor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    return Kosmos2Processor(image_processor, tokenizer)
