"""Bad values given on the command line or in a sweep file: each refused before any work, in one line that names the
value and what would do."""

import fcntl
import subprocess
import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from robovlms.cli import app
from robovlms.errors import ConfigError, ReportError, RobovlmsError


def refused(*arguments):
    """The error a command stops with; it must be robovlms' own, in one line."""
    result = CliRunner().invoke(app, list(arguments))
    assert isinstance(result.exception, RobovlmsError), result.output
    message = str(result.exception)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("episodes", ["0", "-3", "30000000", str(10 ** 20)])
def test_evaluation_episodes_outside_their_bounds_are_refused(episodes):
    message = refused("evaluate", "--policy", "zero", "--episodes", episodes)
    assert f"--episodes must be between 1 and 100000; got {episodes}" in message


@pytest.mark.parametrize("command", [["evaluate", "--policy", "zero"], ["sweep", "experiments/smoke.yaml"],
                                     ["tune", "experiments/smoke.yaml"], ["data", "generate", "/nonexistent/store"]],
                         ids=["evaluate", "sweep", "tune", "data generate"])
@pytest.mark.parametrize("workers", ["0", "-5"])
def test_a_number_of_workers_below_one_is_refused(command, workers):
    assert f"--workers must be between 1 and 1024; got {workers}" in refused(*command, "--workers", workers)


def test_videos_without_a_directory_to_write_them_to_are_refused():
    assert "--videos needs --out" in refused("evaluate", "--policy", "zero", "--videos", "2")


def test_a_negative_number_of_videos_is_refused(tmp_path):
    assert "--videos must be between 0" in refused("evaluate", "--policy", "zero", "--videos", "-1", "--out",
                                                   str(tmp_path))


@pytest.mark.parametrize("name, text", [("real.yaml", ""), ("real.yaml", "# nothing measured yet\n"),
                                        ("real.yaml", "{}\n"), ("real.csv", ""), ("real.csv", "configuration\n")],
                         ids=["empty yaml", "comments only", "empty mapping", "empty csv", "header only"])
def test_a_real_world_file_without_rates_is_refused(tmp_path, name, text):
    from robovlms.sim_to_real import read_real_world_success

    (tmp_path / name).write_text(text)
    with pytest.raises(ReportError, match=f"{name} holds no real-world success rates"):
        read_real_world_success(tmp_path / name)


def test_a_report_directory_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    message = refused("report", str(tmp_path), "--out", str(tmp_path / "file" / "report"))
    assert f"cannot write the report to {tmp_path / 'file' / 'report'}: {tmp_path / 'file'} is a file" in message


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_learning_rate_that_is_not_a_finite_number_is_refused(tmp_path, value):
    from robovlms.sweep import expand_cells, load_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: inf\nrun_dir: {tmp_path / 'run'}\nstore: {{path: x}}\ntrain: {{learning_rate: {value}}}\n")
    with pytest.raises(ConfigError, match="learning_rate: Input should be a finite number"):
        expand_cells(load_sweep(path))


# ---- two sweeps started at once ---------------------------------------------------------------------------------


PREPARE = "import sys; from robovlms.sweep import prepare_sweep; prepare_sweep(sys.argv[1]); print('prepared')"


def test_a_sweep_started_while_another_creates_the_study_says_so_waits_and_joins_it(tmp_path, demo_store):
    from robovlms.sweep import load_sweep, storage_url
    from robovlms.sweep.study import creation_lock_file

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "twice", "run_dir": str(tmp_path / "run"),
                                    "store": {"path": str(demo_store.path)}, "baselines": ["zero", "mean"],
                                    "benchmark": {"options": {"tasks": ["button-press-topdown", "door-open"]}}}))
    (tmp_path / "run").mkdir()
    with open(creation_lock_file(storage_url(load_sweep(path))), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the first sweep holds it while it creates the study
        second = subprocess.Popen([sys.executable, "-c", PREPARE, str(path)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        said = ""
        deadline = time.monotonic() + 600  # a safety net against a hang, not a timing
        while "another sweep is creating" not in said:
            assert second.poll() is None and time.monotonic() < deadline, said + second.stderr.read()
            said += second.stderr.readline()
        assert second.poll() is None  # it waits
    output, errors = second.communicate(timeout=600)
    assert second.returncode == 0 and output.strip() == "prepared", errors
    assert "study twice in sqlite:///" in said and "already exists" not in said + errors


@pytest.mark.slow
def test_sweeps_started_at_once_on_a_fresh_run_directory_create_one_study_and_queue_each_cell_once(tmp_path,
                                                                                                  demo_store):
    import optuna

    from robovlms.sweep import load_sweep, storage_url

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "at-once", "run_dir": str(tmp_path / "run"),
                                    "store": {"path": str(demo_store.path)}, "baselines": ["zero", "mean"],
                                    "benchmark": {"options": {"tasks": ["button-press-topdown", "door-open"]}}}))
    sweeps = [subprocess.Popen([sys.executable, "-c", PREPARE, str(path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for sweep in sweeps:
        _, errors = sweep.communicate(timeout=900)
        assert sweep.returncode == 0, errors
    study = optuna.load_study(study_name="at-once", storage=storage_url(load_sweep(path)))
    assert sorted(trial.user_attrs["cell"] for trial in study.get_trials()) == ["baseline-mean", "baseline-zero"]

