"""Pretrained weights: found on this machine only, never downloaded."""

from __future__ import annotations

import json
from pathlib import Path

from robovlms.errors import ConfigError


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
