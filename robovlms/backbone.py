"""The backbone interface: a vision-language model the four formulations talk to, and the registry of them.

A backbone turns images, an instruction and a few suffix embeddings (the learnable [LRN] action token, or
embedded action tokens) into the last-layer hidden states at those suffix positions. Two context layouts:

    per frame (interleaved=False), one row per (sample, frame):
        <s> [image block of view 1] ... [image block of view V] instruction [suffix_t]
    interleaved (interleaved=True), one causal row per sample:
        <s> instruction [image blocks of frame 1] [suffix_1] ... [image blocks of frame T] [suffix_T]
    or, with instruction_per_frame (RoboVLMs' interleaved layout), the instruction before each frame's images.

An image block is a backbone's own framing of one image (`image_block()`: token ids before it, a number of
slots that receive its image tokens, token ids after it); Flamingo-style backbones have no slots and
cross-attend to the images instead. Rows are right-padded, so padding never shifts a position.

Suffix embeddings are in the scale of `embed_tokens`, whatever the model does next: Kosmos-2 multiplies
text and image embeddings by sqrt(D) inside its text model, Gemma inside its embedding layer.

Backbones register in BACKBONES under a name; built-in ones and third-party ones alike declare an entry
point in the group `robovlms.backbones` that names their Backbone subclass.
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from robovlms.errors import ConfigError, PluginError, RobovlmsError, ShapeError, UnknownNameError
from robovlms.registry import Registry

SIZES = ("tiny", "pretrained")
# lora last: a backbone that carries adapters cannot change mode again
FREEZE_MODES = ("full", "frozen-vision", "frozen-language", "frozen-vision-and-embeddings", "lora")
LORA_TARGETS = ("attention", "all-linear")
MAX_IMAGE_SIZE = 2048  # px; no VLM's vision tower takes larger square images, so a larger "size" is a pixel count
SPEC_FILE = "backbone.json"
WEIGHTS_FILE = "backbone.safetensors"


@dataclass
class Context:
    """Token layout of a batch of contexts. Image and suffix slots hold the pad id until filled."""

    input_ids: torch.Tensor  # (R, L)
    attention_mask: torch.Tensor  # (R, L), 0 on right padding
    image_slots: torch.Tensor  # (R, L) bool, filled with image tokens in (row, image, token) order
    suffix_slots: torch.Tensor  # (R, L) bool, filled with suffix embeddings in (row, frame, k) order
    frame: torch.Tensor  # (R, L) frame (within the row) whose images came last at or before a position, -1 before any
    frames_per_row: int
    views: int

    def to(self, device) -> Context:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return Context(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in moved.items()})


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
        hidden = self.contextualise(context, images, suffix_embeds.reshape(B * T * K, D))  # (R, L, D)
        return hidden[context.suffix_slots].view(B, T, K, D)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The model's own input embeddings, in the scale `forward` expects for suffix_embeds."""
        return self.input_embeddings()(token_ids)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_embeddings()(hidden)

    def reserve_action_tokens(self, count: int, mode: str = "overwrite") -> torch.Tensor:
        """Token ids for `count` action bins, in bin order.

        overwrite: reuse the last `count` ids of the base vocabulary (the least used merges of a BPE vocabulary),
        skipping special and added tokens; bin 0 takes the last id, as RT-2 and OpenVLA do.
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
            if count > len(candidates):
                raise ConfigError(f"cannot overwrite {count} tokens: {self.label} has {len(candidates)} ordinary "
                                  f"tokens; use mode='append'")
            self.action_token_ids = torch.tensor(candidates[:count])
            return self.action_token_ids
        names = [f"<action_{i}>" for i in range(count)]
        self.tokenizer.add_tokens(names, special_tokens=True)  # skips the ones it holds
        self.action_token_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(names))
        if len(self.tokenizer) > self.input_embeddings().num_embeddings:
            self.resize_vocabulary(len(self.tokenizer))
        return self.action_token_ids

    def freeze(self, mode: str, lora_rank: int = 8, lora_targets: str = "attention") -> None:
        """Which parameters train:
            full                          all
            frozen-vision                 all but `vision_modules()`
            frozen-language               all but `language_modules()`
            frozen-vision-and-embeddings  all but the vision modules and the word embeddings (RoboVLMs' default),
                                          whose reserved action token rows still train
            lora                          LoRA adapters only, on `lora_targets`: `attention` (the modules
                                          `lora_target_modules` matches) or `all-linear` (`all_linear_modules()`)
        Call it after `reserve_action_tokens`: the action token rows it keeps trainable are the last reserved."""
        if mode not in FREEZE_MODES:
            raise UnknownNameError("freeze mode", mode, FREEZE_MODES)
        if lora_targets not in LORA_TARGETS:
            raise UnknownNameError("LoRA targets", lora_targets, LORA_TARGETS)
        if self.freeze_mode == "lora" and mode != "lora":
            raise ConfigError(f"{self.label} already carries LoRA adapters; build a fresh backbone for mode {mode!r}")
        if self._action_rows_hook is not None:
            self._action_rows_hook.remove()
            self._action_rows_hook = None
        self.requires_grad_(mode != "lora")
        if mode in ("frozen-vision", "frozen-vision-and-embeddings"):
            for module in self.vision_modules():
                module.requires_grad_(False)
        if mode == "frozen-vision-and-embeddings":
            self._train_only_action_token_rows()
        elif mode == "frozen-language":
            for module in self.language_modules():
                module.requires_grad_(False)
        elif mode == "lora":
            if self.lora_rank is None:
                from peft import LoraConfig, inject_adapter_in_model

                targets = self.lora_target_modules if lora_targets == "attention" else self.all_linear_modules()
                config = LoraConfig(r=lora_rank, lora_alpha=lora_rank, lora_dropout=0.0, target_modules=targets)
                inject_adapter_in_model(config, self.model)
                self.lora_rank, self.lora_targets = lora_rank, lora_targets
            elif (lora_rank, lora_targets) != (self.lora_rank, self.lora_targets):
                raise ConfigError(f"{self.label} already carries LoRA adapters of rank {self.lora_rank} on "
                                  f"{self.lora_targets}, not rank {lora_rank} on {lora_targets}")
            for name, parameter in self.named_parameters():
                parameter.requires_grad_("lora_" in name)
        self.freeze_mode = mode

    def all_linear_modules(self) -> list[str]:
        """Names in `self.model` of every nn.Linear outside `vision_modules()` but the LM head: the targets of
        `lora_targets: all-linear`, RoboVLMs' choice (LLaVA's `find_all_linear_names`)."""
        vision = {id(module) for tower in self.vision_modules() for module in tower.modules()}
        head = self.output_embeddings()
        names = [name for name, module in self.model.named_modules()
                 if isinstance(module, nn.Linear) and id(module) not in vision and module is not head]
        if not names:
            raise ConfigError(f"{self.label} has no nn.Linear outside its vision modules and LM head for "
                              f"lora_targets all-linear; use lora_targets attention")
        return names

    def _train_only_action_token_rows(self) -> None:
        """Word embeddings frozen, except the rows of the reserved action tokens: appended ones start untrained,
        and RoboVLMs and OpenVLA train them. With no action tokens, the whole embedding is frozen."""
        weight = self.input_embeddings().weight
        if self.action_token_ids is None:
            weight.requires_grad_(False)
            return
        rows = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
        rows[self.action_token_ids] = True
        self._action_rows_hook = weight.register_hook(lambda grad: grad * rows.to(grad.device))

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
                "lora_rank": self.lora_rank, "lora_targets": self.lora_targets,
                "action_token_ids": None if self.action_token_ids is None else self.action_token_ids.tolist()}
        (directory / SPEC_FILE).write_text(json.dumps(spec, indent=2))
        save_model(self, str(directory / WEIGHTS_FILE))

    # ---- context layout ---------------------------------------------------------------------------------

    def build_context(self, instructions: list[str], frames: int, views: int, suffix_length: int,
                      interleaved: bool, instruction_per_frame: bool = False) -> Context:
        layouts = [self._row_layout(instruction, frames, views, suffix_length, interleaved, instruction_per_frame)
                   for instruction in instructions]
        rows = [layout for layout in layouts for _ in range(1 if interleaved else frames)]
        input_ids, kind, frame = (pad_sequence([row[i] for row in rows], batch_first=True, padding_value=value)
                                  for i, value in enumerate((self.tokenizer.pad_token_id, _PAD, -1)))
        return Context(input_ids=input_ids, attention_mask=(kind != _PAD).long(), image_slots=kind == _IMAGE,
                       suffix_slots=kind == _SUFFIX, frame=frame, frames_per_row=frames if interleaved else 1,
                       views=views)

    def _row_layout(self, instruction: str, frames: int, views: int, suffix_length: int, interleaved: bool,
                    instruction_per_frame: bool):
        key = (instruction, frames, views, suffix_length, interleaved, instruction_per_frame)
        if key not in self._layouts:
            self._layouts[key] = self._build_row_layout(*key)
        return self._layouts[key]

    def _build_row_layout(self, instruction: str, frames: int, views: int, suffix_length: int, interleaved: bool,
                          instruction_per_frame: bool):
        before, slots, after = self.image_block()
        block_ids = before + [self.tokenizer.pad_token_id] * slots + after
        block_kind = [_TEXT] * len(before) + [_IMAGE] * slots + [_TEXT] * len(after)
        instruction_ids = self.tokenizer(instruction, add_special_tokens=False)["input_ids"]
        ids, kind, frame = [self.tokenizer.bos_token_id], [_TEXT], [-1]

        def add(new_ids, new_kind, new_frame):
            ids.extend(new_ids)
            kind.extend(new_kind)
            frame.extend([new_frame] * len(new_ids))

        suffix_ids = [self.tokenizer.pad_token_id] * suffix_length
        if not interleaved:
            add(block_ids * views, block_kind * views, 0)
            add(instruction_ids, [_TEXT] * len(instruction_ids), 0)
            add(suffix_ids, [_SUFFIX] * suffix_length, 0)
        else:
            if not instruction_per_frame:
                add(instruction_ids, [_TEXT] * len(instruction_ids), -1)
            for t in range(frames):
                if instruction_per_frame:  # after frame t - 1's images, before frame t's
                    add(instruction_ids, [_TEXT] * len(instruction_ids), t - 1)
                add(block_ids * views, block_kind * views, t)
                add(suffix_ids, [_SUFFIX] * suffix_length, t)
        return torch.tensor(ids), torch.tensor(kind), torch.tensor(frame)

    def merge_embeddings(self, context: Context, image_tokens: torch.Tensor | None,
                         suffix_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings (R, L, D) with image tokens (N, n, D) and suffix embeddings put into their slots."""
        embeds = self.embed_tokens(context.input_ids)
        if image_tokens is not None:
            embeds = embeds.masked_scatter(context.image_slots.unsqueeze(-1), image_tokens.to(embeds.dtype))
        return embeds.masked_scatter(context.suffix_slots.unsqueeze(-1), suffix_embeds.to(embeds.dtype))


