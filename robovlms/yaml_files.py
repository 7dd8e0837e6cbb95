"""Reading the YAML files users write: sweep files, training configs, import specs, real-world success rates."""

from __future__ import annotations

from pathlib import Path

import yaml

from robovlms.errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader, except that a key given twice in one mapping is an error instead of last-wins."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, whose keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file holding a mapping (`what`: e.g. "sweep settings"); every way it can be wrong is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no {what} file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start}): {what} must be a UTF-8 YAML file") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        where = f" (line {error.problem_mark.line + 1}, column {error.problem_mark.column + 1})" if (
            error.problem_mark) else ""
        raise ConfigError(f"{path} is not valid YAML: {error.problem}{where}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of {what}")
    return raw
