"""The command line as a user meets it: quick to answer --help and the listings, whole lines when piped, repeatable
options that add up, and a traceback behind a one-line error when asked for."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from robovlms import cli

ROBOVLMS = Path(sys.executable).with_name("robovlms")
HEAVY_MODULES = ("torch", "transformers", "lightning", "pandas")

RUN_AND_LIST_IMPORTS = """
import sys
from robovlms.cli import main
sys.argv = ["robovlms", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print("IMPORTED:", ",".join(sorted(set(sys.modules) & set({heavy!r}))))
"""


def heavy_modules_imported(*arguments: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", RUN_AND_LIST_IMPORTS.format(heavy=HEAVY_MODULES), *arguments],
                            capture_output=True, text=True, check=True)
    imported = result.stdout.strip().splitlines()[-1].removeprefix("IMPORTED:").strip()
    return imported.split(",") if imported else []


@pytest.mark.parametrize("arguments", [["--help"], ["backbones"], ["benchmarks"], ["formulations"]])
def test_help_and_the_listings_import_no_model_library(arguments):
    assert heavy_modules_imported(*arguments) == []


def test_checking_the_listed_plugins_imports_them():
    assert "torch" in heavy_modules_imported("formulations", "--check")


def test_piped_listings_keep_every_entry_point_and_package_whole():
    environment = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    output = subprocess.run([str(ROBOVLMS), "backbones"], capture_output=True, text=True, env=environment,
                            check=True).stdout
    for name, entry_point in [("kosmos2", "robovlms.backbones.kosmos2:Kosmos2Backbone"),
                              ("gpt-scratch", "robovlms.backbones.gpt_scratch:GPTScratchBackbone")]:
        row = next(line for line in output.splitlines() if f" {name} " in line)
        assert entry_point in row and "robovlms 0.1.0" in row, row


@pytest.mark.slow
def test_tasks_given_twice_evaluates_both():
    result = CliRunner().invoke(cli.app, ["evaluate", "--policy", "zero", "--tasks", "button-press-topdown",
                                          "--tasks", "door-open", "--episodes", "1", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "button-press-topdown" in result.output and "door-open" in result.output
    assert "2 episodes" in result.output


def test_tasks_given_twice_generate_demonstrations_of_both(monkeypatch, tmp_path):
    created = {}

    def record_tasks(name, tasks, **options):
        created["tasks"] = tasks
        raise cli.RobovlmsError("stop after the benchmark is created")

    monkeypatch.setattr("robovlms.benchmark.create_benchmark", record_tasks)
    CliRunner().invoke(cli.app, ["data", "generate", str(tmp_path / "store"), "--tasks", "button-press-topdown",
                                 "--tasks", "door-open,drawer-open"])
    assert created["tasks"] == ["button-press-topdown", "door-open", "drawer-open"]


def run_main(monkeypatch, capsys, *arguments):
    monkeypatch.setattr("sys.argv", ["robovlms", *arguments])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


def test_an_error_is_one_line_without_a_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("ROBOVLMS_DEBUG", raising=False)
    code, out, err = run_main(monkeypatch, capsys, "data", "info", str(tmp_path / "no-store"))
    assert code == 2 and "error:" in out and "no-store" in out
    assert "Traceback" not in out + err


def test_traceback_option_shows_where_the_error_was_raised(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("ROBOVLMS_DEBUG", raising=False)
    code, out, err = run_main(monkeypatch, capsys, "--traceback", "data", "info", str(tmp_path / "no-store"))
    assert code == 2 and "error:" in out
    assert "Traceback (most recent call last)" in err and "robovlms/data/store.py" in err


def test_robovlms_debug_shows_the_traceback_too(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("ROBOVLMS_DEBUG", "1")
    code, _, err = run_main(monkeypatch, capsys, "data", "info", str(tmp_path / "no-store"))
    assert code == 2 and "Traceback (most recent call last)" in err
