"""Backbones: the vision-language models the formulations talk to.

    interface.py              Backbone, the one interface every backbone implements
    context.py                the token layout of a batch of contexts (images, instruction, suffix embeddings)
    transformers_backbone.py  TransformersBackbone: a `transformers` model class and its processor behind it
    pretrained.py             finding pretrained weights on this machine, never downloading them
    freezing.py               which parameters train: frozen modules, or LoRA adapters
    registry.py               BACKBONES, `create_backbone` (the one way in), rebuilding and listing them
"""

from robovlms.backbone.context import Context
from robovlms.backbone.freezing import FREEZE_MODES, LORA_TARGETS, all_linear_modules
from robovlms.backbone.interface import MAX_IMAGE_SIZE, SIZES, SPEC_FILE, WEIGHTS_FILE, Backbone
from robovlms.backbone.pretrained import resolve_pretrained
from robovlms.backbone.registry import (BACKBONES, backbones_table, check_backbone_settings, create_backbone,
                                        list_backbones, load_backbone, options_to_config, rebuild_backbone)
from robovlms.backbone.transformers_backbone import (TransformersBackbone, auto_processor, check_image_size,
                                                     processor_image_settings)

__all__ = ["BACKBONES", "FREEZE_MODES", "LORA_TARGETS", "MAX_IMAGE_SIZE", "SIZES", "SPEC_FILE", "WEIGHTS_FILE",
           "Backbone", "Context", "TransformersBackbone", "all_linear_modules", "auto_processor", "backbones_table",
           "check_backbone_settings", "check_image_size", "create_backbone", "list_backbones", "load_backbone",
           "options_to_config", "processor_image_settings", "rebuild_backbone", "resolve_pretrained"]
