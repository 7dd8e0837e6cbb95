"""The CALVIN adapter against a stand-in with `calvin_env`'s interface: the benchmark's protocol (chains, initial
states, oracle, instructions, policy resets), the observation and action mapping, scoring, and what happens
without the real packages."""

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from calvin_split import write_calvin_split
from calvin_stand_in import IMPOSSIBLE, StandInOracle, StandInPlayTable
from simulator_packages import write_calvin_env_failing_to_import

from robovlms.benchmark import EpisodeRecord, create_benchmark
from robovlms.benchmarks.calvin import (NEUTRAL_ROBOT_OBS, SLIDER_POSITIONS, TABLE_POSITIONS, CalvinBenchmark,
                                        CalvinEnvironment, env_action, find_calvin_conf, initial_env_state)
from robovlms.data.calvin_import import import_calvin
from robovlms.errors import ConfigError, MissingDependencyError, SimulatorDied, SimulatorProcessError
from robovlms.simulators.calvin_play_table import PlayTable

FIRST_CHAINS = Path(__file__).resolve().parents[2] / "shared" / "calvin" / "eval_sequences_first10.json"


class PushRight:
    """Moves 0.25 x 2 cm per step, so a subtask takes 4 steps; remembers what it was told at each reset."""

    def __init__(self):
        self.resets = []

    def reset(self, spec):
        self.resets.append(spec)

    def step(self, observation):
        assert observation.images["rgb_static"].shape == (64, 64, 3)
        assert observation.images["rgb_gripper"].dtype == np.uint8
        return np.array([0.25, 0, 0, 0, 0, 0, 0.3], dtype=np.float32)


def instructions(benchmark):
    return {task: f"please {task.replace('_', ' ')}" for task in benchmark.tasks()}


@pytest.fixture
def benchmark():
    return CalvinBenchmark(image_size=64)


def run_chain(benchmark, spec, policy=None):
    table = StandInPlayTable()
    environment = CalvinEnvironment(PlayTable(table, StandInOracle()), instructions(benchmark), benchmark.cameras, 64)
    policy = policy or PushRight()
    return benchmark.run_episode(environment, spec, policy), table, policy


def chain_with(benchmark, impossible_at=None):
    for spec in benchmark.evaluation_episodes("ABC->D", 1000):
        if (IMPOSSIBLE in spec.subtasks) == (impossible_at is not None) and (
                impossible_at is None or spec.subtasks.index(IMPOSSIBLE) == impossible_at):
            return spec
    raise AssertionError("no such chain")


def test_a_chain_runs_its_subtasks_in_order_from_its_initial_state_resetting_the_policy_each_time(benchmark):
    spec = chain_with(benchmark)
    record, table, policy = run_chain(benchmark, spec)
    assert record.subtasks_completed == 5 and record.success and record.steps == 20
    assert len(table.resets) == 1  # one reset per chain; subtasks follow on from each other
    robot_obs, scene_obs = table.resets[0]
    from robovlms.benchmarks.calvin import evaluation_chains

    expected_robot, expected_scene = initial_env_state(evaluation_chains(spec.seed + 1)[spec.seed][0])
    np.testing.assert_array_equal(robot_obs, expected_robot)
    np.testing.assert_array_equal(scene_obs, expected_scene)
    assert [s.instruction for s in policy.resets] == [f"please {t.replace('_', ' ')}" for t in spec.subtasks]
    assert [s.task for s in policy.resets] == list(spec.subtasks)
    assert all(action[6] == 1.0 for action in table.actions)  # 0.3 > 0: open


def test_a_chain_stops_at_its_first_failed_subtask_after_360_steps(benchmark):
    spec = chain_with(benchmark, impossible_at=2)
    record, table, policy = run_chain(benchmark, spec)
    assert record.subtasks_completed == 2 and not record.success
    assert record.steps == 2 * 4 + 360 and len(policy.resets) == 3
    assert record.extra["subtask_success"] == [True, True, False]


def test_chain_scores_count_chains_completing_at_least_k_subtasks(benchmark):
    records = [EpisodeRecord("chain", "D", "", i, completed == 5, 0, 0.0, subtasks_completed=completed,
                             extra={"subtasks": ["a", "b", "c", "d", "e"],
                                    "subtask_success": [True] * completed + [False] * (completed < 5)})
               for i, completed in enumerate([5, 3, 0, 1, 2])]
    scores = benchmark.score(records)
    assert [scores[f"chain/{k}"] for k in range(1, 6)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.2])
    assert scores["average_length"] == pytest.approx(2.2) and scores["success"] == pytest.approx(0.2)
    assert scores["success/a"] == pytest.approx(0.8) and scores["success/c"] == pytest.approx(2 / 3)


