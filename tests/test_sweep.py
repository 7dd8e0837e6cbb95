"""Sweeps: grids expanded into cells, each cell a trial of an Optuna study, resumable, shared by workers."""

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from robovlms.errors import ConfigError, RobovlmsError, UnknownNameError
from robovlms.results import read_cell_results
from robovlms.sweep import expand_cells, load_sweep, open_storage, prepare_sweep, run_sweep, storage_url

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


def sweep_file(tmp_path, episode_store, name="grid", **overrides):
    """A 2x2 grid (backbones x formulations) of tiny models trained a few steps, and the zero baseline."""
    sweep = {
        "name": name,
        "run_dir": str(tmp_path / "run"),
        "benchmark": {"name": "metaworld", "split": "ABC->D",
                      "options": {"tasks": ["button-press-topdown"], "max_steps": 15}},
        "store": {"path": str(episode_store.path)},
        "train": {"max_steps": 3, "batch_size": 4, "chunk": 2, "checkpoint_every": 2, "log_every": 1,
                  "cameras": ["rgb_static"], "execution": "chunk",
                  "backbone": {"options": {"hidden_size": 32, "layers": 1}}},
        "grid": {"backbone": ["gpt-scratch", "kosmos2"], "formulation": ["one-step-continuous", "policy-head"]},
        "baselines": ["zero"],
        "evaluation": {"episodes_per_task": 1, "latency_steps": 2},
    }
    for key, value in overrides.items():
        sweep[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def complete_trials_per_cell(study):
    counts = {}
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        counts[trial.user_attrs["cell"]] = counts.get(trial.user_attrs["cell"], 0) + 1
    return counts


def make_stale(study, trial_number):
    """As if the trial's dead worker had stopped beating a day ago (rather than waiting for its heartbeat to
    lapse): the next worker to look fails and re-enqueues it."""
    from optuna.storages._rdb.models import TrialHeartbeatModel

    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, trial_number)
    heartbeats = TrialHeartbeatModel.__table__
    a_day_ago = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(days=1)
    with study._storage._backend.engine.begin() as connection:
        connection.execute(heartbeats.update().where(heartbeats.c.trial_id == trial_id).values(heartbeat=a_day_ago))


def fail_as_stale(study, trial_number):
    """What another worker does to a trial whose heartbeat lapsed: fail it and enqueue its cell again."""
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, trial_number)
    study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
    study._storage.get_heartbeat_stale_trial_callback()(study, study._storage.get_trial(trial_id))


def study_of(path, storage=None):
    sweep = load_sweep(path)
    return optuna.load_study(study_name=sweep.name, storage=storage_url(sweep, storage))


@pytest.fixture
def small_grid(tmp_path, demo_store):
    return sweep_file(tmp_path, demo_store, grid={"backbone": ["gpt-scratch"],
                                                 "formulation": ["one-step-continuous", "policy-head"]})


@pytest.mark.slow
def test_a_2x2_grid_runs_to_completion_and_records_every_cell(tmp_path, demo_store):
    path = sweep_file(tmp_path, demo_store)
    status = run_sweep(path)
    assert (status.cells, status.done, status.failed) == (5, 5, 0)
    results = {result.cell_id: result for result in read_cell_results(tmp_path / "run")}
    trained = [r for r in results.values() if r.kind == "trained"]
    assert {(r.backbone, r.formulation) for r in trained} == {
        (b, f) for b in ("gpt-scratch", "kosmos2") for f in ("one-step-continuous", "policy-head")}
    for result in trained:
        assert result.random_init and "random init" in result.backbone_label
        assert result.parameters > 0 and result.train_seconds > 0 and result.step_latency_ms > 0
        assert Path(result.checkpoint).is_file() and result.config["max_steps"] == 3
        assert result.episodes == 1 and result.final_train_loss is not None
    cells = pd.read_parquet(tmp_path / "run" / "results" / "cells.parquet")
    episodes = pd.read_parquet(tmp_path / "run" / "results" / "episodes.parquet")
    assert sorted(cells.cell_id) == sorted(results) and len(episodes) == 5
    assert (tmp_path / "run" / "results" / "cells.csv").is_file()
    assert complete_trials_per_cell(study_of(path)) == {cell: 1 for cell in results}


@pytest.mark.slow
def test_a_sweep_of_one_cell_completes_and_gathers_its_result(tmp_path, demo_store):
    path = sweep_file(tmp_path, demo_store, name="one", grid={}, baselines=["zero"])
    status = run_sweep(path)
    assert (status.cells, status.done, status.failed) == (1, 1, 0)
    assert list(pd.read_parquet(tmp_path / "run" / "results" / "cells.parquet").cell_id) == ["baseline-zero"]


@pytest.mark.slow
def test_a_worker_taken_for_dead_drops_its_result_and_goes_on(tmp_path, demo_store, monkeypatch, caplog):
    import robovlms.sweep.worker

    path = sweep_file(tmp_path, demo_store, name="reaped", grid={}, baselines=["zero"])
    run_cell = robovlms.sweep.worker.run_cell

    def taken_for_dead_in_its_first_attempt(sweep, cell, run_dir, **kwargs):
        if kwargs["trial_number"] == 0:
            other_worker = optuna.load_study(study_name="reaped", storage=open_storage(storage_url(sweep), 30))
            fail_as_stale(other_worker, 0)
        return run_cell(sweep, cell, run_dir, **kwargs)

    monkeypatch.setattr(robovlms.sweep.worker, "run_cell", taken_for_dead_in_its_first_attempt)
    with caplog.at_level("WARNING", logger="robovlms.sweep.worker"):
        status = run_sweep(path)
    assert (status.done, status.failed) == (1, 0)
    assert [t.state for t in study_of(path).get_trials()] == [TrialState.FAIL, TrialState.COMPLETE]
    assert [r.trial for r in read_cell_results(tmp_path / "run")] == [1]  # the re-run's result, not the dropped one
    assert "trial 0 of cell baseline-zero was taken for dead" in caplog.text


@pytest.mark.slow
def test_re_running_a_finished_sweep_records_nothing_twice(small_grid, tmp_path):
    run_sweep(small_grid)
    before = {r.cell_id: r.trial for r in read_cell_results(tmp_path / "run")}
    status = run_sweep(small_grid)
    assert status.done == 3 and {r.cell_id: r.trial for r in read_cell_results(tmp_path / "run")} == before
    assert len(study_of(small_grid).get_trials()) == 3


