"""Failure records: a cell that raises, or whose workers died in every retry, is committed as failed with the
reason, so reports list it and the sweep goes on. A cell whose simulator died is not failed by the first death: that
is the machine's or the simulator's failure, not the policy's, and the worker runs the cell again."""

from __future__ import annotations

import errno
import logging
import traceback
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from robovlms.atomic_files import write_atomically
from robovlms.errors import RobovlmsError, SimulatorDied
from robovlms.results import CELLS_DIR, TRAIN_DIR, CellResult, read_cell_result, software_versions, write_cell_result
from robovlms.sweep.cells import Cell
from robovlms.sweep.config import SweepConfig, evaluation_split
from robovlms.sweep.study import cell_trials

logger = logging.getLogger(__name__)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
ERROR_FILE = "error.txt"  # a failed cell's traceback, beside its result.json
SIMULATOR_ATTEMPTS = 3  # a cell whose simulator died is run at most this many times by one worker


class CellFailed(RobovlmsError):
    """A cell raised; its error is recorded in its result.json and the sweep goes on."""


def is_infrastructure_failure(error: BaseException) -> bool:
    """Whether `error` says the simulator died (a simulator process, or an evaluation worker process holding one)
    rather than that the cell itself is wrong."""
    return isinstance(error, (SimulatorDied, BrokenProcessPool))


def record_failure(sweep: SweepConfig, cell: Cell, run_dir: Path, error: BaseException, trial_number: int | None
                    ) -> str:
    """Commit a cell as failed: error.txt (the traceback), then result.json. Never raises for what the disk refuses
    (full, say): what cannot be written is logged and skipped, so the trial is still told; a cell left without a
    result.json runs again when the sweep does. Returns the error's message."""
    message = f"{type(error).__name__}: {error}"
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        message += (f" (the disk of {run_dir} is full: free space, then run the sweep again with --retry-failed)")
    if is_infrastructure_failure(error):
        message += (f"\n(the simulator died in all {SIMULATOR_ATTEMPTS} attempts at this cell: a failure of the "
                    f"machine or the simulator, not of the policy; run the sweep again with --retry-failed to try "
                    f"again)")
    cell_dir = run_dir / CELLS_DIR / cell.cell_id
    try:
        cell_dir.mkdir(parents=True, exist_ok=True)
        details = "".join(traceback.format_exception(error))
        write_atomically(cell_dir / ERROR_FILE, lambda temporary: temporary.write_text(details))
    except OSError as failure:
        logger.warning(f"cell {cell.cell_id} failed and its traceback could not be written to {ERROR_FILE} ({failure})")
    try:
        result = _failed_result(sweep, cell, message, trial_number)
        result.train_seconds = _training_seconds(cell_dir / TRAIN_DIR)  # training a cell did before it failed counts
        write_cell_result(cell_dir, result)
    except OSError as failure:
        logger.warning(f"cell {cell.cell_id} failed ({message}) and its result.json could not be written "
                       f"({failure}); the sweep's ledger records the error, and the cell runs again when the sweep "
                       f"does")
    return message


def _failed_result(sweep: SweepConfig, cell: Cell, message: str, trial_number: int | None) -> CellResult:
    from robovlms.training import load_config

    result = CellResult(cell_id=cell.cell_id, status="failed", kind=cell.kind, benchmark=sweep.benchmark.name,
                        split=sweep.benchmark.split, evaluation_split=evaluation_split(sweep),
                        policy=cell.policy, error=message, axes=cell.axes,
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


def _training_seconds(train_dir: Path) -> float | None:
    from robovlms.training import training_seconds

    try:
        return training_seconds(train_dir)
    except RobovlmsError:  # a damaged record of the time; the failure is what matters here
        return None


def clear_failure(run_dir: Path, cell: Cell) -> None:
    """Remove the traceback of an earlier failed attempt at a cell that has now completed."""
    (run_dir / CELLS_DIR / cell.cell_id / ERROR_FILE).unlink(missing_ok=True)


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