def test_the_evaluation_chains_are_the_benchmarks_first_chains(benchmark):
    if not FIRST_CHAINS.is_file():
        pytest.skip(f"{FIRST_CHAINS} (the benchmark's own first chains) is not beside this checkout")
    published = json.loads(FIRST_CHAINS.read_text())
    specs = benchmark.evaluation_episodes("ABC->D", 10)
    assert [list(spec.subtasks) for spec in specs] == [subtasks for _, subtasks in published]
    assert [spec.seed for spec in specs] == list(range(10)) and {spec.scene for spec in specs} == {"D"}


def test_an_initial_condition_places_blocks_sliders_and_lights_as_the_benchmark_does():
    condition = {"led": 1, "lightbulb": 1, "slider": "left", "drawer": "open", "red_block": "slider_left",
                 "blue_block": "table", "pink_block": "slider_right", "grasped": 0}
    robot_obs, scene_obs = initial_env_state(condition)
    np.testing.assert_array_equal(robot_obs, NEUTRAL_ROBOT_OBS)
    assert scene_obs[:6].tolist() == [0.28, 0.22, 0.0, 0.088, 1, 1]
    assert scene_obs[6:9].tolist() == SLIDER_POSITIONS["slider_left"]
    assert scene_obs[18:21].tolist() == SLIDER_POSITIONS["slider_right"]
    assert scene_obs[12:15].tolist() in TABLE_POSITIONS
    assert all(np.pi / 2 - np.pi / 8 <= scene_obs[i] <= np.pi / 2 + np.pi / 8 for i in (11, 17, 23))
    np.testing.assert_array_equal(initial_env_state(condition)[1], scene_obs)  # the condition's hash seeds it
    closed = initial_env_state({**condition, "slider": "right", "drawer": "closed", "lightbulb": 0, "led": 0})[1]
    assert closed[:6].tolist() == [0.0] * 6


def test_policy_actions_reach_calvin_env_as_relative_actions_with_a_binary_gripper():
    np.testing.assert_array_equal(env_action(np.array([2.0, -3, 0.5, 0, 0, 0.1, -0.2])),
                                  [1.0, -1.0, 0.5, 0, 0, 0.1, -1.0])
    with pytest.raises(ValueError, match="7-D"):
        env_action(np.zeros(4))


@pytest.fixture
def without_calvin(monkeypatch):
    """As on a machine without CALVIN's packages, even where they are installed."""
    for module in ("calvin_env", "calvin_agent"):
        monkeypatch.setitem(sys.modules, module, None)


def test_without_calvin_env_the_error_says_what_to_install(benchmark, without_calvin):
    with pytest.raises(MissingDependencyError, match="git clone --recurse-submodules https://github.com/mees/calvin"):
        benchmark.check_available()
    with pytest.raises(MissingDependencyError, match="calvin_conf"):
        find_calvin_conf(None)


def test_a_calvin_conf_folder_without_the_task_definitions_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="new_playtable_tasks.yaml is missing"):
        find_calvin_conf(str(tmp_path))


def test_a_sweep_on_calvin_without_calvin_env_fails_before_any_training(tmp_path, without_calvin):
    from robovlms.sweep import join_study, load_sweep, open_study, prepare_sweep, storage_url, sweep_cells

    store = import_calvin(write_calvin_split(tmp_path / "split"), tmp_path / "store", image_size=64, progress=False)
    sweep = {"name": "calvin", "run_dir": str(tmp_path / "run"), "store": {"path": str(store.path)},
             "benchmark": {"name": "calvin", "split": "ABC->D"}, "baselines": ["zero"],
             "grid": {"backbone": ["gpt-scratch"], "formulation": ["policy-head"]}, "train": {"max_steps": 2}}
    (tmp_path / "calvin.yaml").write_text(yaml.safe_dump(sweep))
    with pytest.raises(MissingDependencyError, match="mees/calvin"):
        prepare_sweep(tmp_path / "calvin.yaml")
    assert not (tmp_path / "run").exists()  # refused before the study exists
    sweep = load_sweep(tmp_path / "calvin.yaml")  # the study, as made on a machine that has calvin_env
    open_study(sweep, sweep_cells(sweep, "grid"), storage_url(sweep), "grid", create=True)
    with pytest.raises(MissingDependencyError, match="mees/calvin"):  # a worker joining from another machine
        join_study(f"sqlite:///{tmp_path / 'run' / 'optuna.db'}", "calvin")


