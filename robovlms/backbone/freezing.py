"""Which of a backbone's parameters train: whole modules frozen, or LoRA adapters (peft) alone."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from robovlms.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:
    from robovlms.backbone.interface import Backbone

# lora last: a backbone that carries adapters cannot change mode again
FREEZE_MODES = ("full", "frozen-vision", "frozen-language", "frozen-vision-and-embeddings", "lora")
LORA_TARGETS = ("attention", "all-linear")


def freeze(backbone: Backbone, mode: str, lora_rank: int = 8, lora_targets: str = "attention",
           lora_alpha: int | None = None, lora_dropout: float = 0.0) -> None:
    """Which parameters train:
        full                          all
        frozen-vision                 all but `vision_modules()`
        frozen-language               all but `language_modules()`
        frozen-vision-and-embeddings  all but the vision modules and the word embeddings (RoboVLMs' default),
                                      whose reserved action token rows still train
        lora                          LoRA adapters only, on `lora_targets`: `attention` (the modules
                                      `lora_target_modules` matches) or `all-linear` (`all_linear_modules()`),
                                      scaled by lora_alpha / lora_rank (alpha None: the rank, a scale of 1),
                                      with dropout `lora_dropout` on their input
    Call it after `reserve_action_tokens`: the action token rows it keeps trainable are the last reserved."""
    if mode not in FREEZE_MODES:
        raise UnknownNameError("freeze mode", mode, FREEZE_MODES)
    if lora_targets not in LORA_TARGETS:
        raise UnknownNameError("LoRA targets", lora_targets, LORA_TARGETS)
    if backbone.freeze_mode == "lora" and mode != "lora":
        raise ConfigError(f"{backbone.label} already carries LoRA adapters; build a fresh backbone for mode {mode!r}")
    if backbone._action_rows_hook is not None:
        backbone._action_rows_hook.remove()
        backbone._action_rows_hook = None
    backbone.requires_grad_(mode != "lora")
    if mode in ("frozen-vision", "frozen-vision-and-embeddings"):
        for module in backbone.vision_modules():
            module.requires_grad_(False)
    if mode == "frozen-vision-and-embeddings":
        _train_only_action_token_rows(backbone)
    elif mode == "frozen-language":
        for module in backbone.language_modules():
            module.requires_grad_(False)
    elif mode == "lora":
        _add_lora_adapters(backbone, lora_rank, lora_targets, lora_alpha, lora_dropout)
        for name, parameter in backbone.named_parameters():
            parameter.requires_grad_("lora_" in name)
    backbone.freeze_mode = mode


def _add_lora_adapters(backbone: Backbone, lora_rank: int, lora_targets: str, lora_alpha: int | None,
                       lora_dropout: float) -> None:
    alpha = lora_rank if lora_alpha is None else lora_alpha
    if not 0 <= lora_dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
    if backbone.lora_rank is None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import cast_adapter_dtype

        targets = backbone.lora_target_modules if lora_targets == "attention" else all_linear_modules(backbone)
        config = LoraConfig(r=lora_rank, lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=targets)
        inject_adapter_in_model(config, backbone.model)
        # adapters are made in their layer's dtype; in fp32 they train under mixed precision beside bf16 weights
        cast_adapter_dtype(backbone.model, "default")
        backbone.lora_rank, backbone.lora_targets = lora_rank, lora_targets
        backbone.lora_alpha, backbone.lora_dropout = alpha, lora_dropout
    elif (lora_rank, lora_targets, alpha, lora_dropout) != (backbone.lora_rank, backbone.lora_targets,
                                                            backbone.lora_alpha, backbone.lora_dropout):
        raise ConfigError(f"{backbone.label} already carries LoRA adapters of rank {backbone.lora_rank} on "
                          f"{backbone.lora_targets} (alpha {backbone.lora_alpha}, dropout {backbone.lora_dropout}), "
                          f"not rank {lora_rank} on {lora_targets} (alpha {alpha}, dropout {lora_dropout})")


def all_linear_modules(backbone: Backbone) -> list[str]:
    """Names in `backbone.model` of every nn.Linear outside `vision_modules()` but the LM head: the targets of
    `lora_targets: all-linear`, RoboVLMs' choice (LLaVA's `find_all_linear_names`)."""
    vision = {id(module) for tower in backbone.vision_modules() for module in tower.modules()}
    head = backbone.output_embeddings()
    names = [name for name, module in backbone.model.named_modules()
             if isinstance(module, nn.Linear) and id(module) not in vision and module is not head]
    if not names:
        raise ConfigError(f"{backbone.label} has no nn.Linear outside its vision modules and LM head for "
                          f"lora_targets all-linear; use lora_targets attention")
    return names


def _train_only_action_token_rows(backbone: Backbone) -> None:
    """Word embeddings frozen, except the rows of the reserved action tokens: appended ones start untrained,
    and RoboVLMs and OpenVLA train them. With no action tokens, the whole embedding is frozen."""
    weight = backbone.input_embeddings().weight
    if backbone.action_token_ids is None:
        weight.requires_grad_(False)
        return
    rows = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
    rows[backbone.action_token_ids] = True
    backbone._action_rows_hook = weight.register_hook(lambda grad: grad * rows.to(grad.device))
