"""A backbone's architecture without its weights, built on the meta device (shapes, no values): from its tiny
options, from the config.json and processor files of a pretrained directory, or, where that directory is not on
this machine, from the sizes of the published model its plugin declares (`Backbone.published_models`).

Counting parameters, checking that settings build, and estimating memory need nothing more, so they work before
any weights are downloaded, and a 9B model builds in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from robovlms.backbone.interface import Backbone
from robovlms.backbone.pretrained import resolve_pretrained
from robovlms.backbone.registry import BACKBONES, check_backbone_settings


@dataclass
class Architecture:
    backbone: Backbone  # on the meta device
    source: str  # where its sizes come from
    missing_path: str | None = None  # a pretrained path not found on this machine, stood in for by published sizes


def meta_backbone(name: str, size: str = "tiny", path: str | None = None, options: dict[str, Any] | None = None,
                  published: bool = False) -> Architecture:
    """Backbone `name` built on the meta device. With `published`, a pretrained `path` that is not on this machine
    is stood in for by the published model of the plugin whose name matches the path's last part (else its
    first); without it, a missing path is refused as training would refuse it."""
    options = options or {}
    backbone_class = check_backbone_settings(name, size, path, options)
    with torch.device("meta"), BACKBONES.building(name):
        if size == "tiny":
            return Architecture(backbone_class.tiny(**options), "its tiny options")
        if published and backbone_class.published_models and not _on_this_machine(path):
            model_id = published_model(backbone_class, path)
            return Architecture(backbone_class.published_architecture(model_id),
                                f"{model_id} ({backbone_class.published_models[model_id]})", missing_path=path)
        directory = resolve_pretrained(path, backbone_class.model_types, name)
        return Architecture(backbone_class.from_saved(directory, "pretrained", path), f"{directory / 'config.json'}")


def published_model(backbone_class: type[Backbone], path: str | None) -> str:
    """The published model a path most likely holds: the one whose name is the path's last part, else the
    plugin's first."""
    models = list(backbone_class.published_models)
    last = Path(str(path or "")).name.lower()
    return next((model for model in models if model.split("/")[-1].lower() == last), models[0])


def _on_this_machine(path: str | None) -> bool:
    """A local directory, or a model id in the local Hugging Face cache."""
    if path is None:
        return False
    if Path(path).expanduser().is_dir():
        return True
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(str(path), local_files_only=True)
    except (OSError, ValueError):
        return False
    return True