def test_calvin_is_a_registered_benchmark():
    assert isinstance(create_benchmark("calvin", image_size=64), CalvinBenchmark)


@pytest.mark.slow
def test_a_policy_trained_on_an_imported_calvin_split_runs_a_chain(tmp_path, benchmark):
    from robovlms.policy import load_policy
    from robovlms.training import train

    store = import_calvin(write_calvin_split(tmp_path / "split"), tmp_path / "store", image_size=64, progress=False)
    run_dir = train({"store": str(store.path), "run_dir": str(tmp_path / "run"), "history": 2, "chunk": 2,
                     "formulation": {"name": "policy-head"}, "backbone": {"name": "gpt-scratch"},
                     "batch_size": 4, "max_steps": 2, "checkpoint_every": 2, "log_every": 1}, progress=False)
    record, table, _ = run_chain(benchmark, benchmark.evaluation_episodes("ABC->D", 1)[0], load_policy(run_dir))
    assert 0 <= record.subtasks_completed <= 5 and table.actions
    assert all(len(action) == 7 and action[6] in (-1, 1) and np.abs(action[:6]).max() <= 1 for action in table.actions)


# ---- closing, renderer, gripper, a simulator in its own environment ---------------------------------------------

@pytest.fixture
def stand_in_calvin(tmp_path, monkeypatch, benchmark):
    """CalvinBenchmark.make_environment builds play tables over the stand-in (all kept, in order)."""
    from robovlms.benchmarks import calvin
    from robovlms.simulators import calvin_play_table

    conf = tmp_path / "conf"
    (conf / "annotations").mkdir(parents=True)
    (conf / "annotations" / "new_playtable_validation.yaml").write_text(
        yaml.safe_dump({task: [text] for task, text in instructions(benchmark).items()}))
    tables = []

    def open_play_table(cameras, dataset, use_egl, calvin_conf):
        tables.append(StandInPlayTable())
        return PlayTable(tables[-1], StandInOracle())

    monkeypatch.setattr(calvin.CalvinBenchmark, "check_available", lambda self: None)
    monkeypatch.setattr(calvin_play_table, "find_calvin_conf", lambda calvin_conf: str(conf))
    monkeypatch.setattr(calvin_play_table, "open_play_table", open_play_table)
    return tables


def test_closing_an_environment_twice_closes_its_play_table_once(benchmark, stand_in_calvin):
    environment = benchmark.make_environment()
    environment.close()
    environment.close()
    assert not stand_in_calvin[0].connected


def test_a_closed_play_table_leaves_calvin_envs_destructor_no_client_to_disconnect():
    class PlayTableSimEnv(StandInPlayTable):
        cid = 0  # calvin_env's __del__ closes again while cid >= 0

    env = PlayTableSimEnv()
    PlayTable(env, StandInOracle()).close()
    assert env.cid == -1 and not env.connected


def test_two_evaluations_in_one_process_each_build_and_close_their_own_play_table(benchmark, stand_in_calvin):
    from robovlms.rollout import evaluate

    specs = [chain_with(benchmark)]
    for _ in range(2):
        records = evaluate(benchmark, PushRight, specs, progress=False)
        assert records[0].subtasks_completed == 5
    assert len(stand_in_calvin) == 2 and not any(table.connected for table in stand_in_calvin)


@pytest.mark.slow
def test_a_sweep_of_two_calvin_cells_runs_end_to_end_in_one_process(tmp_path, stand_in_calvin):
    from robovlms.sweep import run_sweep

    from robovlms.benchmarks.calvin_sequences import SUBTASKS

    windows = [(4 * i, 4 * i + 3, task, f"do {task.replace('_', ' ')}") for i, task in enumerate(sorted(SUBTASKS))]
    split = write_calvin_split(tmp_path / "split", windows=windows, frames=4 * len(windows))  # every task: the
    store = import_calvin(split, tmp_path / "store", image_size=64, progress=False)  # chains draw from all of them
    sweep = {"name": "calvin-two-cells", "run_dir": str(tmp_path / "run"), "store": {"path": str(store.path)},
             "benchmark": {"name": "calvin", "split": "ABC->D"}, "baselines": ["zero"],
             "grid": {"backbone": ["gpt-scratch"], "formulation": ["policy-head", "interleaved"]},
             "train": {"max_steps": 2, "batch_size": 4, "history": 2, "chunk": 2},
             "evaluation": {"episodes_per_task": 1, "latency_steps": 1}}
    (tmp_path / "calvin.yaml").write_text(yaml.safe_dump(sweep))
    status = run_sweep(tmp_path / "calvin.yaml")
    assert (status.cells, status.done, status.failed) == (3, 3, 0)
    assert len(stand_in_calvin) == 3 and not any(table.connected for table in stand_in_calvin)


