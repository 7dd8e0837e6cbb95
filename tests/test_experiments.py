"""Every file shipped in experiments/ is valid as it stands (a sweep file, or a training config for `robovlms
train`): a user's first run of one must not fail on its own configuration."""

from pathlib import Path

import pytest
import yaml

from robovlms.benchmark import create_benchmark
from robovlms.sweep import expand_cells, load_sweep
from robovlms.training import load_config

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))
SWEEPS = [path for path in EXPERIMENTS if "grid" in yaml.safe_load(path.read_text())]


@pytest.mark.parametrize("path", SWEEPS, ids=[path.name for path in SWEEPS])
def test_a_shipped_sweep_file_validates_and_names_a_split_of_its_benchmark(path):
    sweep = load_sweep(path)
    assert expand_cells(sweep)
    benchmark = create_benchmark(sweep.benchmark.name, **sweep.benchmark.options)
    assert sweep.benchmark.split in benchmark.splits()


@pytest.mark.parametrize("path", sorted(set(EXPERIMENTS) - set(SWEEPS)), ids=lambda path: path.name)
def test_a_shipped_training_config_validates(path):
    assert load_config(path).max_steps > 0


def test_the_simpler_sweeps_cover_both_robots():
    robots = {load_sweep(path).benchmark.options["robot"] for path in SWEEPS if path.name.startswith("simpler_")}
    assert robots == {"widowx", "google_robot"}