@pytest.mark.slow
def test_a_sweep_killed_mid_cell_and_re_run_records_every_cell_exactly_once(tmp_path, demo_store):
    path = sweep_file(tmp_path, demo_store, name="killed",
                      grid={"backbone": ["gpt-scratch"], "formulation": ["one-step-continuous", "policy-head"]},
                      train={"max_steps": 400, "batch_size": 4, "chunk": 2, "checkpoint_every": 5, "log_every": 5,
                             "cameras": ["rgb_static"], "execution": "chunk",
                             "backbone": {"options": {"hidden_size": 32, "layers": 1}}})
    sweep = subprocess.Popen([sys.executable, "-m", "robovlms.cli", "sweep", str(path)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = tmp_path / "run" / "cells"
    deadline = time.monotonic() + 1200
    while not list(checkpoints.glob("*/train/checkpoints/last.ckpt")):
        assert time.monotonic() < deadline and sweep.poll() is None, "the sweep never wrote a checkpoint"
        time.sleep(0.2)
    os.killpg(sweep.pid, signal.SIGKILL)
    sweep.wait()
    killed = next(checkpoints.glob("*/train/checkpoints/last.ckpt")).parents[2].name
    make_stale(study_of(path), study_of(path).get_trials(states=(TrialState.RUNNING,))[0].number)

    assert killed not in {r.cell_id for r in read_cell_results(tmp_path / "run")}
    status = run_sweep(path)
    assert (status.done, status.failed) == (3, 0)
    assert complete_trials_per_cell(study_of(path)) == {cell.cell_id: 1 for cell in expand_cells(load_sweep(path))}
    failed = study_of(path).get_trials(states=(TrialState.FAIL,))
    assert [t.user_attrs["cell"] for t in failed] == [killed]  # the killed attempt, marked failed by its heartbeat
    logs = pd.concat(pd.read_csv(f) for f in (checkpoints / killed / "train" / "logs").glob("version_*/metrics.csv"))
    assert logs["step"].min() < logs["step"].max() and len(list((checkpoints / killed / "train" / "logs").glob(
        "version_*"))) == 2  # a second Lightning run resumed the first


def run_two_workers(path, storage=None):
    sweep, cells, study, url = prepare_sweep(path, storage)
    workers = [subprocess.Popen([sys.executable, "-m", "robovlms.cli", "worker", "--storage", url,
                                 "--study", sweep.name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for _ in range(2)]
    for worker in workers:
        output, _ = worker.communicate(timeout=1800)
        assert worker.returncode == 0, output.decode()[-3000:]
    return cells, study


def assert_split_without_duplicates(cells, study, run_dir):
    assert complete_trials_per_cell(study) == {cell.cell_id: 1 for cell in cells}
    results = read_cell_results(run_dir)
    assert sorted(r.cell_id for r in results) == sorted(c.cell_id for c in cells)
    assert len({r.trial for r in results}) == len(results)


@pytest.mark.slow
def test_two_workers_sharing_one_sqlite_storage_split_the_cells_with_no_duplicate(small_grid, tmp_path):
    cells, study = run_two_workers(small_grid)
    assert_split_without_duplicates(cells, study, tmp_path / "run")


POP_WAITING_TRIALS = """
import json, sys, optuna
from robovlms.sweep import open_storage
from robovlms.sweep.study import pop_waiting_trial
study = optuna.load_study(study_name="queue", storage=open_storage(sys.argv[1]))
popped = []
while (trial := pop_waiting_trial(study)) is not None:
    popped.append(trial[0])  # its id
print(json.dumps(popped))
"""


def assert_workers_pop_each_waiting_trial_once(url):
    """The worker queue's atomicity, which a whole sweep exercises only by chance: many processes race to pop
    the same waiting trials."""
    from robovlms.sweep import open_storage

    study = optuna.create_study(study_name="queue", storage=open_storage(url))
    for number in range(120):
        study.enqueue_trial({"cell": str(number)})
    workers = [subprocess.Popen([sys.executable, "-c", POP_WAITING_TRIALS, url], stdout=subprocess.PIPE)
               for _ in range(4)]
    popped = [trial for worker in workers for trial in json.loads(worker.communicate(timeout=1200)[0])]
    assert sorted(popped) == sorted(t._trial_id for t in study.get_trials())


def test_workers_sharing_a_sqlite_storage_never_pop_the_same_waiting_cell(tmp_path):
    assert_workers_pop_each_waiting_trial_once(f"sqlite:///{tmp_path / 'optuna.db'}")


@pytest.fixture
def postgres():
    """A PostgreSQL server of our own on a free loopback port, in a temporary directory the server's user can
    reach (pytest's own temporary directories are private to root)."""
    if not (POSTGRES_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL server binaries are not installed in {POSTGRES_BIN} (Debian package postgresql)")
    import socket
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="robovlms-postgres-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(directory, "postgres")
    subprocess.run([*as_postgres, POSTGRES_BIN / "initdb", "-D", directory / "data", "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    control = [*as_postgres, POSTGRES_BIN / "pg_ctl", "-D", directory / "data"]
    subprocess.run([*control, "-o", f"-p {port} -k {directory} -c listen_addresses=127.0.0.1",
                    "-l", directory / "log", "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*control, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_sharing_a_postgresql_storage_split_the_cells_with_no_duplicate(small_grid, tmp_path, postgres):
    cells, study = run_two_workers(small_grid, postgres)
    assert_split_without_duplicates(cells, study, tmp_path / "run")
    assert not (tmp_path / "run" / "optuna.db").exists()


def test_workers_sharing_a_postgresql_storage_never_pop_the_same_waiting_cell(postgres):
    assert_workers_pop_each_waiting_trial_once(postgres)


@pytest.mark.slow
def test_a_search_of_a_few_trials_records_its_best_trial(tmp_path, demo_store):
    path = sweep_file(tmp_path, demo_store, name="search",
                      train={"max_steps": 4, "batch_size": 4, "chunk": 2, "log_every": 1, "cameras": ["rgb_static"],
                             "execution": "chunk", "validation_fraction": 0.3, "validate_every": 2,
                             "validation_batches": 1, "formulation": {"name": "one-step-continuous"},
                             "backbone": {"options": {"hidden_size": 32, "layers": 1}}},
                      search={"trials": 3, "objective": "val_loss",
                              "space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}})
    status = run_sweep(path, mode="search")
    study = optuna.load_study(study_name="search-search", storage=storage_url(load_sweep(path)))
    finished = [t for t in study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and status.failed == 0
    best = json.loads((tmp_path / "run" / "results" / "best.json").read_text())
    assert best["trial"] == study.best_trial.number and best["value"] == study.best_value
    assert best["direction"] == "minimize" and 1e-4 <= best["params"]["learning_rate"] <= 1e-2
    assert (status.unit, status.cells, status.done + status.pruned) == ("trials", 3, 3)


@pytest.mark.slow
def test_a_search_report_has_a_row_per_trial_and_lists_the_trials(tmp_path, demo_store):
    from robovlms.report import write_report

    path = learning_rate_search(tmp_path, demo_store, trials=2)
    run_sweep(path, mode="search")
    write_report([tmp_path / "run"], tmp_path / "report")
    success = pd.read_csv(tmp_path / "report" / "success.csv")
    trials = pd.read_csv(tmp_path / "report" / "trials.csv")
    assert sorted(success.learning_rate) == sorted(trials.params_learning_rate)
    assert success.seeds.tolist() == [1, 1] and trials.state.tolist() == ["COMPLETE", "COMPLETE"]


def learning_rate_search(tmp_path, store, trials):
    return sweep_file(tmp_path, store, name="search", grid={}, baselines=[],
                      search={"trials": trials, "prune": False,
                              "space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}})


class Stopped(Exception):
    """Stands for a search killed between two trials."""


def run_trials(study, sweep, run_dir, count):
    """`count` trials of a search by one worker (its own study object and sampler), then stop it."""
    from robovlms.sweep import work

    finished = len(study.get_trials(states=(TrialState.COMPLETE,)))

    def stop_after_count() -> None:
        if len(study.get_trials(states=(TrialState.COMPLETE,))) >= finished + count:
            raise Stopped

    with pytest.raises(Stopped):
        work(study, sweep, [], run_dir, "search", on_change=stop_after_count)


def assert_every_trial_drew_new_parameters_and_kept_its_cell(study, run_dir, trials):
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == trials
    assert len({trial.params["learning_rate"] for trial in complete}) == trials
    results = read_cell_results(run_dir)
    assert sorted(result.trial for result in results) == [trial.number for trial in complete]
    assert {result.cell_id: result.trial for result in results} == {trial.user_attrs["cell"]: trial.number
                                                                     for trial in complete}


@pytest.mark.slow
def test_a_search_killed_and_resumed_draws_new_parameters_and_overwrites_no_cell(tmp_path, demo_store):
    path = learning_rate_search(tmp_path, demo_store, trials=4)
    sweep, cells, study, _ = prepare_sweep(path, mode="search")
    run_trials(study, sweep, tmp_path / "run", 2)
    run_sweep(path, mode="search")  # the re-run: a new study object, a new sampler
    assert_every_trial_drew_new_parameters_and_kept_its_cell(study, tmp_path / "run", 4)


@pytest.mark.slow
def test_two_workers_of_a_search_draw_different_parameters_and_train_different_cells(tmp_path, demo_store):
    from robovlms.sweep import join_study

    path = learning_rate_search(tmp_path, demo_store, trials=4)
    sweep, _, _, url = prepare_sweep(path, mode="search")
    workers = [join_study(url, "search-search")[0] for _ in range(2)]  # as two processes would: two samplers
    for worker in workers * 2:  # taking turns, so that each draws twice
        run_trials(worker, sweep, tmp_path / "run", 1)
    assert_every_trial_drew_new_parameters_and_kept_its_cell(workers[0], tmp_path / "run", 4)


def test_a_search_that_draws_an_earlier_trials_parameters_does_not_train_them_again(tmp_path, demo_store):
    path = sweep_file(tmp_path, demo_store, name="search", grid={}, baselines=[],
                      search={"trials": 2, "prune": False, "space": {"seed": {"type": "categorical", "choices": [0]}}})
    sweep, _, study, _ = prepare_sweep(path, mode="search")
    study.add_trial(optuna.create_trial(params={"seed": 0}, distributions={
        "seed": optuna.distributions.CategoricalDistribution([0])}, value=0.25, user_attrs={"cell": "earlier"}))
    earlier = study.get_trials()[-1].number
    run_trials(study, sweep, tmp_path / "run", 1)
    repeated = next(trial for trial in study.get_trials() if trial.number != earlier and trial.params)
    assert (repeated.value, repeated.user_attrs["duplicate_of"]) == (0.25, earlier)
    assert not (tmp_path / "run" / "cells").exists()


@pytest.mark.slow
def test_a_cell_that_raises_is_recorded_failed_and_the_sweep_goes_on(small_grid, tmp_path, monkeypatch):
    import robovlms.sweep.one_cell

    original = robovlms.sweep.one_cell.train_cell

    def diverge_for_policy_head(sweep, cell, *args, **kwargs):
        if cell.training["formulation"]["name"] == "policy-head":
            raise FloatingPointError("the loss became nan at step 2")
        return original(sweep, cell, *args, **kwargs)

    monkeypatch.setattr(robovlms.sweep.one_cell, "train_cell", diverge_for_policy_head)
    status = run_sweep(small_grid)
    assert (status.done, status.failed) == (2, 1)
    failed = [r for r in read_cell_results(tmp_path / "run") if r.status == "failed"]
    assert len(failed) == 1 and "the loss became nan" in failed[0].error
    assert run_sweep(small_grid).failed == 1  # not retried unless asked
    monkeypatch.setattr(robovlms.sweep.one_cell, "train_cell", original)
    assert run_sweep(small_grid, retry_failed=True).failed == 0


def the_simulator_dies(times, monkeypatch):
    """Cells' evaluations: the first `times` of them die with their simulator, later ones run. Returns the calls."""
    import robovlms.rollout
    from robovlms.errors import SimulatorDied

    original, calls = robovlms.rollout.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(args)
        if len(calls) <= times:
            raise SimulatorDied("the simulator process (python, pid 7) was killed by SIGKILL during step()")
        return original(*args, **kwargs)

    monkeypatch.setattr(robovlms.rollout, "evaluate", evaluate)
    return calls


def test_a_cell_whose_simulator_died_is_run_again_and_completes(tmp_path, demo_store, monkeypatch):
    calls = the_simulator_dies(1, monkeypatch)
    status = run_sweep(sweep_file(tmp_path, demo_store, grid={}))
    assert (status.done, status.failed, len(calls)) == (1, 0, 2)
    assert [r.status for r in read_cell_results(tmp_path / "run")] == ["complete"]


def test_a_cell_whose_simulator_died_in_every_attempt_is_failed_saying_so_and_how_to_retry(tmp_path, demo_store,
                                                                                            monkeypatch):
    from robovlms.sweep.failures import SIMULATOR_ATTEMPTS

    calls = the_simulator_dies(100, monkeypatch)
    status = run_sweep(sweep_file(tmp_path, demo_store, grid={}))
    assert (status.done, status.failed, len(calls)) == (0, 1, SIMULATOR_ATTEMPTS)
    error = read_cell_results(tmp_path / "run")[0].error
    assert "killed by SIGKILL" in error and f"died in all {SIMULATOR_ATTEMPTS} attempts" in error
    assert "not of the policy" in error and "--retry-failed" in error


def test_a_rerun_that_leaves_cells_failed_says_how_to_retry_them(tmp_path, demo_store, monkeypatch):
    from typer.testing import CliRunner

    from robovlms.cli import app

    path = sweep_file(tmp_path, demo_store, grid={})
    the_simulator_dies(100, monkeypatch)
    assert CliRunner().invoke(app, ["sweep", str(path)]).exit_code == 1
    rerun = CliRunner().invoke(app, ["sweep", str(path)])
    assert rerun.exit_code == 1 and "0 to run" in rerun.output
    assert f"`robovlms sweep {path} --retry-failed` runs them again" in " ".join(rerun.output.split())


def test_a_retried_cell_that_completes_loses_its_error_txt_and_its_outcome_is_printed(tmp_path, demo_store,
                                                                                      monkeypatch):
    from typer.testing import CliRunner

    from robovlms.cli import app

    path = sweep_file(tmp_path, demo_store, grid={})
    calls = the_simulator_dies(3, monkeypatch)
    assert CliRunner().invoke(app, ["sweep", str(path)]).exit_code == 1
    assert (tmp_path / "run" / "cells" / "baseline-zero" / "error.txt").exists() and len(calls) == 3
    retried = CliRunner().invoke(app, ["sweep", str(path), "--retry-failed"])
    assert retried.exit_code == 0, retried.output
    assert re.search(r"\] baseline-zero: success 0/1 \(0%\)", retried.output)
    assert not (tmp_path / "run" / "cells" / "baseline-zero" / "error.txt").exists()


def test_a_retried_cell_is_printed_even_when_no_progress_report_falls_between_its_start_and_its_commit(
        tmp_path, demo_store, monkeypatch):
    from typer.testing import CliRunner

    import robovlms.sweep
    from robovlms.cli import app

    path = sweep_file(tmp_path, demo_store, grid={})
    the_simulator_dies(3, monkeypatch)
    assert CliRunner().invoke(app, ["sweep", str(path)]).exit_code == 1
    original = robovlms.sweep.run_sweep

    def only_first_and_last_reports(*args, progress, **kwargs):  # a busy machine: the cell ran between two reports
        reports = []
        status = original(*args, progress=reports.append, **kwargs)
        progress(reports[0])
        progress(reports[-1])
        return status

    monkeypatch.setattr(robovlms.sweep, "run_sweep", only_first_and_last_reports)
    retried = CliRunner().invoke(app, ["sweep", str(path), "--retry-failed"])
    assert retried.exit_code == 0, retried.output
    assert "1 cells: 0 committed before, 1 to run" in retried.output
    assert re.search(r"\] baseline-zero: success 0/1 \(0%\)", retried.output)


# ---- bad input: a clear error, and nothing stored ---------------------------------------------------------------


def test_malformed_yaml_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_sweep(path)


@pytest.mark.parametrize("change, message", [
    ({"grid": {"backbone": []}}, "expands to zero cells"),
    ({"grid": {"batch_sise": [4]}}, "unknown axis 'grid.batch_sise'; valid axes: .*batch_size"),
    ({"train": {"learning_rat": 1e-3}}, "unknown key 'train.learning_rat'"),
    ({"evaluaton": {}}, "unknown key 'evaluaton'; valid keys: .*evaluation"),
    ({"grid": {"formulation": ["one-step-continuous"], "history": [4]}}, "history must be 1"),
])
def test_a_bad_sweep_file_names_the_offending_key(tmp_path, change, message):
    sweep = {"name": "bad", "run_dir": str(tmp_path / "run"), "store": {"path": str(tmp_path / "store")}, **change}
    with pytest.raises(ConfigError, match=message):
        expand_cells(load_sweep(sweep))
    assert not (tmp_path / "run").exists()


def test_an_unknown_formulation_in_a_grid_lists_the_valid_ones(tmp_path):
    sweep = {"name": "bad", "run_dir": str(tmp_path / "run"), "store": {"path": "x"},
             "grid": {"formulation": ["policy-hed"]}}
    with pytest.raises(UnknownNameError, match="policy-head"):
        expand_cells(load_sweep(sweep))


@pytest.mark.parametrize("key, name", [("formulation", "one-step-continuous"), ("backbone", "kosmos2")])
def test_fixed_training_settings_may_name_a_backbone_or_formulation(tmp_path, key, name):
    sweep = {"name": "named", "run_dir": str(tmp_path / "run"), "store": {"path": "x"}, "train": {key: name},
             "baselines": []}
    (cell,) = expand_cells(load_sweep(sweep))
    assert cell.training[key] == {"name": name}


def test_an_unreachable_storage_fails_at_once(tmp_path, demo_store):
    path = sweep_file(tmp_path, demo_store)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach the Optuna storage postgresql://robovlms:\\*\\*\\*@127.0.0.1"):
        prepare_sweep(path, storage="postgresql://robovlms:secret@127.0.0.1:1/sweeps")
    assert time.monotonic() - started < 15


def test_two_different_sweep_files_on_one_study_are_refused_and_nothing_changes(tmp_path, demo_store):
    first = sweep_file(tmp_path, demo_store, name="shared")
    prepare_sweep(first)
    trials = len(study_of(first).get_trials())
    other = yaml.safe_load(first.read_text())
    other["grid"]["backbone"] = ["paligemma"]
    second = tmp_path / "other.yaml"
    second.write_text(yaml.safe_dump(other))
    with pytest.raises(ConfigError, match="belongs to another sweep file"):
        prepare_sweep(second)
    assert len(study_of(first).get_trials()) == trials


def test_a_cell_whose_workers_all_died_is_recorded_failed_with_the_reason(tmp_path, demo_store):
    from robovlms.sweep.failures import record_abandoned

    path = sweep_file(tmp_path, demo_store, baselines=[])
    sweep, cells, study, _ = prepare_sweep(path)
    for _ in cells:
        study.tell(study.ask(), state=TrialState.FAIL)  # as a stale trial is failed when its worker dies
    record_abandoned(study, sweep, cells, tmp_path / "run")
    results = read_cell_results(tmp_path / "run")
    assert len(results) == len(cells) and all(r.status == "failed" for r in results)
    assert all("stopped without a result in all 1 attempts" in r.error for r in results)
    assert {r.backbone_label for r in results} == {"gpt-scratch (tiny, random init)", "kosmos2 (tiny, random init)"}


def test_a_sweep_without_a_terminal_prints_one_line_per_committed_cell(tmp_path, demo_store):
    from typer.testing import CliRunner

    from robovlms.cli import app

    path = sweep_file(tmp_path, demo_store, grid={"backbone": ["gpt-scratch"], "formulation": ["one-step-continuous"]},
                      baselines=["zero", "mean"])
    result = CliRunner().invoke(app, ["sweep", str(path)])  # CliRunner's output is not a terminal
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "3 cells: 0 committed before, 3 to run"
    cell_lines = [line for line in lines if re.match(r"\[\d+\.\d min\] ", line)]
    assert len(cell_lines) == 3 and cell_lines[-1].endswith("; 0 cells left")
    trained = next(line for line in cell_lines if "gpt-scratch-one-step-continuous" in line)
    assert re.search(r": success \d/1 \(\d+%\), train \d+ s, eval \d+ s; [0-2] cells left$", trained)
    assert any(re.search(r"\] baseline-zero: success 0/1 \(0%\)", line) for line in cell_lines)


# ---- the dry run ----------------------------------------------------------------------------------------------


def fixed_timings(monkeypatch, step=0.01, policy=0.001, startup=5.0):
    """The dry run's CPU measurements replaced by fixed numbers: build, step, validation batch, checkpoint,
    policy step (seconds), and a worker's start-up."""
    import robovlms.sweep.cost as cost

    monkeypatch.setattr(cost, "measure_cell", lambda *args: (0.0, step, 0.0, 0.0, policy))
    monkeypatch.setattr(cost, "worker_startup_seconds", lambda *args: startup)


def test_the_evaluation_bound_counts_the_policys_step_latency_per_observation(tmp_path, demo_store, monkeypatch):
    from robovlms.sweep import dry_run, expand_cells, load_sweep

    fixed_timings(monkeypatch, step=0.01, policy=0.5)
    sweep = load_sweep(sweep_file(tmp_path, demo_store, grid={"backbone": ["gpt-scratch"],
                                                              "formulation": ["one-step-continuous"]}))
    trained, zero = dry_run(sweep, expand_cells(sweep)).cells
    observations = 1 * 15 / 2  # one episode of button-press-topdown, 15 steps, chunks of 2 run open-loop
    assert trained.step_ms == 500 and trained.eval_max_s == pytest.approx(observations * (1 / 60 + 0.5))
    assert trained.train_s == pytest.approx(0.01 * 3)
    assert zero.eval_max_s == pytest.approx(15 / 60)


def test_the_dry_run_times_steps_on_the_threads_a_sweep_worker_gets(tmp_path, demo_store, monkeypatch):
    import torch

    import robovlms.sweep.cost as cost
    from robovlms.sweep import dry_run, expand_cells, load_sweep

    monkeypatch.setattr(cost, "worker_startup_seconds", lambda *args: 5.0)
    monkeypatch.setattr(cost.os, "cpu_count", lambda: 8)
    threads = []
    monkeypatch.setattr(cost, "_training_step_seconds", lambda *args: (threads.append(torch.get_num_threads())
                                                                       or 0.01, torch.optim.SGD([torch.zeros(1)])))
    sweep = load_sweep(sweep_file(tmp_path, demo_store, grid={"backbone": ["gpt-scratch"],
                                                              "formulation": ["one-step-continuous"]}))
    before = torch.get_num_threads()
    estimate = dry_run(sweep, expand_cells(sweep), workers=4)
    assert threads == [2] and estimate.threads == 2  # 8 cores shared by 4 workers
    assert torch.get_num_threads() == before


def test_the_dry_runs_total_counts_each_workers_start_up_once(tmp_path, demo_store, monkeypatch):
    from robovlms.sweep import dry_run, expand_cells, load_sweep

    fixed_timings(monkeypatch, step=0.0, policy=0.0, startup=30.0)
    sweep = load_sweep(sweep_file(tmp_path, demo_store))
    estimate = dry_run(sweep, expand_cells(sweep), workers=2)
    work = sum(cost.train_s or 0.0 for cost in estimate.cells) + sum(cost.eval_max_s for cost in estimate.cells)
    assert estimate.startup_s == 30.0 and estimate.total_seconds(2) == pytest.approx(30.0 + work / 2)


def test_a_workers_start_up_is_measured_in_a_fresh_interpreter():
    from robovlms.sweep.cost import worker_startup_seconds

    assert worker_startup_seconds([{"backbone": {"name": "kosmos2"}}], threads=1) > 0


def test_the_dry_run_never_times_cells_meant_for_gpus(tmp_path, demo_store, monkeypatch):
    import robovlms.sweep.cost as cost
    from robovlms.sweep import dry_run, expand_cells, load_sweep

    monkeypatch.setattr(cost, "measure_cell", lambda *args: pytest.fail("a GPU cell was timed on the CPU"))
    sweep = load_sweep(sweep_file(tmp_path, demo_store, grid={"backbone": ["gpt-scratch"],
                                                              "formulation": ["policy-head"],
                                                              "accelerator": ["gpu"]}))
    trained, _ = dry_run(sweep, expand_cells(sweep)).cells
    assert not trained.timed and trained.train_s is None and trained.memory.total() > 0
    assert trained.parameters == trained.trainable > 0


def test_the_dry_run_of_the_pretrained_gpu_sweep_prints_parameters_and_memory_without_weights(tmp_path):
    from typer.testing import CliRunner

    from robovlms.cli import app

    shipped = Path(__file__).resolve().parents[1] / "experiments" / "pretrained_gpu.yaml"
    sweep = yaml.safe_load(shipped.read_text())
    sweep["run_dir"], sweep["store"]["path"] = str(tmp_path / "run"), str(tmp_path / "no-store")
    path = tmp_path / "pretrained_gpu.yaml"
    path.write_text(yaml.safe_dump(sweep))
    result = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"], terminal_width=100)
    said = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "1.67B" in said and "2.92B" in said and "8.95B" in said  # kosmos-2, paligemma-3b, idefics-9b
    assert "/models/idefics-9b (flamingo): HuggingFaceM4/idefics-9b" in said
    assert "GiB" in said and "measure their time where they run" in said and "on GPU" in said


def test_the_policy_step_estimate_runs_a_whole_decoding(store_for_decoding):
    """Autoregressive discrete decoding passes the backbone once per action token; the estimate times all of them."""
    import robovlms.sweep.cost as cost
    from robovlms.backbone import create_backbone
    from robovlms.benchmarks.metaworld import MetaWorldBenchmark
    from robovlms.formulation import create_formulation
    from robovlms.training import load_config

    benchmark = MetaWorldBenchmark(tasks=["button-press-topdown"], image_size=64)
    config = load_config({"store": "-", "run_dir": "-", "chunk": 2})
    for decoding, passes in (("parallel", 1), ("autoregressive", 2 * benchmark.action_dim)):
        formulation = create_formulation("one-step-discrete", create_backbone("gpt-scratch"),
                                         *store_for_decoding, chunk=2, decoding=decoding)
        calls = []
        formulation.backbone.register_forward_hook(lambda module, args, output: calls.append(1))
        cost._policy_step_seconds(formulation, benchmark, config, repeats=1)
        assert len(calls) == 2 * passes, decoding  # a warm-up call and one timed


@pytest.fixture
def store_for_decoding():
    from robovlms.sweep.cost import _unit_statistics

    return _unit_statistics(4), _unit_statistics(39)


def test_a_dry_run_shows_short_ids_and_says_when_the_sweep_is_finished(tmp_path, demo_store, monkeypatch):
    from typer.testing import CliRunner

    from robovlms.cli import app
    from robovlms.results import CellResult, write_cell_result
    from robovlms.sweep import expand_cells, load_sweep

    import robovlms.cli

    fixed_timings(monkeypatch)
    monkeypatch.setattr(robovlms.cli.console, "width", 80)  # a terminal's (piped output is as wide as its lines)
    path = sweep_file(tmp_path, demo_store)
    first = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"], terminal_width=80)
    assert first.exit_code == 0, first.output
    assert "done" not in first.output and not any(len(line) > 80 for line in first.output.splitlines())
    cells = expand_cells(load_sweep(path))
    for cell in cells:
        write_cell_result(tmp_path / "run" / "cells" / cell.cell_id,
                          CellResult(cell_id=cell.cell_id, status="complete", kind=cell.kind, benchmark="metaworld",
                                     split="ABC->D", policy=cell.policy))
    finished = CliRunner().invoke(app, ["sweep", str(path), "--dry-run"], terminal_width=80)
    said = " ".join(finished.output.split())
    assert f"{len(cells)} of {len(cells)} cells are done" in said and "the sweep is finished" in said
@pytest.mark.parametrize("change, message", [
    ({"benchmark": {"name": "metaworld", "split": "ABC->D", "options": {"image_size": 100000}}}, "image"),
    ({"benchmark": {"name": "metaworld", "split": "ABC->E"}}, "unknown metaworld split 'ABC->E'"),
    ({"benchmark": {"name": "metaworlds"}}, "unknown benchmark 'metaworlds'; valid choices: .*metaworld"),
    ({"store": {"path": "/nonexistent/store"}}, "/nonexistent/store"),
    ({"train": {"backbone": {"options": {"hiden_size": 32}}}}, "unknown option.*hiden_size.*valid options: hidden_size"),
])
def test_a_sweep_file_refused_for_its_benchmark_store_or_backbone_leaves_no_study_behind(tmp_path, demo_store,
                                                                                          change, message):
    with pytest.raises(RobovlmsError, match=message):
        prepare_sweep(sweep_file(tmp_path, demo_store, name="typo", **change))
    assert not (tmp_path / "run" / "optuna.db").exists()
    prepare_sweep(sweep_file(tmp_path, demo_store, name="typo"))  # the typo fixed, the same study name is free


def test_a_backbone_option_of_the_wrong_type_is_named_before_any_study(tmp_path, demo_store):
    path = sweep_file(tmp_path, demo_store, train={"max_steps": 3, "backbone": {"options": {"hidden_size": "big"}}})
    with pytest.raises(ConfigError, match="backbone 'gpt-scratch' option hidden_size: .*valid integer.*'big'"):
        prepare_sweep(path)
    assert not (tmp_path / "run").exists()


def test_evaluating_on_a_task_the_store_does_not_hold_is_refused(tmp_path, demo_store):
    path = sweep_file(tmp_path, demo_store, benchmark={"name": "metaworld", "split": "ABC->D",
                                                       "options": {"tasks": ["button-press"], "max_steps": 15}})
    with pytest.raises(ConfigError, match="evaluates on task.* button-press that the store .* holds no "
                                          "demonstrations of .*button-press-topdown"):
        prepare_sweep(path)
    assert not (tmp_path / "run").exists()


def test_an_empty_grid_without_baselines_has_no_cells(tmp_path):
    sweep = {"name": "empty", "run_dir": str(tmp_path / "run"), "store": {"path": "x"}, "train": {"max_steps": 3},
             "grid": {}, "baselines": []}
    with pytest.raises(ConfigError, match="the sweep has no cells"):
        expand_cells(load_sweep(sweep))


@pytest.mark.parametrize("train, message", [
    ({"max_steps": 1e15}, "max_steps: Input should be a valid integer"),
    ({"batch_size": 1_000_000_000}, "batch_size: Input should be less than or equal to 65536"),
])
def test_implausible_training_numbers_are_refused(tmp_path, train, message):
    sweep = {"name": "bad", "run_dir": str(tmp_path / "run"), "store": {"path": "x"}, "train": train}
    with pytest.raises(ConfigError, match=message):
        expand_cells(load_sweep(sweep))


def test_a_run_dir_under_a_regular_file_is_refused(tmp_path, demo_store):
    (tmp_path / "file").write_text("")
    path = sweep_file(tmp_path, demo_store, run_dir=str(tmp_path / "file" / "run"))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'file'} is a file, not a directory"):
        prepare_sweep(path)


def test_the_cli_prints_a_bad_sweep_file_in_one_line_without_a_traceback(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(b"name: \xff\n")
    finished = subprocess.run([sys.executable, "-m", "robovlms.cli", "sweep", str(path)], capture_output=True,
                              text=True, timeout=600)
    assert finished.returncode == 2 and "Traceback" not in finished.stderr + finished.stdout
    assert "is not UTF-8 text" in finished.stdout


@pytest.mark.slow
def test_a_search_worker_taken_for_dead_drops_its_result_and_goes_on(tmp_path, demo_store, monkeypatch, caplog):
    import robovlms.sweep.worker

    path = learning_rate_search(tmp_path, demo_store, trials=1)
    search_objective = robovlms.sweep.worker._search_objective

    def taken_for_dead_in_its_first_attempt(sweep, base, run_dir, progress):
        objective = search_objective(sweep, base, run_dir, progress)

        def run(trial):
            if trial.number == 0:
                other_worker = optuna.load_study(study_name="search-search",
                                                 storage=open_storage(storage_url(sweep), 30))
                fail_as_stale(other_worker, 0)
            return objective(trial)

        return run

    monkeypatch.setattr(robovlms.sweep.worker, "_search_objective", taken_for_dead_in_its_first_attempt)
    with caplog.at_level("WARNING", logger="robovlms.sweep.worker"):
        status = run_sweep(path, mode="search")
    trials = optuna.load_study(study_name="search-search", storage=storage_url(load_sweep(path))).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE] and status.done == 1
    assert "search trial 0 was taken for dead" in caplog.text


HANGING_CELL = Path(__file__).with_name("hanging_cell.py")


def start_hanging_in(cell_prefix, marker, *arguments):
    """The robovlms command line, hanging once the evaluation of the cell whose id starts with `cell_prefix`
    begins (its training done); returns once it hangs there."""
    process = subprocess.Popen([sys.executable, str(HANGING_CELL), cell_prefix, str(marker), *arguments],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 1800  # a safety net against a hang, not a timing
    while not marker.exists():
        assert process.poll() is None, f"robovlms {' '.join(arguments)} ended before reaching {cell_prefix}"
        assert time.monotonic() < deadline, f"robovlms {' '.join(arguments)} never reached {cell_prefix}"
        time.sleep(0.2)
    return process


def kill_group(process):
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_a_search_killed_during_a_trial_and_resumed_by_two_workers_completes_its_budget(tmp_path, demo_store):
    path = learning_rate_search(tmp_path, demo_store, trials=4)
    kill_group(start_hanging_in("search-0001-", tmp_path / "hanging", "tune", str(path)))
    study = optuna.load_study(study_name="search-search", storage=storage_url(load_sweep(path)))
    make_stale(study, 1)  # as if its heartbeat had lapsed since the kill

    status = run_sweep(path, mode="search", workers=2)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert (status.done, status.failed) == (4, 0) and len(complete) == 4
    assert_every_trial_drew_new_parameters_and_kept_its_cell(study, tmp_path / "run", 4)
    assert sum(trial.user_attrs["cell"].startswith("search-0001-") for trial in complete) == 1  # the killed trial resumed
    trials = len(study.get_trials())
    assert run_sweep(path, mode="search").done == 4 and len(study.get_trials()) == trials  # nothing is missing


HOLD_THEN_JOIN = """
import sys
from robovlms.sweep.study import creating_study
with creating_study(sys.argv[1], "shared"):
    print("inside", flush=True)
"""


def test_a_sweep_creating_a_postgresql_study_makes_the_others_wait_for_it(postgres):
    from robovlms.sweep.study import creating_study

    with creating_study(postgres, "shared"):
        second = subprocess.Popen([sys.executable, "-c", HOLD_THEN_JOIN, postgres], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        said = second.stderr.readline()  # blocks until it says why it waits
        assert "another sweep is creating the study shared in postgresql://postgres@" in said
        assert second.poll() is None
    output, errors = second.communicate(timeout=600)
    assert second.returncode == 0 and output == "inside\n", errors


# ---- what only the store, the benchmark or building a cell can tell, checked before the study exists ------------


def test_settings_that_only_building_reveals_are_refused_before_the_study_exists(tmp_path, demo_store):
    """A hidden size its 4 attention heads do not divide passes every option check; building the backbone on the
    meta device (no weights, a fraction of a second) refuses it before any cell trains."""
    path = sweep_file(tmp_path, demo_store, train={"max_steps": 3, "chunk": 2, "cameras": ["rgb_static"],
                                                   "backbone": {"options": {"hidden_size": 33, "heads": 4}}},
                      grid={"backbone": ["kosmos2"], "formulation": ["policy-head"]})
    with pytest.raises(RobovlmsError, match=r"cell kosmos2-policy-head.*embed_dim must be divisible by num_heads"):
        prepare_sweep(path)
    assert not (tmp_path / "run" / "optuna.db").exists()


def test_a_history_that_chunk_execution_cannot_observe_is_refused_before_the_store_is_made(tmp_path, demo_store):
    path = sweep_file(tmp_path, demo_store, grid={"backbone": ["gpt-scratch"], "formulation": ["policy-head"],
                                                  "history": [2]},  # chunk 2 run open-loop, frames 1 step apart
                      store={"path": str(tmp_path / "store"), "generate": {"episodes": 1}})
    with pytest.raises(ConfigError, match=r"cell gpt-scratch-policy-head-h2.*cannot be observed when each chunk of 2 "
                                          r"runs open-loop; train with frame_stride 2"):
        prepare_sweep(path)
    assert not (tmp_path / "store").exists() and not (tmp_path / "run" / "optuna.db").exists()


def test_a_chunk_longer_than_the_shortest_training_episode_is_refused_before_the_study_exists(tmp_path, demo_store):
    shortest = int(demo_store.episodes["length"].min())
    path = sweep_file(tmp_path, demo_store, grid={"backbone": ["gpt-scratch"], "formulation": ["policy-head"],
                                                  "chunk": [shortest + 1]})
    with pytest.raises(RobovlmsError, match=rf"chunk {shortest + 1} must each be at most the length of the shortest "
                                            rf"episode used for training \({shortest} frames"):
        prepare_sweep(path)
    assert not (tmp_path / "run" / "optuna.db").exists()


def test_a_camera_the_store_does_not_hold_is_refused_before_the_study_exists(tmp_path, demo_store):
    path = sweep_file(tmp_path, demo_store, grid={"backbone": ["gpt-scratch"], "formulation": ["policy-head"],
                                                  "cameras": [["rgb_top"]]})
    with pytest.raises(ConfigError, match="camera .rgb_top. is not among the store.s"):
        prepare_sweep(path)
    assert not (tmp_path / "run" / "optuna.db").exists()


def test_a_cell_that_fails_after_training_records_the_training_time_it_spent(tmp_path, demo_store, monkeypatch):
    import robovlms.rollout

    def simulator_died(*args, **kwargs):
        raise RuntimeError("the simulator died")

    monkeypatch.setattr(robovlms.rollout, "evaluate", simulator_died)
    path = sweep_file(tmp_path, demo_store, grid={"backbone": ["gpt-scratch"], "formulation": ["policy-head"]},
                      baselines=[])
    assert run_sweep(path).failed == 1
    failed, = read_cell_results(tmp_path / "run")
    assert failed.status == "failed" and "the simulator died" in failed.error and failed.train_seconds > 0


def test_a_sweep_whose_trained_cells_all_failed_can_be_edited_and_rerun(tmp_path, demo_store, monkeypatch, caplog):
    import robovlms.sweep.one_cell

    original = robovlms.sweep.one_cell.train_cell

    def diverges(*args, **kwargs):
        raise FloatingPointError("the loss became nan at step 2")

    monkeypatch.setattr(robovlms.sweep.one_cell, "train_cell", diverges)
    path = sweep_file(tmp_path, demo_store, grid={"backbone": ["gpt-scratch"], "formulation": ["policy-head"]})
    first = run_sweep(path)
    assert (first.done, first.failed) == (1, 1)  # the baseline completes, the trained cell fails
    monkeypatch.setattr(robovlms.sweep.one_cell, "train_cell", original)
    edited = yaml.safe_load(path.read_text())
    edited["train"]["learning_rate"] = 1e-4  # the fix: another setting, so another cell and another file
    path.write_text(yaml.safe_dump(edited))
    second = run_sweep(path)
    assert (second.cells, second.done, second.failed) == (2, 2, 0)
    assert "none of its trained cells completed: it is replaced by this file" in caplog.text
    moved = list((tmp_path / "run" / "replaced").glob("*/gpt-scratch-policy-head-*/error.txt"))
    assert len(moved) == 1 and "the loss became nan" in moved[0].read_text()


def test_a_study_with_complete_cells_says_exactly_how_to_start_another_file(tmp_path, demo_store):
    first = sweep_file(tmp_path, demo_store, name="shared")
    study = prepare_sweep(first)[2]
    trial = study.get_trials()[0]
    study._storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING)
    study._storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [0.5])
    other = yaml.safe_load(first.read_text())
    other["grid"]["backbone"] = ["paligemma"]
    second = tmp_path / "other.yaml"
    second.write_text(yaml.safe_dump(other))
    with pytest.raises(ConfigError, match=rf"belongs to another sweep file .* run the file that made it to keep "
                                          rf"them, or give this sweep another name, or delete {tmp_path / 'run'}"):
        prepare_sweep(second)


def test_the_dry_run_says_in_one_line_that_a_backbone_returns_the_wrong_width(tmp_path, demo_store, monkeypatch,
                                                                              capsys):
    from plugin_distribution import NARROW_BACKBONE, install_plugin

    from robovlms import cli

    install_plugin(tmp_path, monkeypatch, "narrow_backbone", NARROW_BACKBONE,
                   {"robovlms.backbones": {"narrow": "narrow_backbone:Narrow"}})
    path = sweep_file(tmp_path, demo_store, grid={"backbone": ["narrow"], "formulation": ["policy-head"]},
                      train={"max_steps": 3, "chunk": 2, "cameras": ["rgb_static"], "execution": "chunk"})
    monkeypatch.setattr("sys.argv", ["robovlms", "sweep", str(path), "--dry-run"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    output = capsys.readouterr().out
    assert exit_.value.code == 2 and "Traceback" not in output
    assert output.count("backbone 'narrow' returned hidden size 32, its hidden_size says 64") == 1


def test_every_cell_of_a_one_worker_sweep_trains_on_the_same_threads(tmp_path, demo_store, monkeypatch):
    """Evaluating in the sweep's own process (a policy stepped there, or a step timed on one thread) must leave
    torch's threads as it found them: the next cell trains on the process's threads, or the first cell's time is
    not comparable with the others'."""
    import torch

    import robovlms.training

    train, threads = robovlms.training.train, []

    def recording(*args, **kwargs):
        threads.append(torch.get_num_threads())
        return train(*args, **kwargs)

    monkeypatch.setattr(robovlms.training, "train", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_sweep(sweep_file(tmp_path, demo_store, grid={"backbone": ["gpt-scratch"], "seed": [0, 1]},
                             baselines=[]))
    finally:
        torch.set_num_threads(before)
    assert threads == [2, 2]



FIRST_TRAINING = '''
import json, sys

import robovlms.training

train = robovlms.training.train
imported = []


def recording(*args, **kwargs):
    before = set(sys.modules)
    try:
        return train(*args, **kwargs)
    finally:
        imported.append(sorted(set(sys.modules) - before))


robovlms.training.train = recording
from robovlms.sweep import run_sweep

run_sweep(sys.argv[1])
json.dump(imported, open(sys.argv[2], "w"))
'''


def test_a_workers_first_cell_imports_nothing_that_later_cells_do_not(tmp_path, demo_store):
    """Whatever a process imports the first time it trains is imported before the first cell's clock starts, so
    the first cell's train_seconds counts no start-up (robovlms/sweep/startup.py)."""
    path = sweep_file(tmp_path, demo_store, grid={"backbone": ["paligemma"], "formulation": ["policy-head"]},
                      baselines=[])
    (tmp_path / "record.py").write_text(FIRST_TRAINING)
    subprocess.run([sys.executable, str(tmp_path / "record.py"), str(path), str(tmp_path / "imported.json")],
                   check=True, capture_output=True)
    first, = json.loads((tmp_path / "imported.json").read_text())
    assert first == []


def test_tune_chooses_on_validation_episodes_and_a_grid_reports_test_episodes_unless_the_file_names_them(tmp_path):
    from robovlms.sweep.config import with_evaluation_split

    def split(mode, **evaluation):
        sweep = load_sweep({"name": "s", "run_dir": str(tmp_path), "store": {"path": "x"},
                            "evaluation": evaluation})
        return with_evaluation_split(sweep, mode).evaluation.split

    assert (split("search"), split("grid")) == ("validation", "test")
    assert (split("search", split="test"), split("grid", split="validation")) == ("test", "validation")


def test_the_evaluation_split_changes_a_sweeps_fingerprint_except_the_test_split_every_older_sweep_evaluated(
        tmp_path):
    from robovlms.sweep import fingerprint

    def of(**evaluation):
        return fingerprint(load_sweep({"name": "s", "run_dir": str(tmp_path), "store": {"path": "x"},
                                       "evaluation": evaluation}), [])

    assert of() == of(split="test") != of(split="validation")


@pytest.mark.slow
def test_a_sweep_evaluated_on_validation_episodes_records_them_as_such(tmp_path, demo_store):
    path = sweep_file(tmp_path, demo_store, grid={}, baselines=["zero"],
                      evaluation={"episodes_per_task": 2, "latency_steps": 2, "split": "validation"})
    run_sweep(path)
    (result,) = read_cell_results(tmp_path / "run")
    records = pd.read_parquet(tmp_path / "run" / "cells" / "baseline-zero" / "records.parquet")
    assert result.evaluation_split == "validation" and set(records.scene) == {"E"}


@pytest.mark.slow
def test_a_search_selects_on_the_success_of_validation_episodes(tmp_path, demo_store):
    path = sweep_file(tmp_path, demo_store, name="search", grid={}, baselines=[],
                      train={"max_steps": 2, "batch_size": 4, "chunk": 2, "log_every": 1, "cameras": ["rgb_static"],
                             "execution": "chunk", "formulation": {"name": "one-step-continuous"},
                             "backbone": {"options": {"hidden_size": 32, "layers": 1}}},
                      search={"trials": 1, "prune": False,
                              "space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}})
    run_sweep(path, mode="search")
    (result,) = read_cell_results(tmp_path / "run")
    records = pd.read_parquet(tmp_path / "run" / "cells" / result.cell_id / "records.parquet")
    assert result.evaluation_split == "validation" and set(records.scene) == {"E"}
    best = json.loads((tmp_path / "run" / "results" / "best.json").read_text())
    assert (best["objective"], best["evaluation_split"], best["value"]) == ("success", "validation", result.success)