def test_the_renderer_is_the_configurations_unless_asked_or_egl_is_missing():
    from robovlms.simulators.calvin_play_table import renders_with_egl

    assert renders_with_egl(configured=True, requested=None, egl_installed=True)  # calvin_env's default: EGL
    assert not renders_with_egl(configured=False, requested=None, egl_installed=True)  # a dataset rendered without
    assert not renders_with_egl(configured=True, requested=False, egl_installed=True)
    with pytest.warns(UserWarning, match="tiny renderer"):
        assert not renders_with_egl(configured=True, requested=None, egl_installed=False)


def test_the_benchmark_leaves_the_renderer_to_the_configuration_by_default(benchmark):
    assert benchmark.use_egl is None and benchmark.options()["use_egl"] is None


def test_a_zero_gripper_command_keeps_the_grippers_current_command():
    zero = np.zeros(7)
    assert env_action(zero, gripper_now=1.0)[6] == 1.0
    assert env_action(zero, gripper_now=-1.0)[6] == -1.0
    assert env_action(np.array([0, 0, 0, 0, 0, 0, 1e-6]), gripper_now=-1.0)[6] == 1.0


def test_the_zero_action_leaves_the_gripper_open_through_a_chain(benchmark):
    class Zero(PushRight):
        def step(self, observation):
            return np.zeros(7, dtype=np.float32)

    _, table, _ = run_chain(benchmark, chain_with(benchmark), Zero())
    assert len(table.actions) == 360 and all(action[6] == 1.0 for action in table.actions)


def test_a_chain_runs_the_same_with_the_play_table_in_another_interpreter(benchmark):
    from robovlms.benchmarks.remote import SIMULATORS_DIR, SimulatorProcess

    stand_in = Path(__file__).with_name("calvin_stand_in.py")
    process = SimulatorProcess(sys.executable)
    table = process.call(SIMULATORS_DIR / "calvin_play_table.py", "PlayTable",
                         process.call(stand_in, "StandInPlayTable"), process.call(stand_in, "StandInOracle"))
    environment = CalvinEnvironment(table, instructions(benchmark), benchmark.cameras, 64, process)
    spec = chain_with(benchmark, impossible_at=2)
    remote = benchmark.run_episode(environment, spec, PushRight())
    environment.close()
    local, _, _ = run_chain(benchmark, spec)
    assert (remote.subtasks_completed, remote.steps, remote.extra) == (local.subtasks_completed, local.steps,
                                                                        local.extra)
    assert process.server_info["pid"] != os.getpid()
    with pytest.raises(SimulatorProcessError, match="closed"):
        table.reset(NEUTRAL_ROBOT_OBS, np.zeros(24))


def remote_stand_in_environment(benchmark):
    """A CalvinEnvironment over the stand-in play table in a simulator process of this interpreter."""
    from robovlms.benchmarks.remote import SIMULATORS_DIR, SimulatorProcess

    stand_in = Path(__file__).with_name("calvin_stand_in.py")
    process = SimulatorProcess(sys.executable)
    table = process.call(SIMULATORS_DIR / "calvin_play_table.py", "PlayTable",
                         process.call(stand_in, "StandInPlayTable"), process.call(stand_in, "StandInOracle"))
    return CalvinEnvironment(table, instructions(benchmark), benchmark.cameras, 64, process)


def test_a_simulator_killed_mid_chain_fails_the_evaluation_with_its_death_not_with_the_close_after_it(
        benchmark, monkeypatch):
    from robovlms.rollout import evaluate

    environment = remote_stand_in_environment(benchmark)
    monkeypatch.setattr(benchmark, "make_environment", lambda: environment)

    class KilledAtItsThirdStep(PushRight):
        steps = 0

        def step(self, observation):
            self.steps += 1
            if self.steps == 3:  # the out-of-memory killer strikes while the policy thinks
                os.kill(environment.process.pid, signal.SIGKILL)
            return super().step(observation)

    with pytest.raises(SimulatorDied, match=r"killed by SIGKILL .* during step\(\); it printed nothing") as error:
        evaluate(benchmark, KilledAtItsThirdStep, [chain_with(benchmark)], progress=False)
    assert "close()" not in str(error.value)
    assert environment.process.log_path.exists()
    environment.process.log_path.unlink()


