"""Recipes: named sets of training settings that give another codebase's definitions in one line.

`recipe: robovlms` in a training config (or in a sweep's `train:`) expands, before the config is validated, into
the settings below, merged under the ones written beside it: any setting given next to the recipe wins, key by key
(a formulation option, a backbone field). The run directory's config.yaml holds the expanded settings, so it shows
every value the recipe chose. docs/formulations.md says, for each, where RoboVLMs defines it.

A recipe's formulation options apply by what the formulation is: `every` to all of them (their options extend
FormulationConfig), `continuous` to those whose options extend ContinuousActionConfig, then the formulation's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from robovlms.errors import UnknownNameError


@dataclass(frozen=True)
class Recipe:
    description: str
    settings: dict[str, Any]  # training settings, backbone fields among them
    every: dict[str, Any]  # formulation options of every formulation
    continuous: dict[str, Any]  # of the continuous ones
    by_formulation: dict[str, dict[str, Any]] = field(default_factory=dict)

    def formulation_options(self, formulation: str) -> dict[str, Any]:
        from robovlms.formulation import FORMULATIONS, ContinuousActionConfig, FormulationConfig

        config_class = FORMULATIONS.get(formulation).config_class
        options = {}
        if issubclass(config_class, FormulationConfig):
            options.update(self.every)
        if issubclass(config_class, ContinuousActionConfig):
            options.update(self.continuous)
        return {**options, **self.by_formulation.get(formulation, {})}


ROBOVLMS = Recipe(
    description="RoboVLMs at commit 8adc1d2 (Robot-VLAs/RoboVLMs): its released CALVIN configs and its code",
    settings={
        "backbone": {"freeze": "full", "lora_rank": 64, "lora_alpha": 16, "lora_dropout": 0.05,
                     "lora_targets": "all-linear"},
        "execution": "first",
    },
    every={"action_normalisation": "clip", "action_clip": 0.65, "lrn_init": "zeros"},
    continuous={"objective": "regression", "arm_loss": "huber", "gripper_weight": 0.01,
                "head_width": [1024, 512, 256], "head_activation": "relu", "gripper_head": "separate",
                "head_init": "xavier"},
    by_formulation={
        "policy-head": {"head": "lstm", "fusion_width": 1024, "fusion_layers": 4},
        "interleaved": {"instruction": "per-frame"},
        "one-step-discrete": {"bins": 255, "token_mode": "overwrite", "token_placement": "robovlms",
                              "decoding": "autoregressive", "vocabulary": "full", "rollout_actions": "first",
                              "with_history": True, "action_head": "lm", "readout": "argmax", "label_sigma": 0.0},
    },
)

RECIPES = {"robovlms": ROBOVLMS}


def merged(base: Any, override: Any) -> Any:
    """`override` over `base`, dictionaries key by key."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{key: merged(base.get(key), value) for key, value in override.items()}}
    return override


def expand_recipe(source: dict[str, Any], default_formulation: str) -> dict[str, Any]:
    """Training settings with their `recipe`'s settings merged under them; without a recipe, as they are. A
    formulation that is not a mapping is left for validation to name."""
    name = source.get("recipe")
    if name is None:
        return source
    if name not in RECIPES:
        raise UnknownNameError("recipe", name, RECIPES)
    recipe = RECIPES[name]
    formulation = source.get("formulation", {})
    if not isinstance(formulation, dict):
        return source
    options = recipe.formulation_options(formulation.get("name", default_formulation))
    return merged(merged(recipe.settings, {"formulation": {"options": options}}), source)
