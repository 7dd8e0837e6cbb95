"""SimplerEnv end to end, with a LeRobot dataset written by the test and a stand-in for simpler_env: the `simpler`
benchmark is registered, a policy trained on imported Open-X-style data drives a SimplerEnv episode, and sweeps fail
before any training where simpler_env is missing or a baseline cannot be backed by the data."""

import sys

import pytest
import yaml
from lerobot_dataset import write_lerobot_dataset
from simpler_stand_in import StandInSimulator, get_image_from_maniskill2_obs_dict

from robovlms.benchmark import create_benchmark
from robovlms.benchmarks.simpler import SimplerBenchmark, SimplerEnvironment
from robovlms.errors import ConfigError, MissingDependencyError
from robovlms.data.lerobot_import import import_lerobot
from robovlms.simulators.simpler_scene import SimplerScene


@pytest.fixture
def bridge_store(tmp_path):
    dataset = write_lerobot_dataset(tmp_path / "bridge_orig_lerobot")
    return import_lerobot(dataset, tmp_path / "store", spec="bridge", image_size=64, progress=False)


@pytest.fixture
def without_simpler_env(monkeypatch):
    """As on a machine without SimplerEnv's packages, even where they are installed."""
    for module in ("simpler_env", "mani_skill2_real2sim"):
        monkeypatch.setitem(sys.modules, module, None)


def write_sweep(tmp_path, store, baselines):
    sweep = {"name": "bridge", "run_dir": str(tmp_path / "run"), "store": {"path": str(store.path)},
             "benchmark": {"name": "simpler", "split": "visual_matching"}, "baselines": baselines,
             "grid": {"backbone": ["gpt-scratch"], "formulation": ["policy-head"]}, "train": {"max_steps": 2}}
    (tmp_path / "bridge.yaml").write_text(yaml.safe_dump(sweep))
    return tmp_path / "bridge.yaml"


def test_simpler_is_a_registered_benchmark():
    benchmark = create_benchmark("simpler", robot="google_robot", image_size=64)
    assert isinstance(benchmark, SimplerBenchmark) and "google_robot_pick_coke_can" in benchmark.tasks()


def test_a_bridge_import_records_the_widowx_benchmark_its_policies_are_evaluated_on(bridge_store):
    assert bridge_store.metadata["benchmark"] == "simpler"
    assert bridge_store.metadata["benchmark_options"]["robot"] == "widowx"
    assert bridge_store.tasks() == ["bridge_orig_lerobot"]  # every instruction differs: one task, the dataset
    benchmark = create_benchmark("simpler", **bridge_store.metadata["benchmark_options"])
    assert (benchmark.cameras, benchmark.image_size) == (bridge_store.layout.cameras, bridge_store.layout.image_size)
    assert benchmark.state_dim == bridge_store.layout.state_dim and benchmark.action_dim == bridge_store.layout.action_dim


@pytest.mark.slow
def test_a_policy_trained_on_an_imported_lerobot_dataset_drives_a_widowx_episode(tmp_path, bridge_store):
    from robovlms.policy import load_policy
    from robovlms.training import train

    run_dir = train({"store": str(bridge_store.path), "run_dir": str(tmp_path / "run"), "history": 2, "chunk": 2,
                     "formulation": {"name": "policy-head"}, "backbone": {"name": "gpt-scratch"},
                     "validation_fraction": 0, "batch_size": 2, "max_steps": 2, "checkpoint_every": 2,
                     "log_every": 1}, progress=False)
    benchmark = create_benchmark("simpler", **bridge_store.metadata["benchmark_options"])
    spec = benchmark.evaluation_episodes("visual_matching", 1)[0]
    simulator = StandInSimulator(tmp_path / "assets")
    scene = SimplerScene(simulator.build, get_image_from_maniskill2_obs_dict, str(tmp_path / "assets"))
    environment = SimplerEnvironment("widowx", benchmark.image_size, scene, tmp_path / "assets")
    record = benchmark.run_episode(environment, spec, load_policy(run_dir))
    env = simulator.built[-1]
    assert record.steps == env.max_episode_steps == 60 and len(env.actions) == 60  # WidowX tasks run 60 steps
    assert all(action.shape == (7,) and action[6] in (-1.0, 1.0) for action in env.actions)  # binarised gripper


