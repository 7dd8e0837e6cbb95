"""The registry of backbones, and the one way to build, rebuild or list them.

Backbones register in BACKBONES (declared in robovlms/registry.py beside the other axes) under a name; built-in
ones and third-party ones alike declare an entry point in the group `robovlms.backbones` that names their Backbone
subclass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model

from robovlms.backbone.interface import SIZES, SPEC_FILE, WEIGHTS_FILE, Backbone
from robovlms.errors import ConfigError, RobovlmsError, UnknownNameError
from robovlms.registry import BACKBONES, plugin_options


def options_to_config(config_class: type, options: dict[str, Any], backbone: str):
    """A tiny config dataclass from keyword overrides; an unknown key names the valid ones."""
    return plugin_options(config_class, options, "backbone", backbone)


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
                    lora_targets=spec.get("lora_targets") or "attention", lora_alpha=spec.get("lora_alpha"),
                    lora_dropout=spec.get("lora_dropout") or 0.0)
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
