"""The dtype each weight is held in, in training and when a trained cell is rebuilt for evaluation.

    backbone.dtype float32   the backbone's weights in fp32, whatever dtype its checkpoint was saved in (a bf16
                             IDEFICS is loaded, then cast): under bf16-mixed they are the fp32 master weights and
                             autocast computes in bf16
    backbone.dtype bfloat16  the backbone's weights in bf16: with freeze lora (the frozen weights in bf16, the
                             adapters in fp32) or with precision bf16-true (every weight in bf16)

The formulation's own modules (heads, [LRN], state embedding) are fp32, except under bf16-true, where Lightning
casts every weight to bf16. A trained cell is rebuilt with each weight in the dtype it was trained in.
"""

from __future__ import annotations

import torch

from robovlms.backbone import Backbone
from robovlms.formulation import Formulation
from robovlms.training.config import TrainingConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hold_backbone_weights(backbone: Backbone, config: TrainingConfig) -> None:
    """Cast the backbone's model to `backbone.dtype`, before LoRA adapters are added (they stay fp32)."""
    backbone.model.to(DTYPES[config.backbone.dtype])


def as_trained(formulation: Formulation, config: TrainingConfig) -> Formulation:
    """Every weight in the dtype training held it in: bf16-true trained them all in bf16."""
    return formulation.to(torch.bfloat16) if config.precision == "bf16-true" else formulation