_PAD, _TEXT, _IMAGE, _SUFFIX = 0, 1, 2, 3  # what a context position holds



class TransformersBackbone(Backbone):
    """A backbone wrapping a transformers model class and its processor (tokenizer + image processor)."""

    model_class: ClassVar[type]
    model_types: ClassVar[tuple[str, ...]]  # config.json model_type values this backbone accepts

    def __init__(self, model, processor, size: str, origin: str | None, image_size: int | None = None):
        """`image_size`: the side of the square images the vision tower takes, when the image processor's size
        is not one (Qwen2-VL's is a pixel count); by default the processor's, checked against the vision config."""
        settings = processor_image_settings(processor.image_processor)
        settings["image_size"] = image_size or settings["image_size"]
        check_image_size(settings["image_size"], model.config, self.name, declared=image_size is not None)
        super().__init__(size=size, origin=origin, tokenizer=processor.tokenizer, **settings)
        self.model = model
        self.processor = processor

    @classmethod
    def pretrained(cls, path: str) -> Backbone:
        directory = resolve_pretrained(path, cls.model_types, cls.name)
        processor = auto_processor(directory, cls.name)
        model = cls.model_class.from_pretrained(directory, local_files_only=True)
        return cls(model, processor, "pretrained", str(path))

    @classmethod
    def from_saved(cls, directory: Path, size: str, origin: str | None) -> Backbone:
        from transformers import AutoConfig

        processor = auto_processor(directory, cls.name)
        model = cls.model_class(AutoConfig.from_pretrained(directory, local_files_only=True))
        return cls(model, processor, size, origin)

    def save_files(self, directory: Path) -> None:
        self.processor.save_pretrained(directory)
        self.model.config.save_pretrained(directory)

    def reference_inputs(self, image: torch.Tensor, instruction: str, suffix_embed: torch.Tensor,
                         image_token_id: int | None = None):
        """For `reference_hidden_state`: the image as the model's own processor gives it, the documented per-frame
        context `<s> [image block] instruction [suffix]` spelled out as token ids (image slots hold
        `image_token_id`, the suffix a placeholder), its embeddings with `suffix_embed` in place, and the mask of
        the image slots: (pixel_values, ids (1, L), embeds (1, L, D), image_mask (1, L))."""
        processed = self.processor.image_processor(images=[image.numpy()], return_tensors="pt")
        pixel_values = processed if torch.is_tensor(processed) else processed.pixel_values  # IDEFICS' is the tensor
        before, slots, after = self.image_block()
        slot = self.tokenizer.pad_token_id if image_token_id is None else image_token_id
        instruction_ids = self.tokenizer(instruction, add_special_tokens=False)["input_ids"]
        ids = [self.tokenizer.bos_token_id, *before, *[slot] * slots, *after, *instruction_ids,
               self.tokenizer.pad_token_id]
        image_mask = torch.zeros(1, len(ids), dtype=torch.long)
        image_mask[0, 1 + len(before):1 + len(before) + slots] = 1
        ids = torch.tensor([ids])
        embeds = self.input_embeddings()(ids)
        embeds[0, -1] = suffix_embed
        return pixel_values, ids, embeds, image_mask

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def resize_vocabulary(self, vocab_size: int) -> None:
        self.model.resize_token_embeddings(vocab_size)


