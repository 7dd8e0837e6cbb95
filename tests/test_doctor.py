"""`robovlms doctor`: per benchmark, where its simulator runs, which modules it needs are found there, whether it
starts (a reset and one step, within a time limit), what to run to install the rest; exit code 1 unless ready.

The simulators' own environments are played by this interpreter with packages written for the test on PYTHONPATH
(tests/simulator_packages.py)."""

import sys

from simulator_packages import write_calvin_conf, write_calvin_env_failing_to_import, write_simpler_env
from typer.testing import CliRunner

from robovlms.cli import app


def doctor(monkeypatch, *arguments, packages=None, **environment):
    """The doctor's output and exit code; `packages` goes on PYTHONPATH, for the interpreters it starts."""
    for module in ("simpler_env", "mani_skill2_real2sim", "sapien"):
        monkeypatch.setitem(sys.modules, module, None)
    if packages is not None:
        monkeypatch.setenv("PYTHONPATH", str(packages))
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("COLUMNS", "400")
    result = CliRunner().invoke(app, ["doctor", *arguments])
    return result.output, result.exit_code


def rows(output):
    """The table's cells per benchmark."""
    return {cells[0]: cells for cells in ([cell.strip() for cell in line.split("│")[1:-1]]
                                          for line in output.splitlines() if line.count("│") > 2) if cells[0]}


def flat(output):
    """The output with its line breaks and runs of spaces made single spaces (messages wrap at the width)."""
    return " ".join(output.split())


def test_doctor_lists_every_benchmark_and_says_metaworld_is_ready_once_it_stepped(monkeypatch):
    found = rows(doctor(monkeypatch)[0])
    assert {"metaworld", "calvin", "simpler"} <= set(found)
    assert found["metaworld"][1:2] == ["ready"] and found["metaworld"][3] == "installed with robovlms"
    assert found["metaworld"][4].endswith(" s")  # how long its reset and step took


def test_doctor_exits_with_1_when_a_benchmark_is_not_ready(monkeypatch):
    _, code = doctor(monkeypatch, "simpler")
    assert code == 1


def test_doctor_names_missing_modules_and_the_commands_that_install_them(monkeypatch):
    output = flat(doctor(monkeypatch, "simpler")[0])
    assert "simpler_env: missing" in output and "sapien: missing" in output
    assert "git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules" in output
    assert "ROBOVLMS_SIMPLER_PYTHON" in output


def test_doctor_looks_into_the_interpreter_a_variable_names(monkeypatch):
    output = flat(doctor(monkeypatch, "simpler", ROBOVLMS_SIMPLER_PYTHON=sys.executable)[0])
    assert f"{sys.executable} (own environment)" in output


def test_doctor_says_a_calvin_env_that_fails_to_import_is_not_ready_and_what_it_could_not_import(monkeypatch,
                                                                                                  tmp_path):
    write_calvin_env_failing_to_import(tmp_path / "packages", missing="rich_missing_here")
    output, code = doctor(monkeypatch, "calvin", packages=tmp_path / "packages", ROBOVLMS_CALVIN_PYTHON=sys.executable,
                          ROBOVLMS_CALVIN_CONF=str(write_calvin_conf(tmp_path / "conf")))
    output = flat(output)
    assert code == 1 and "fails" in output
    assert "calvin_env fails to import" in output and "No module named 'rich_missing_here'" in output
    assert "git -C calvin/calvin_env checkout 797142c" in output


def test_doctor_says_a_calvin_conf_that_does_not_exist_is_not_ready(monkeypatch, tmp_path):
    write_calvin_env_failing_to_import(tmp_path / "packages", missing="rich_missing_here")
    output, code = doctor(monkeypatch, "calvin", packages=tmp_path / "packages", ROBOVLMS_CALVIN_PYTHON=sys.executable,
                          ROBOVLMS_CALVIN_CONF=str(tmp_path / "no-such-conf"))
    output = flat(output)
    assert code == 1
    assert f"{tmp_path / 'no-such-conf'}/callbacks/rollout/tasks/new_playtable_tasks.yaml is missing" in output


def test_doctor_says_ready_for_a_simpler_env_that_resets_and_steps(monkeypatch, tmp_path):
    write_simpler_env(tmp_path / "packages")
    output, code = doctor(monkeypatch, "simpler", packages=tmp_path / "packages",
                          ROBOVLMS_SIMPLER_PYTHON=sys.executable)
    assert code == 0, output
    assert rows(output)["simpler"][1] == "ready"


def test_doctor_says_a_simpler_env_without_a_vulkan_device_is_not_ready(monkeypatch, tmp_path):
    write_simpler_env(tmp_path / "packages", build="no_vulkan")
    output, code = doctor(monkeypatch, "simpler", packages=tmp_path / "packages",
                          ROBOVLMS_SIMPLER_PYTHON=sys.executable)
    output = flat(output)
    assert code == 1 and "SAPIEN found no Vulkan device" in output and "bookworm-backports" in output


def test_doctor_says_a_simpler_env_missing_a_stage_mesh_is_not_ready_and_names_it(monkeypatch, tmp_path):
    stage = "hab2_bench_assets/stages/google_pick_coke_can_1_v4.glb"
    write_simpler_env(tmp_path / "packages", table_missing=True, missing=(stage,))
    output, code = doctor(monkeypatch, "simpler", packages=tmp_path / "packages",
                          ROBOVLMS_SIMPLER_PYTHON=sys.executable)
    output = flat(output)
    assert code == 1 and f"Missing: {tmp_path / 'packages' / 'data' / stage}" in output


def test_doctor_stops_a_simulator_that_hangs_at_its_time_limit(monkeypatch, tmp_path):
    write_simpler_env(tmp_path / "packages", build="hangs")
    output, code = doctor(monkeypatch, "simpler", "--time-limit", "5", packages=tmp_path / "packages",
                          ROBOVLMS_SIMPLER_PYTHON=sys.executable)
    output = flat(output)
    assert code == 1 and "it did not reset and step within the time limit of 5 s, and was stopped" in output


def test_doctor_refuses_an_unknown_benchmark_listing_the_valid_ones(monkeypatch):
    result = CliRunner().invoke(app, ["doctor", "calvn"])
    assert "unknown benchmark 'calvn'" in str(result.exception) and "calvin" in str(result.exception)
