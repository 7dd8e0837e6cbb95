"""A backbone wrapping a `transformers` model class and its processor, and what such a wrapper needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from robovlms.backbone.activations import Elements, Layers, Saved, config_layers, find_layers, trains
from robovlms.backbone.interface import Backbone
from robovlms.backbone.pretrained import resolve_pretrained
from robovlms.errors import ConfigError, PluginError


class TransformersBackbone(Backbone):
    """A backbone wrapping a transformers model class and its processor (tokenizer + image processor)."""

    model_class: ClassVar[type]
    model_types: ClassVar[tuple[str, ...]]  # config.json model_type values this backbone accepts

    def __init__(self, model, processor, size: str, origin: str | None, image_size: int | None = None):
        """`image_size`: the side of the square images the vision tower takes, when the image processor's size
        is not one (Qwen2-VL's is a pixel count); by default the processor's, checked against the vision config."""
        settings = processor_image_settings(processor.image_processor)
        if image_size is None and settings["image_size"] is None:
            raise ConfigError(f"backbone {self.name!r}: its image processor's size {_size_dict(processor.image_processor)}"
                              f" names no image side; pass image_size= to TransformersBackbone.__init__")
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

    def save_pretrained(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

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

    @classmethod
    def supports_gradient_checkpointing(cls) -> bool:
        return cls.model_class.supports_gradient_checkpointing

    def enable_gradient_checkpointing(self) -> None:
        # non-reentrant: correct with frozen embeddings and LoRA, where the inputs of a layer need no gradient.
        # transformers 5.x renamed gradient_checkpointing_enable to activation_checkpointing_enable
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def block_classes(self) -> set[type[nn.Module]]:
        names = set(getattr(self.model, "_no_split_modules", None) or ())  # transformers' unit of device placement
        return {type(module) for module in self.model.modules() if type(module).__name__ in names}

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def activation_layers(self, images: int, rows: int, context: int) -> list[Layers | Saved]:
        """A vision encoder over each image's patches and a decoder over the contexts, sized from the config;
        backbones with more (a resampler, cross-attention) add theirs."""
        vision_modules, text = self.vision_modules(), self.model.config.get_text_config()
        vision_trains = trains(vision_modules)
        described = [*vision_encoder_activations(vision_modules, getattr(self.model.config, "vision_config", None),
                                                 images, self.image_size)]
        described += decoder_activations(self.language_modules(), text, rows, context)
        if vision_trains and described[0].name == "vision encoder":
            projector = vision_modules[-1]  # the projector into the language model: keeps the image tokens
            if projector is not self.model and trains([projector]):
                encoder = described[0]
                described.append(Saved("projector input", Elements(other=images * encoder.tokens * encoder.hidden)))
        return described

    def resize_vocabulary(self, vocab_size: int) -> None:
        # Not transformers' mean resizing: it puts every new row at the old rows' mean plus noise at 1e-9 of their
        # covariance, so appended action tokens would start as one token (the same logit for every bin, the same
        # input when decoded one by one). The model's own initialisation gives each bin a row of its own. What mean
        # resizing guards against, new tokens taking probability from the pretrained vocabulary, cannot happen
        # here: the discrete formulation's softmax is over the action tokens alone. (It also needs no values, so a
        # model built on the meta device, to count parameters, resizes too.)
        self.model.resize_token_embeddings(vocab_size, mean_resizing=False)


def vision_encoder_activations(vision_modules: list[nn.Module], vision_config, images: int,
                               image_size: int) -> list[Layers | Saved]:
    """A ViT's layers over each image's patches (and class token), its pixels and final norm, when its config and
    a `layers` ModuleList are found in `vision_modules`."""
    layers = find_layers(vision_modules)
    if vision_config is None or layers is None:
        return []
    on_path = trains(vision_modules)
    class_token = any("class_embedding" in name for module in vision_modules for name, _ in module.named_parameters())
    tokens = (image_size // vision_config.patch_size) ** 2 + class_token
    encoder = config_layers("vision encoder", layers, vision_config, images, tokens, on_path)
    if not on_path:
        return [encoder]
    return [encoder, Saved("pixels", Elements(other=images * 3 * image_size ** 2)),
            Saved("vision norms", Elements(norms=images * tokens * (encoder.hidden + 2)))]


def decoder_activations(language_modules: list[nn.Module], text_config, rows: int, context: int,
                        **overrides) -> list[Layers | Saved]:
    """A decoder's layers over the contexts, each keeping an attention mask (a transformers decoder makes one for
    padding and prefixes), and its final norm."""
    decoder = config_layers("language model", find_layers(language_modules), text_config, rows, context, True,
                            **{"attention_mask": True, **overrides})
    final_norm = decoder.hidden + 2 if decoder.norm == "layer" else 2 * decoder.hidden + 1
    return [decoder, Saved("final norm", Elements(norms=rows * context * final_norm))]


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


def _size_dict(image_processor) -> dict[str, Any]:
    """The image processor's resize target, without the keys it leaves unset (a SizeDict holds all of them)."""
    size = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size
    return {key: value for key, value in dict(size).items() if value is not None}


def processor_image_settings(image_processor) -> dict[str, Any]:
    """image_size, image_mean, image_std, rescale_factor as a transformers image processor configures them. The
    image size is the side of the square images the vision tower takes: the size's `height`, else its
    `shortest_edge` (after a centre crop, `crop_size`'s), else, for processors that cut images into tiles
    (Idefics3, SmolVLM), the tiles' `max_image_size`, else the size's `longest_edge`; None when the size names no
    side (a pixel count only), for the backbone to declare."""
    size = _size_dict(image_processor)
    tiles = dict(getattr(image_processor, "max_image_size", None) or {})
    side = size.get("height") or size.get("shortest_edge") or tiles.get("longest_edge") or size.get("longest_edge")
    return {"image_size": int(side) if side else None, "image_mean": tuple(image_processor.image_mean),
            "image_std": tuple(image_processor.image_std), "rescale_factor": float(image_processor.rescale_factor)}
