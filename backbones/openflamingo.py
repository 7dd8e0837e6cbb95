"""OpenFlamingo (RoboVLMs' Flamingo: OpenFlamingo-3B, a CLIP ViT-L/14 and MPT-1B): a CLIP vision tower whose patch
tokens a perceiver resampler turns into a few latents per image, and a gated cross-attention layer before the
decoder blocks of an MPT language model. Images are not in the token sequence: `<image>` marks where each was
seen, and a text position cross-attends to the latents of the frame whose image came last at or before it
(OpenFlamingo's media locations, attending only to the immediate media); positions before any image see none.

Every layer is a transformers class: CLIPVisionModel, IdeficsPerceiverResampler, IdeficsGatedCrossAttentionLayer
and MptForCausalLM. The code here is the wiring OpenFlamingo's FlamingoLMMixin adds to a language model: each
cross-attended decoder block is wrapped so that its cross-attention layer runs first, with the image latents set
on it before the language model's forward (OpenFlamingo's `condition_vis_x`). Where IDEFICS' layers differ from
OpenFlamingo's (RMSNorm and a SwiGLU feed-forward in the cross-attention layer, no time embeddings in the
resampler), and why OpenFlamingo's released weights do not load: docs/formulations.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    IdeficsConfig,
    MptConfig,
    MptForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

from robovlms.backbone import Backbone, Context, options_to_config
from robovlms.errors import ConfigError
from robovlms.tokenizer import train_instruction_tokenizer

IMAGE_TOKEN, END_OF_CHUNK_TOKEN = "<image>", "<|endofchunk|>"
MODEL_TYPE = "openflamingo"


@dataclass
class OpenFlamingoTinyConfig:
    hidden_size: int = 64  # the MPT decoder's d_model (MPT-1B: 2048)
    layers: int = 2  # decoder blocks (MPT-1B: 24)
    heads: int = 4
    vision_width: int = 64  # the CLIP ViT's width, and the resampler's (ViT-L/14: 1024)
    vision_layers: int = 2
    image_size: int = 64
    patch_size: int = 8
    latents: int = 16  # resampler outputs per image (OpenFlamingo: 64)
    resampler_depth: int = 2  # (OpenFlamingo: 6)
    cross_attention_every: int = 1  # a cross-attention layer before every n-th block (OpenFlamingo-3B: 1)
    # OpenFlamingo's tanh gates start closed (0), right on a pretrained language model; a tiny random one started
    # closed learns to ignore the image, so its gates start at normal(0, gate_init_std)
    gate_init_std: float = 0.1
    tokenizer_vocab_size: int = 512


@dataclass
class OpenFlamingoArchitecture:
    """What rebuilds the model: the configs of its three parts and the resampler's and gates' settings."""

    vision: dict  # CLIPVisionConfig
    language: dict  # MptConfig
    latents: int = 64
    resampler_depth: int = 6
    resampler_heads: int = 8
    resampler_head_dim: int = 64
    cross_attention_every: int = 1
    gate_init_std: float = 0.0
    image_mean: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))

    def idefics_config(self) -> IdeficsConfig:
        """The IdeficsConfig the resampler and the cross-attention layers read their sizes from."""
        vision, language = CLIPVisionConfig(**self.vision), MptConfig(**self.language)
        return IdeficsConfig(
            attn_implementation="sdpa", hidden_size=language.d_model, num_attention_heads=language.n_heads,
            intermediate_size=language.expansion_ratio * language.d_model, dropout=0.0,
            alpha_initializer="zeros", alpha_type="float",  # OpenFlamingo's scalar tanh gates, closed
            vision_config={"embed_dim": vision.hidden_size, "image_size": vision.image_size},
            perceiver_config={"resampler_n_latents": self.latents, "resampler_depth": self.resampler_depth,
                              "resampler_n_heads": self.resampler_heads,
                              "resampler_head_dim": self.resampler_head_dim})


class CrossAttendedBlock(nn.Module):
    """A decoder block with a gated cross-attention layer before it (OpenFlamingo's FlamingoLayer)."""

    def __init__(self, cross_attention: IdeficsGatedCrossAttentionLayer, block: nn.Module):
        super().__init__()
        self.cross_attention, self.block = cross_attention, block
        self.media: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # set for one forward

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        latents, mask, gate = self.media  # (R, images * n, Dv), (R, 1, L, images * n), (R, L)
        hidden_states = self.cross_attention(hidden_states, image_hidden_states=latents, image_attention_mask=mask,
                                             cross_attention_gate=gate)  # (R, L, D)
        return self.block(hidden_states, *args, **kwargs)


class OpenFlamingo(nn.Module):
    def __init__(self, architecture: OpenFlamingoArchitecture, language: MptForCausalLM | None = None,
                 vision: CLIPVisionModel | None = None):
        super().__init__()
        self.architecture = architecture
        idefics = architecture.idefics_config()
        self.vision = vision or CLIPVisionModel(CLIPVisionConfig(**architecture.vision))
        width = self.vision.config.hidden_size
        self.resampler = IdeficsPerceiverResampler(idefics, width, architecture.resampler_depth,
                                                   architecture.resampler_heads, architecture.resampler_head_dim,
                                                   architecture.latents)
        self.language = language or MptForCausalLM(MptConfig(**architecture.language))
        blocks = self.language.transformer.blocks
        every = architecture.cross_attention_every
        for i in range(len(blocks)):
            if (i + 1) % every == 0:  # OpenFlamingo's placement: before blocks every-1, 2 * every - 1, ...
                blocks[i] = CrossAttendedBlock(IdeficsGatedCrossAttentionLayer(idefics, layer_idx=i), blocks[i])
        if architecture.gate_init_std > 0:
            # set here: IDEFICS' own "normal" init of scalar ("float") gates fails in transformers 5 (size=(1))
            for block in self.cross_attended_blocks():
                nn.init.normal_(block.cross_attention.alpha_cross_attn, std=architecture.gate_init_std)
                nn.init.normal_(block.cross_attention.alpha_dense, std=architecture.gate_init_std)

    def cross_attended_blocks(self) -> list[CrossAttendedBlock]:
        return [block for block in self.language.transformer.blocks if isinstance(block, CrossAttendedBlock)]


class OpenFlamingoBackbone(Backbone):
    name = "openflamingo"
    description = "OpenFlamingo (RoboVLMs' Flamingo): CLIP ViT + perceiver resampler, gated cross-attention into MPT"
    model_types = (MODEL_TYPE,)
    tiny_config = OpenFlamingoTinyConfig
    lora_target_modules = r"language\.transformer\.blocks\.\d+\.(block\.)?attn\.(Wqkv|out_proj)"

    def __init__(self, model: OpenFlamingo, tokenizer, size: str, origin: str | None):
        architecture = model.architecture
        super().__init__(size=size, origin=origin, tokenizer=tokenizer, image_size=architecture.vision["image_size"],
                         image_mean=tuple(architecture.image_mean), image_std=tuple(architecture.image_std))
        self.model = model

    @classmethod
    def tiny(cls, **options) -> OpenFlamingoBackbone:
        tiny = options_to_config(OpenFlamingoTinyConfig, options, cls.name)
        if tiny.cross_attention_every < 1 or tiny.cross_attention_every > tiny.layers:
            raise ConfigError(f"backbone {cls.name!r} option cross_attention_every must be 1 to layers "
                              f"({tiny.layers}), got {tiny.cross_attention_every}")
        tokenizer = train_instruction_tokenizer(tiny.tokenizer_vocab_size, [IMAGE_TOKEN, END_OF_CHUNK_TOKEN])
        architecture = OpenFlamingoArchitecture(
            vision=CLIPVisionConfig(hidden_size=tiny.vision_width, intermediate_size=4 * tiny.vision_width,
                                    num_hidden_layers=tiny.vision_layers, num_attention_heads=tiny.heads,
                                    image_size=tiny.image_size, patch_size=tiny.patch_size).to_dict(),
            language=MptConfig(d_model=tiny.hidden_size, n_heads=tiny.heads, n_layers=tiny.layers,
                               max_seq_len=1024, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id).to_dict(),
            latents=tiny.latents, resampler_depth=tiny.resampler_depth, resampler_heads=tiny.heads,
            resampler_head_dim=tiny.vision_width // tiny.heads, cross_attention_every=tiny.cross_attention_every,
            gate_init_std=tiny.gate_init_std)
        return cls(OpenFlamingo(architecture), tokenizer, "tiny", None)

    @classmethod
    def pretrained(cls, path: str) -> OpenFlamingoBackbone:
        """OpenFlamingo's starting point from local weights: `path/vision` a CLIP model, `path/language` an MPT
        causal LM (transformers' `mpt` model type) with its tokenizer; the resampler and the cross-attention
        layers start fresh, their gates closed, as OpenFlamingo's own training starts. OpenFlamingo's released
        checkpoint.pt does not load (docs/formulations.md says why)."""
        directory = Path(path).expanduser()
        for part, model_types in (("vision", ("clip", "clip_vision_model")), ("language", ("mpt",))):
            config_file = directory / part / "config.json"
            model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
            if model_type not in model_types:
                raise ConfigError(f"backbone {cls.name!r} of size 'pretrained' needs {directory / part} to hold a "
                                  f"model of type {' or '.join(model_types)} (found {model_type or 'none'}); "
                                  f"`vision` a CLIP model, `language` an MPT causal LM with its tokenizer")
        vision = CLIPVisionModel.from_pretrained(directory / "vision", local_files_only=True)
        language = MptForCausalLM.from_pretrained(directory / "language", local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory / "language", local_files_only=True)
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, END_OF_CHUNK_TOKEN]})
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "<PAD>"})  # as OpenFlamingo's factory adds one
        language.resize_token_embeddings(len(tokenizer))
        architecture = OpenFlamingoArchitecture(vision=vision.config.to_dict(), language=language.config.to_dict())
        return cls(OpenFlamingo(architecture, language, vision), tokenizer, "pretrained", str(path))

    @classmethod
    def from_saved(cls, directory: Path, size: str, origin: str | None) -> OpenFlamingoBackbone:
        saved = json.loads((directory / "config.json").read_text())
        saved.pop("model_type")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
        return cls(OpenFlamingo(OpenFlamingoArchitecture(**saved)), tokenizer, size, origin)

    def save_files(self, directory: Path) -> None:
        architecture = asdict(self.model.architecture)
        architecture["language"] = self.model.language.config.to_dict()  # its vocabulary grows with action tokens
        (directory / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE, **architecture}, indent=2))
        self.tokenizer.save_pretrained(directory)

    @property
    def hidden_size(self) -> int:
        return self.model.language.config.d_model

    def image_block(self) -> tuple[list[int], int, list[int]]:
        return [self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)], 0, []

    def image_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, latents, Dv): the patch tokens (the class token dropped, as OpenFlamingo's
        `output_tokens`) through the perceiver resampler."""
        patches = self.model.vision(pixel_values=images).last_hidden_state[:, 1:]  # (N, P, Dv)
        return self.model.resampler(patches)

    def contextualise(self, context: Context, images: torch.Tensor, suffix_embeds: torch.Tensor) -> torch.Tensor:
        rows = context.input_ids.shape[0]
        images_per_row = context.frames_per_row * context.views
        latents = self.image_latents(images)  # (N, n, Dv)
        n = latents.shape[1]
        latents = latents.reshape(rows, images_per_row * n, -1)  # (R, images * n, Dv)
        frame_of_image = torch.arange(images_per_row, device=images.device) // context.views
        # each position cross-attends to every view of its own frame and to no other frame
        sees = (context.frame.unsqueeze(-1) == frame_of_image).repeat_interleave(n, dim=-1)  # (R, L, images * n)
        mask = torch.zeros(sees.shape, dtype=latents.dtype, device=latents.device)
        mask = mask.masked_fill(~sees, torch.finfo(latents.dtype).min).unsqueeze(1)  # (R, 1, L, images * n)
        gate = sees.any(-1).to(latents.dtype)  # (R, L): 0 where a position has seen no image yet
        blocks = self.model.cross_attended_blocks()
        for block in blocks:
            block.media = (latents, mask, gate)
        try:
            embeds = self.merge_embeddings(context, None, suffix_embeds)
            return self.model.language.transformer(inputs_embeds=embeds, attention_mask=context.attention_mask,
                                                   use_cache=False).last_hidden_state
        finally:
            for block in blocks:
                block.media = None

    def input_embeddings(self) -> nn.Embedding:
        return self.model.language.get_input_embeddings()

    def output_embeddings(self) -> nn.Module:
        return self.model.language.get_output_embeddings()

    def resize_vocabulary(self, vocab_size: int) -> None:
        # the model's own initialisation for new rows, not mean resizing: TransformersBackbone.resize_vocabulary
        self.model.language.resize_token_embeddings(vocab_size, mean_resizing=False)

    def vision_modules(self) -> list[nn.Module]:
        return [self.model.vision, self.model.resampler]

    def language_modules(self) -> list[nn.Module]:
        """The MPT language model without the cross-attention layers, which RoboFlamingo trains on a frozen one."""
        transformer = self.model.language.transformer
        blocks = [getattr(block, "block", block) for block in transformer.blocks]
        return [transformer.wte, *blocks, transformer.norm_f, self.model.language.lm_head]
