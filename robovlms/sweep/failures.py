"""Failure records: a cell that raises, or whose workers died in every retry, is committed as failed with the
reason, so reports list it and the sweep goes on."""

from __future__ import annotations

import errno
import logging
import traceback
from pathlib import Path

from robovlms.atomic_files import write_atomically
from robovlms.errors import RobovlmsError
from robovlms.results import CELLS_DIR, CellResult, read_cell_result, software_versions, write_cell_result
from robovlms.sweep.cells import Cell
from robovlms.sweep.config import SweepConfig
from robovlms.sweep.study import cell_trials

logger = logging.getLogger(__name__)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CellFailed(RobovlmsError):
    """A cell raised; its error is recorded in its result.json and the sweep goes on."""


def record_failure(sweep: SweepConfig, cell: Cell, run_dir: Path, error: BaseException, trial_number: int | None
                    ) -> str:
    """Commit a cell as failed: error.txt (the traceback), then result.json. Never raises for what the disk refuses
    (full, say): what cannot be written is logged and skipped, so the trial is still told; a cell left without a
    result.json runs again when the sweep does. Returns the error in one line."""
    message = f"{type(error).__name__}: {error}"
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        message += (f" (the disk of {run_dir} is full: free space, then run the sweep again with --retry-failed)")
    cell_dir = run_dir / CELLS_DIR / cell.cell_id
    try:
        cell_dir.mkdir(parents=True, exist_ok=True)
        details = "".join(traceback.format_exception(error))
        write_atomically(cell_dir / "error.txt", lambda temporary: temporary.write_text(details))
    except OSError as failure:
        logger.warning(f"cell {cell.cell_id} failed and its traceback could not be written to error.txt ({failure})")
    try:
        write_cell_result(cell_dir, _failed_result(sweep, cell, message, trial_number))
    except OSError as failure:
        logger.warning(f"cell {cell.cell_id} failed ({message}) and its result.json could not be written "
                       f"({failure}); the sweep's ledger records the error, and the cell runs again when the sweep "
                       f"does")
    return message


def _failed_result(sweep: SweepConfig, cell: Cell, message: str, trial_number: int | None) -> CellResult:
    from robovlms.training import load_config

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
    return result


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
