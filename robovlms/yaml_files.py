"""Reading the YAML files users write: sweep files, training configs, import specs, real-world success rates."""

from __future__ import annotations

from pathlib import Path

from robovlms.errors import ConfigError


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file holding a mapping (`what`: e.g. "sweep settings"); every way it can be wrong is a ConfigError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no {what} file at {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of {what}")
    return raw