# ---- helpers for backbone implementations -------------------------------------------------------------------


def options_to_config(config_class: type, options: dict[str, Any], backbone: str):
    """A tiny config dataclass from keyword overrides; an unknown key names the valid ones."""
    from pydantic import TypeAdapter, ValidationError

    valid = [f.name for f in fields(config_class)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for backbone {backbone!r}; "
                          f"valid options: {', '.join(valid)}")
    try:
        return TypeAdapter(config_class).validate_python(options)
    except ValidationError as error:
        problem = error.errors()[0]
        key = ".".join(str(part) for part in problem["loc"])
        raise ConfigError(f"backbone {backbone!r} option {key}: {problem['msg']} (got "
                          f"{problem.get('input')!r})") from None


def resolve_pretrained(path: str | None, model_types: tuple[str, ...], backbone: str) -> Path:
    """A local directory holding a model of one of `model_types`: `path` itself, or a model id already in
    the local Hugging Face cache. Reads config.json only, so a bad path fails before any weights load."""
    if path is None:
        raise ConfigError(f"backbone {backbone!r} of size 'pretrained' needs path=: a local directory or a model "
                          f"id in the local Hugging Face cache")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        from huggingface_hub import snapshot_download

        try:
            directory = Path(snapshot_download(str(path), local_files_only=True))
        except (OSError, ValueError):
            raise ConfigError(f"pretrained path {str(path)!r} for backbone {backbone!r} does not exist and is not a "
                              f"model id in the local Hugging Face cache (nothing is downloaded)") from None
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{directory} holds no config.json; backbone {backbone!r} needs a model of type "
                          f"{' or '.join(model_types)}")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type not in model_types:
        raise ConfigError(f"{directory} holds a {model_type!r} model; backbone {backbone!r} needs a model of type "
                          f"{' or '.join(model_types)}")
    return directory