def test_calvin_env_that_fails_to_import_is_named_with_what_it_could_not_import(tmp_path, monkeypatch):
    write_calvin_env_failing_to_import(tmp_path, missing="rich_missing_in_this_environment")
    monkeypatch.syspath_prepend(str(tmp_path))
    benchmark = CalvinBenchmark(image_size=64, calvin_conf=str(tmp_path / "conf"))
    monkeypatch.setattr("robovlms.simulators.calvin_play_table.find_calvin_conf", lambda calvin_conf: calvin_conf)
    with pytest.raises(MissingDependencyError, match="calvin_env fails to import in .*: No module named "
                                                     "'rich_missing_in_this_environment'") as error:
        benchmark.make_environment()
    assert "git -C calvin/calvin_env checkout 797142c" in str(error.value)
    assert "task definitions" not in str(error.value)


def test_a_python_option_names_the_interpreter_that_runs_calvin(monkeypatch):
    monkeypatch.setenv("ROBOVLMS_CALVIN_PYTHON", "/opt/calvin/bin/python")
    assert CalvinBenchmark().python == "/opt/calvin/bin/python"
    assert CalvinBenchmark(python="/elsewhere/python").python == "/elsewhere/python"
    # where it runs is not what it is: stores and evaluation shards stay comparable across machines
    assert "python" not in CalvinBenchmark(python="/elsewhere/python").options()


def test_an_interpreter_without_calvin_env_says_what_to_install_there(monkeypatch):
    benchmark = CalvinBenchmark(python=sys.executable, calvin_conf="/conf")
    with pytest.raises(MissingDependencyError, match=f"{sys.executable} .* cannot import calvin_env, hydra"):
        benchmark.check_available()


def test_a_sweep_on_a_store_missing_calvin_tasks_is_refused_saying_calvin_evaluates_on_all(tmp_path, stand_in_calvin):
    from robovlms.sweep import prepare_sweep

    store = import_calvin(write_calvin_split(tmp_path / "split"), tmp_path / "store", image_size=64, progress=False)
    sweep = {"name": "calvin-few-tasks", "run_dir": str(tmp_path / "run"), "store": {"path": str(store.path)},
             "benchmark": {"name": "calvin", "split": "ABC->D"}, "baselines": ["zero"]}
    (tmp_path / "calvin.yaml").write_text(yaml.safe_dump(sweep))
    with pytest.raises(ConfigError, match="calvin evaluates on all of its tasks, so train on a store that holds them"):
        prepare_sweep(tmp_path / "calvin.yaml")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("split", ["D->D", "ABCD->D"])
def test_splits_that_train_on_scene_d_are_validated_on_chains_no_test_uses(benchmark, split):
    from robovlms.benchmarks.calvin import VALIDATION_SEED_OFFSET, evaluation_chains, validation_chains
    from robovlms.benchmarks.calvin_sequences import is_valid_chain

    validation = benchmark.validation_episodes(split, 1000)
    test = {(json.dumps(condition, sort_keys=True), chain) for condition, chain in evaluation_chains(1000)}
    chains = validation_chains()
    assert len(validation) == len(chains) == 1000 and {spec.scene for spec in validation} == {"D"}
    assert [spec.seed for spec in validation] == list(range(VALIDATION_SEED_OFFSET, VALIDATION_SEED_OFFSET + 1000))
    assert not {(json.dumps(condition, sort_keys=True), chain) for condition, chain in chains} & test
    assert all(is_valid_chain(condition, chain) for condition, chain in chains)
    record, table, _ = run_chain(benchmark, next(spec for spec in validation if IMPOSSIBLE not in spec.subtasks))
    condition = chains[record.seed - VALIDATION_SEED_OFFSET][0]
    assert record.success and np.allclose(table.resets[0][1], initial_env_state(condition)[1])


def test_abc_d_has_no_validation_chains_and_says_why(benchmark):
    with pytest.raises(ConfigError, match="ABC->D has no validation episodes: its held-out scene D is the test scene"):
        benchmark.split_episodes("ABC->D", "validation", 10)
