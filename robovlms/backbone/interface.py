"""The backbone interface: a vision-language model the formulations talk to.

A backbone turns images, an instruction and a few suffix embeddings (the learnable [LRN] action token, or
embedded action tokens) into the last-layer hidden states at those suffix positions, in one of the context layouts
of `robovlms/backbone/context.py`. Flamingo-style backbones have no image slots and cross-attend to the images
instead.

Suffix embeddings are in the scale of `embed_tokens`, whatever the model does next: Kosmos-2 multiplies
text and image embeddings by sqrt(D) inside its text model, Gemma inside its embedding layer.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn

from robovlms.backbone.activations import Layers, Saved
from robovlms.backbone.context import Context, batch_context, row_layout
from robovlms.backbone.freezing import freeze
from robovlms.errors import ConfigError, HiddenSizeError, PluginError, ShapeError, UnknownNameError

SIZES = ("tiny", "pretrained")
MAX_IMAGE_SIZE = 2048  # px; no VLM's vision tower takes larger square images, so a larger "size" is a pixel count
SPEC_FILE = "backbone.json"
WEIGHTS_FILE = "backbone.safetensors"


class Backbone(nn.Module, abc.ABC):
    """A vision-language model behind one interface. Subclasses hold the wrapped model in `self.model`."""

    name: ClassVar[str]
    description: ClassVar[str]
    tiny_config: ClassVar[type | None] = None  # the dataclass `tiny` builds from its options, checked before training

    def __init__(self, *, size: str, origin: str | None, tokenizer, image_size: int,
                 image_mean: tuple[float, ...], image_std: tuple[float, ...], rescale_factor: float = 1 / 255):
        super().__init__()
        if not 8 <= image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"backbone {self.name!r}: image_size {image_size} is not the side of a square image "
                              f"(8 to {MAX_IMAGE_SIZE} px); if it came from an image processor's size, that size is "
                              f"something else (Qwen2-VL's shortest_edge is a pixel count): give the side explicitly")
        self.size = size
        self.origin = origin  # the pretrained directory or model id; None for a random init
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.register_buffer("image_mean", torch.tensor(image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(3, 1, 1), persistent=False)
        self.rescale_factor = rescale_factor
        self.freeze_mode = "full"
        self.lora_rank: int | None = None
        self.lora_targets: str | None = None
        self.lora_alpha: int | None = None
        self.lora_dropout: float | None = None
        self.action_token_ids: torch.Tensor | None = None  # the last reserved, in bin order
        self._action_rows_hook = None  # keeps only the action token rows' gradient in the word embeddings
        self._layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # rows seen before

    # ---- what a backbone must provide --------------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def tiny(cls, **options) -> Backbone:
        """A small random-init model built offline, with options overriding its tiny config."""

    @classmethod
    @abc.abstractmethod
    def pretrained(cls, path: str) -> Backbone:
        """Real weights from a local directory or the local Hugging Face cache, never from the network."""

    @classmethod
    @abc.abstractmethod
    def from_saved(cls, directory: Path, size: str, origin: str | None) -> Backbone:
        """The architecture saved by `save_files` in `directory`, with freshly initialised weights."""

    @abc.abstractmethod
    def save_files(self, directory: Path) -> None:
        """Write what `from_saved` needs to rebuild the architecture: model config, tokenizer, processor."""

    @property
    @abc.abstractmethod
    def hidden_size(self) -> int: ...

    @abc.abstractmethod
    def image_block(self) -> tuple[list[int], int, list[int]]:
        """Token ids before an image, number of image-token slots, token ids after it."""

    @abc.abstractmethod
    def contextualise(self, context: Context, images: torch.Tensor, suffix_embeds: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states (R, L, D) of the contexts; images (N, 3, S, S) in (row, frame, view) order,
        suffix_embeds (R * suffixes per row, D) in slot order."""

    @abc.abstractmethod
    def input_embeddings(self) -> nn.Embedding: ...

    @abc.abstractmethod
    def output_embeddings(self) -> nn.Module: ...

    @abc.abstractmethod
    def resize_vocabulary(self, vocab_size: int) -> None:
        """Resize input embeddings and LM head to `vocab_size` rows, keeping the existing ones."""

    @abc.abstractmethod
    def vision_modules(self) -> list[nn.Module]:
        """Vision tower and the projector into the language model."""

    @abc.abstractmethod
    def language_modules(self) -> list[nn.Module]:
        """Language model: token embeddings, decoder layers, final norm, LM head."""

    lora_target_modules: ClassVar[str]  # regex over `self.model` module names: the LM's attention projections

    # ---- what a backbone may provide ------------------------------------------------------------------------

    def reference_hidden_state(self, image: torch.Tensor, instruction: str,
                               suffix_embed: torch.Tensor) -> torch.Tensor | None:
        """The last-layer hidden state (D,) at `suffix_embed` appended to the per-frame context of one uint8
        image (S, S, 3) and `instruction`, computed by the wrapped model's own forward from its own processor's
        pixels, token ids and positions; None when there is no such forward. `robovlms check-backbone` checks
        that `forward` agrees with it."""
        return None

    # published models whose architecture `published_architecture` builds: model id -> where its sizes come from
    published_models: ClassVar[dict[str, str]] = {}

    @classmethod
    def published_architecture(cls, model_id: str) -> Backbone:
        """The architecture of the published model `model_id` (a key of `published_models`) with its real sizes
        and a tokenizer standing in for its own, for estimates where its files are not on this machine; build it
        on the meta device (it is full size)."""
        raise NotImplementedError(f"{cls.name} declares no published architectures")

    def activation_layers(self, images: int, rows: int, context: int) -> list[Layers | Saved]:
        """What a training forward over `images` images in `rows` contexts of `context` tokens keeps for
        backward: the transformer layers it runs (`Layers`) and anything else it keeps (`Saved`), sized from its
        config and from which of its parameters train; for the training-memory estimate of the dry run
        (`robovlms/backbone/activations.py`). Empty when unknown: the estimate then says so."""
        return []

    @classmethod
    def supports_gradient_checkpointing(cls) -> bool:
        """Whether `enable_gradient_checkpointing` recomputes activations in backward instead of keeping them."""
        return False

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the activations of each block in backward instead of keeping them (`gradient_checkpointing`):
        the same gradients for about a third more compute, and far less activation memory."""
        raise ConfigError(f"backbone {self.name!r} does not support gradient_checkpointing")

    def block_classes(self) -> set[type[nn.Module]]:
        """The module classes that FSDP shards one at a time (decoder and encoder layers); empty: the whole model
        is one unit."""
        return set()

    def language_modeling_loss(self, images: torch.Tensor, prompts: list[str], targets: list[str]) -> torch.Tensor:
        """The wrapped model's own language-modelling loss (its LM head and labels, its attention: prefix-LM for
        PaliGemma, causal for KOSMOS-2 and IDEFICS) on each target text, after its image (N, 3, S, S, as
        `preprocess_images` gives them) and its prompt, in the rows of `robovlms/backbone/language_modeling.py`.
        What `robovlms pretrain` trains (docs/pretraining.md); a backbone without it cannot be pre-trained."""
        raise PluginError(f"backbone {self.name!r} cannot be pre-trained: it does not implement "
                          f"language_modeling_loss(images, prompts, targets) (docs/pretraining.md)")

    def save_pretrained(self, directory: Path) -> None:
        """Write this backbone's weights and files so that `pretrained(directory)` loads them: how `robovlms pretrain`
        hands on what it trained. A backbone without it cannot be pre-trained."""
        raise PluginError(f"backbone {self.name!r} cannot be pre-trained: it does not implement "
                          f"save_pretrained(directory), the inverse of its pretrained(path) (docs/pretraining.md)")

    def grounded_phrase(self, phrase: str, box: tuple[float, float, float, float]) -> str:
        """`phrase` and where it is in the image, for pre-training text: box (x0, y0, x1, y1) in fractions of the
        image's width and height from its top left. In the backbone's own location tokens where its model has them
        (KOSMOS-2's <patch_index_XXXX>, PaliGemma's <locXXXX>); in words otherwise, as percentages."""
        x0, y0, x1, y1 = (round(100 * value) for value in box)
        return f"{phrase} at x {x0} to {x1}, y {y0} to {y1}"

    # ---- the interface the formulations use ---------------------------------------------------------------

    @property
    def random_init(self) -> bool:
        return self.origin is None

    @property
    def label(self) -> str:
        if self.random_init:
            return f"{self.name} ({self.size}, random init)"
        return f"{self.name} (pretrained: {self.origin})"

    def describe(self) -> str:
        """What size this backbone is, for reports: "hidden 64, 64 px images, 0.31M parameters"."""
        return f"hidden {self.hidden_size}, {self.image_size} px images, {self.num_parameters() / 1e6:.2f}M parameters"

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the model's weights are held in (backbone.dtype); images go in in it."""
        return self.input_embeddings().weight.dtype

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, V, H, W, 3) -> float (B, T, V, 3, S, S), resized and normalised like the model's own
        image processor (bilinear, antialiased)."""
        if images.dim() != 6 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ShapeError(f"images must be uint8 (batch, time, views, height, width, 3); "
                             f"got {images.dtype} {tuple(images.shape)}")
        B, T, V, H, W, _ = images.shape
        x = images.reshape(B * T * V, H, W, 3).permute(0, 3, 1, 2).float()
        if (H, W) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        x = (x * self.rescale_factor - self.image_mean) / self.image_std
        return x.reshape(B, T, V, 3, self.image_size, self.image_size)

    def forward(self, pixel_values: torch.Tensor, instructions: list[str], suffix_embeds: torch.Tensor,
                interleaved: bool = False, instruction_per_frame: bool = False) -> torch.Tensor:
        """pixel_values (B, T, V, 3, S, S), B instructions, suffix_embeds (B, T, K, D) in the scale of
        `embed_tokens` -> hidden states (B, T, K, D) at the suffix positions. `instruction_per_frame`
        (interleaved only): the instruction before every frame's images, as RoboVLMs does, not once."""
        S, D = self.image_size, self.hidden_size
        if pixel_values.dim() != 6 or tuple(pixel_values.shape[3:]) != (3, S, S):
            raise ShapeError(f"pixel_values must be (batch, time, views, 3, {S}, {S}) for {self.label}; "
                             f"got {tuple(pixel_values.shape)}")
        B, T, V = pixel_values.shape[:3]
        if len(instructions) != B:
            raise ShapeError(f"expected {B} instructions (one per sample), got {len(instructions)}")
        if suffix_embeds.dim() != 4 or tuple(suffix_embeds.shape[:2]) != (B, T) or suffix_embeds.shape[3] != D:
            raise ShapeError(f"suffix_embeds must be ({B}, {T}, suffix length, {D}); got {tuple(suffix_embeds.shape)}")
        K = suffix_embeds.shape[2]
        context = self.build_context(instructions, T, V, K, interleaved, instruction_per_frame).to(pixel_values.device)
        images = pixel_values.reshape(B * T * V, 3, S, S)
        hidden = self.contextualise(context, images.to(self.weight_dtype), suffix_embeds.reshape(B * T * K, D))
        if hidden.shape[-1] != D:
            raise HiddenSizeError(f"backbone {self.name!r} returned hidden size {hidden.shape[-1]}, its hidden_size "
                                  f"says {D}: contextualise must return the last layer's hidden states")
        # (R, L, D) -> (R, S, D) at the suffix slots: gathered at positions known beforehand, not by a mask, so it
        # runs without reading the data (on `meta`, under CUDA graphs)
        suffix = hidden.gather(1, context.suffix_positions.unsqueeze(-1).expand(-1, -1, D))
        return suffix.reshape(B, T, K, D)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The model's own input embeddings, in the scale `forward` expects for suffix_embeds."""
        return self.input_embeddings()(token_ids)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_embeddings()(hidden)

    def reserve_action_tokens(self, count: int, mode: str = "overwrite", skip: int = 0) -> torch.Tensor:
        """Token ids for `count` action bins, in bin order.

        overwrite: reuse the last `count` ids of the base vocabulary (the least used merges of a BPE vocabulary),
        skipping special and added tokens, and the last `skip` ordinary ones; bin 0 takes the last id, as RT-2 and
        OpenVLA do.
        append: add the tokens <action_0> ... <action_{count-1}> to the tokenizer and grow the embeddings and LM
        head; a tokenizer that holds them already (a backbone rebuilt from a trained run) keeps their ids.
        """
        if mode not in ("overwrite", "append"):
            raise UnknownNameError("action token mode", mode, ["overwrite", "append"])
        if count < 1:
            raise ConfigError(f"action token count must be positive, got {count}")
        if mode == "overwrite":
            added = set(self.tokenizer.get_added_vocab().values()) | set(self.tokenizer.all_special_ids)
            candidates = [i for i in range(self.tokenizer.vocab_size - 1, -1, -1) if i not in added]
            if count + skip > len(candidates):
                raise ConfigError(f"cannot overwrite {count} tokens after skipping {skip}: {self.label} has "
                                  f"{len(candidates)} ordinary tokens; use mode='append'")
            self.action_token_ids = torch.tensor(candidates[skip:skip + count])
            return self.action_token_ids
        names = [f"<action_{i}>" for i in range(count)]
        self.tokenizer.add_tokens(names, special_tokens=True)  # skips the ones it holds
        self.action_token_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(names))
        if len(self.tokenizer) > self.input_embeddings().num_embeddings:
            self.resize_vocabulary(len(self.tokenizer))
        return self.action_token_ids

    def freeze(self, mode: str, lora_rank: int = 8, lora_targets: str = "attention", lora_alpha: int | None = None,
               lora_dropout: float = 0.0) -> None:
        """Which parameters train (`robovlms/backbone/freezing.py` lists the modes)."""
        freeze(self, mode, lora_rank, lora_targets, lora_alpha, lora_dropout)

    def partly_frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters of which only some rows train (the word embeddings in frozen-vision-and-embeddings, with
        action tokens): weight decay would shrink their frozen rows, so the optimiser must not decay them."""
        return [self.input_embeddings().weight] if self._action_rows_hook is not None else []

    def save(self, directory: str | Path) -> None:
        """Everything needed to rebuild this backbone exactly, offline: see `load_backbone`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_files(directory)
        spec = {"name": self.name, "size": self.size, "origin": self.origin, "freeze_mode": self.freeze_mode,
                "lora_rank": self.lora_rank, "lora_targets": self.lora_targets, "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout,
                "action_token_ids": None if self.action_token_ids is None else self.action_token_ids.tolist()}
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        save_model(self, str(directory / WEIGHTS_FILE))


    # ---- context layout ---------------------------------------------------------------------------------

    def build_context(self, instructions: list[str], frames: int, views: int, suffix_length: int,
                      interleaved: bool, instruction_per_frame: bool = False) -> Context:
        layouts = [self._row_layout(instruction, frames, views, suffix_length, interleaved, instruction_per_frame)
                   for instruction in instructions]
        rows = [layout for layout in layouts for _ in range(1 if interleaved else frames)]
        return batch_context(rows, self.tokenizer.pad_token_id, frames if interleaved else 1, views)

    def _row_layout(self, instruction: str, frames: int, views: int, suffix_length: int, interleaved: bool,
                    instruction_per_frame: bool):
        key = (instruction, frames, views, suffix_length, interleaved, instruction_per_frame)
        if key not in self._layouts:
            self._layouts[key] = row_layout(self.tokenizer, self.image_block(), *key)
        return self._layouts[key]

    def merge_embeddings(self, context: Context, image_tokens: torch.Tensor | None,
                         suffix_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings (R, L, D) with image tokens (N, n, D) and suffix embeddings put into their slots."""
        embeds = self.embed_tokens(context.input_ids)
        if image_tokens is not None:
            embeds = embeds.masked_scatter(context.image_slots.unsqueeze(-1), image_tokens.to(embeds.dtype))
        return embeds.masked_scatter(context.suffix_slots.unsqueeze(-1), suffix_embeds.to(embeds.dtype))
