"""Failure records: a cell that raises, or whose workers died in every retry, is committed as failed with the
reason, so reports list it and the sweep goes on."""

from __future__ import annotations

import traceback
from pathlib import Path

from robovlms.errors import RobovlmsError
from robovlms.results import CELLS_DIR, TRAIN_DIR, CellResult, read_cell_result, software_versions, write_cell_result
from robovlms.sweep.cells import Cell
from robovlms.sweep.config import SweepConfig
from robovlms.sweep.study import cell_trials


class CellFailed(RobovlmsError):
    """A cell raised; its error is recorded in its result.json and the sweep goes on."""


def record_failure(sweep: SweepConfig, cell: Cell, run_dir: Path, error: BaseException, trial_number: int | None
                    ) -> str:
    from robovlms.training import load_config

    message = f"{type(error).__name__}: {error}"
    result = CellResult(cell_id=cell.cell_id, status="failed", kind=cell.kind, benchmark=sweep.benchmark.name,
                        split=sweep.benchmark.split, policy=cell.policy, error=message, axes=cell.axes,
                        config=cell.training, versions=software_versions(), sweep=sweep.name, trial=trial_number)
    if cell.kind == "trained":
        config = load_config({**cell.training, "store": sweep.store.path, "run_dir": "-"})
        backbone = config.backbone
        result.backbone, result.random_init = backbone.name, backbone.size == "tiny"
        result.backbone_label = (f"{backbone.name} ({backbone.size}, random init)" if backbone.size == "tiny"
                                 else f"{backbone.name} (pretrained: {backbone.path})")
        result.formulation, result.history, result.chunk = config.formulation.name, config.history, config.chunk
        result.data_fraction, result.seed = config.data_fraction, config.seed
        result.episodes_per_task = config.episodes_per_task
    cell_dir = run_dir / CELLS_DIR / cell.cell_id
    result.train_seconds = _training_seconds(cell_dir / TRAIN_DIR)  # training a cell did before it failed counts
    write_cell_result(cell_dir, result)
    (cell_dir / "error.txt").write_text("".join(traceback.format_exception(error)))
    return message


def _training_seconds(train_dir: Path) -> float | None:
    from robovlms.training import training_seconds

    try:
        return training_seconds(train_dir)
    except RobovlmsError:  # a damaged record of the time; the failure is what matters here
        return None


def record_abandoned(study, sweep: SweepConfig, cells: list[Cell], run_dir: Path) -> None:
    """Cells whose workers died every time they were retried are recorded as failed, so reports list them."""
    from optuna.trial import TrialState

    trials = cell_trials(study)
    for cell in cells:
        attempts = trials.get(cell.cell_id, [])
        if attempts and all(t.state == TrialState.FAIL for t in attempts) and read_cell_result(
                run_dir / CELLS_DIR / cell.cell_id) is None:
            error = RuntimeError(f"its worker stopped without a result in all {len(attempts)} attempts (killed, out "
                                 f"of memory, machine lost); run the sweep again with --retry-failed to try again")
            record_failure(sweep, cell, run_dir, error, attempts[-1].number)
