"""The package's public import paths: the documented API, and the old paths of modules that moved."""

import ast
import importlib
import sys
from pathlib import Path

import pytest

import robovlms


def test_documented_data_api_imports_from_the_data_package():
    from robovlms.data import EpisodeStore, WindowDataset, window_loader
    from robovlms.data.store import EpisodeStore as StoreClass

    assert EpisodeStore is StoreClass and WindowDataset.__module__ == "robovlms.data.windows"
    assert callable(window_loader)


@pytest.mark.parametrize("old, new", [("robovlms.store", "robovlms.data.store"),
                                      ("robovlms.dataset", "robovlms.data.windows"),
                                      ("robovlms.lerobot_import", "robovlms.data.lerobot_import"),
                                      ("robovlms.benchmarks.calvin_import", "robovlms.data.calvin_import"),
                                      ("robovlms.plots", "robovlms.report.plots")])
def test_a_moved_module_keeps_importing_under_its_old_name_with_a_deprecation_warning(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_sweep_and_report_packages_re_export_their_public_api():
    import robovlms.report
    import robovlms.sweep

    for name in robovlms.sweep.__all__:
        assert hasattr(robovlms.sweep, name), name
    assert {"run_sweep", "prepare_sweep", "join_study", "work", "load_sweep", "expand_cells"} <= set(
        robovlms.sweep.__all__)
    assert {"write_report", "wilson_interval", "read_sweep_runs"} <= set(robovlms.report.__all__)


def test_results_and_rollout_do_not_import_each_other():
    package = Path(robovlms.__file__).parent
    for module, other in (("results", "rollout"), ("rollout", "results")):
        tree = ast.parse((package / f"{module}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert f"robovlms.{other}" not in imported, f"robovlms.{module} imports robovlms.{other}"
