"""The YAML files users write (sweep files, training configs, import specs): every way one can be wrong is a
one-line ConfigError."""

import pytest

from robovlms.errors import ConfigError
from robovlms.yaml_files import read_yaml_mapping


def test_a_key_given_twice_is_refused_and_named(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("name: a\ntrain:\n  max_steps: 10\n  max_steps: 20\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'max_steps' \(line 4"):
        read_yaml_mapping(path, "sweep settings")


def test_a_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        read_yaml_mapping(path, "sweep settings")