def test_a_sweep_on_simpler_without_simpler_env_fails_before_any_training(tmp_path, bridge_store,
                                                                           without_simpler_env):
    from robovlms.sweep import join_study, load_sweep, open_study, prepare_sweep, storage_url, sweep_cells

    sweep = write_sweep(tmp_path, bridge_store, ["zero"])
    with pytest.raises(MissingDependencyError, match="simpler-env/SimplerEnv"):
        prepare_sweep(sweep)
    assert not (tmp_path / "run").exists()  # refused before the study exists
    loaded = load_sweep(sweep)  # the study, as made on a machine that has SimplerEnv
    open_study(loaded, sweep_cells(loaded, "grid"), storage_url(loaded), "grid", create=True)
    with pytest.raises(MissingDependencyError, match="simpler-env/SimplerEnv"):  # a worker joining from elsewhere
        join_study(f"sqlite:///{tmp_path / 'run' / 'optuna.db'}", "bridge")


def test_a_sweep_asking_for_the_mean_baseline_on_open_x_data_is_refused_before_any_training(tmp_path, bridge_store,
                                                                                          monkeypatch):
    from robovlms.sweep import prepare_sweep

    monkeypatch.setattr(SimplerBenchmark, "check_available", lambda self: None)  # as where simpler_env is installed
    with pytest.raises(ConfigError, match="the mean baseline acts from demonstrations of each evaluated task"):
        prepare_sweep(write_sweep(tmp_path, bridge_store, ["zero", "mean"]))
    assert not (tmp_path / "run" / "cells").exists()


def test_a_spec_whose_actions_do_not_fit_simpler_is_refused_before_anything_is_written(tmp_path):
    dataset = write_lerobot_dataset(tmp_path / "dataset")
    spec = {"cameras": {"rgb_static": "observation.images.image_0"}, "state": {"key": "observation.state"},
            "action": {"key": "action", "indices": [0, 1, 2, 6]}, "gripper": {"open_above": 0.5},
            "benchmark": "simpler", "benchmark_options": {"robot": "widowx"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="simpler takes 7-D actions .* holds 4-D actions"):
        import_lerobot(dataset, tmp_path / "store", spec=tmp_path / "spec.yaml", image_size=64, progress=False)
    assert not (tmp_path / "store").exists() and not (tmp_path / "store.partial").exists()


def test_an_option_the_benchmark_does_not_take_is_refused_naming_the_ones_it_does():
    with pytest.raises(ConfigError, match="unexpected keyword argument 'protocol'.*robot, tasks, image_size, cameras"):
        create_benchmark("simpler", robot="widowx", protocol="visual_matching")


def test_evaluate_on_simpler_checks_the_protocol_then_says_what_to_install(without_simpler_env):
    from typer.testing import CliRunner

    from robovlms.cli import app
    from robovlms.errors import UnknownNameError

    runner = CliRunner()
    wrong = runner.invoke(app, ["evaluate", "--benchmark", "simpler", "--policy", "zero", "--benchmark-split",
                                "ABC->D"])
    assert isinstance(wrong.exception, UnknownNameError) and "visual_matching" in str(wrong.exception)
    missing = runner.invoke(app, ["evaluate", "--benchmark", "simpler", "--policy", "zero"])  # its first protocol
    assert isinstance(missing.exception, MissingDependencyError)


def test_a_store_imported_for_no_benchmark_is_evaluated_on_the_one_named(tmp_path, without_simpler_env):
    from typer.testing import CliRunner

    from robovlms.cli import app

    dataset = write_lerobot_dataset(tmp_path / "dataset")
    spec = {"cameras": {"rgb_static": "observation.images.image_0"}, "state": {"key": "observation.state"},
            "action": {"key": "action"}, "gripper": {"open_above": 0.5}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    store = import_lerobot(dataset, tmp_path / "store", spec=tmp_path / "spec.yaml", image_size=64, progress=False)
    assert "benchmark" not in store.metadata
    result = CliRunner().invoke(app, ["evaluate", "--store", str(store.path), "--benchmark", "simpler",
                                      "--policy", "zero"])
    assert isinstance(result.exception, MissingDependencyError)  # reached the simulator check, not a KeyError