def check_image_size(image_size: int, config, backbone: str, declared: bool) -> None:
    """The image side a backbone derived (or `declared`) agrees with its vision config: equal to its image_size,
    or a whole number of its patches when it has no fixed size."""
    vision = getattr(config, "vision_config", None)
    expected, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    source = "declared image_size" if declared else "image size from its image processor's size"
    if expected is not None and image_size != expected:
        raise ConfigError(f"backbone {backbone!r}: {source} {image_size} differs from its vision config's "
                          f"image_size {expected}; pass image_size= to TransformersBackbone.__init__ when the "
                          f"processor's size is not the image side")
    if patch and image_size % patch:
        raise ConfigError(f"backbone {backbone!r}: {source} {image_size} is not a multiple of its vision config's "
                          f"patch_size {patch}; pass image_size= to TransformersBackbone.__init__ when the "
                          f"processor's size is not the image side (Qwen2-VL's is a pixel count)")


def auto_processor(directory: Path, backbone: str):
    """The processor saved in `directory`, through AutoProcessor; one that cannot be built without torchvision
    (which robovlms never installs) says what to do instead."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(directory, local_files_only=True)
    except ImportError as error:
        needs = str(error).strip().splitlines()[0].split(". ")[0]  # "... requires the Torchvision library ..."
        raise PluginError(f"backbone {backbone!r}: AutoProcessor cannot build the processor in {directory} "
                          f"({needs}); override pretrained and from_saved to load the tokenizer and the "
                          f"*ImageProcessorPil class instead (docs/adding-a-backbone.md)") from error


def processor_image_settings(image_processor) -> dict[str, Any]:
    """image_size, image_mean, image_std, rescale_factor as a transformers image processor configures them."""
    size = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size
    size = dict(size)
    side = size.get("height", size.get("shortest_edge"))
    return {"image_size": int(side), "image_mean": tuple(image_processor.image_mean),
            "image_std": tuple(image_processor.image_std), "rescale_factor": float(image_processor.rescale_factor)}


# ---- registry -----------------------------------------------------------------------------------------------

BACKBONES: Registry[type[Backbone]] = Registry("backbone", "robovlms.backbones", Backbone,
                                                ("name", "description", "lora_target_modules"))


def create_backbone(name: str, size: str = "tiny", path: str | None = None, **options) -> Backbone:
    """The one way in: `create_backbone("kosmos2")`, `create_backbone("paligemma", "pretrained", path=...)`."""
    backbone_class = check_backbone_settings(name, size, path, options)
    with BACKBONES.building(name):
        return backbone_class.tiny(**options) if size == "tiny" else backbone_class.pretrained(path)


def check_backbone_settings(name: str, size: str, path: str | None, options: dict[str, Any]) -> type[Backbone]:
    """What can be checked without building the model: name, size, path, and a tiny config's option keys and
    types. Returns the backbone class."""
    backbone_class = BACKBONES.get(name)
    if size not in SIZES:
        raise UnknownNameError("backbone size", size, SIZES)
    if size == "tiny":
        if path is not None:
            raise ConfigError(f"a tiny {name} is built from scratch; path={path!r} is only for size 'pretrained'")
        if backbone_class.tiny_config is not None:
            options_to_config(backbone_class.tiny_config, options, name)
    elif options:
        raise ConfigError(f"options {', '.join(sorted(options))} only apply to size 'tiny'; "
                          f"a pretrained {name} takes its configuration from {path}")
    return backbone_class


def load_backbone(directory: str | Path) -> Backbone:
    """Rebuild a backbone written by `Backbone.save`, offline, from that directory alone."""
    directory = Path(directory)
    spec_file = directory / SPEC_FILE
    if not spec_file.is_file():
        raise ConfigError(f"{directory} holds no saved backbone ({SPEC_FILE} is missing)")
    spec = json.loads(spec_file.read_text())
    backbone = rebuild_backbone(spec["name"], directory, spec["size"], spec["origin"])
    if spec.get("action_token_ids") is not None:
        backbone.action_token_ids = torch.tensor(spec["action_token_ids"])
    # LoRA adapters exist before loading
    backbone.freeze(spec["freeze_mode"], lora_rank=spec["lora_rank"] or 8,
                    lora_targets=spec.get("lora_targets") or "attention")
    load_model(backbone, str(directory / WEIGHTS_FILE))
    return backbone


def rebuild_backbone(name: str, directory: Path, size: str, origin: str | None) -> Backbone:
    """Backbone `name`'s architecture from the files its `save_files` wrote in `directory`, randomly initialised."""
    backbone_class = BACKBONES.get(name)
    with BACKBONES.building(name):
        return backbone_class.from_saved(Path(directory), size, origin)


def list_backbones(parameters: bool = False) -> list[dict[str, Any]]:
    """Every registered backbone from its package metadata and class (see `Registry.listing`); with
    `parameters`, also the parameter count of its tiny size, which builds each one (seconds, not milliseconds)."""
    rows = BACKBONES.listing()
    if parameters:
        for row in rows:
            if row["failed"]:
                continue
            try:
                row["tiny_parameters"] = create_backbone(row["name"]).num_parameters()
            except RobovlmsError as error:
                row["description"], row["failed"] = str(error), "yes"
    return rows


def backbones_table(rows: list[dict[str, Any]]):
    """`robovlms backbones`: rows of `list_backbones` as a rich table."""
    counted = any("tiny_parameters" in row for row in rows)
    for row in rows:
        if "tiny_parameters" in row:
            row["tiny parameters"] = f"{row['tiny_parameters'] / 1e6:.2f}M"
    return BACKBONES.table(rows, ("tiny parameters",) if counted else ())
