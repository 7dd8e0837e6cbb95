"""`robovlms doctor`: per benchmark, where its simulator runs, which modules it needs are found there, and what to
run to install the rest."""

import sys

from typer.testing import CliRunner

from robovlms.cli import app


def doctor(monkeypatch, **environment):
    for module in ("simpler_env", "mani_skill2_real2sim", "sapien"):
        monkeypatch.setitem(sys.modules, module, None)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("COLUMNS", "400")
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    return result.output


def test_doctor_lists_every_benchmark_and_says_metaworld_is_ready(monkeypatch):
    output = doctor(monkeypatch)
    rows = {line.split("│")[1].strip(): line for line in output.splitlines() if line.count("│") > 2}
    assert {"metaworld", "calvin", "simpler"} <= set(rows)
    assert "ready" in rows["metaworld"] and "installed with robovlms" in rows["metaworld"]


def test_doctor_names_missing_modules_and_the_commands_that_install_them(monkeypatch):
    output = doctor(monkeypatch)
    assert "simpler_env: missing" in output and "sapien: missing" in output
    assert "git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules" in output
    assert "ROBOVLMS_SIMPLER_PYTHON" in output


def test_doctor_looks_into_the_interpreter_a_variable_names(monkeypatch):
    output = doctor(monkeypatch, ROBOVLMS_SIMPLER_PYTHON=sys.executable)
    assert f"{sys.executable} (own environment)" in output
