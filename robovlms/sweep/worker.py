"""The worker loop: take waiting cells (grid) or sample new trials (search) until none is left, run each, and
tell Optuna its value."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from robovlms.results import CELLS_DIR, CellResult, read_cell_result, read_training_curve
from robovlms.sweep.cells import Cell, check_cell, make_cell_id, merge, nested, search_base
from robovlms.sweep.config import SweepConfig
from robovlms.sweep.failures import (SIMULATOR_ATTEMPTS, CellFailed, clear_failure, is_infrastructure_failure,
                                     record_failure)
from robovlms.sweep.one_cell import CellReleased, run_cell
from robovlms.sweep.startup import plugin_names, warm_up
from robovlms.sweep.study import count_trials, pop_waiting_trial, popped_cell, trial_state

logger = logging.getLogger(__name__)


def _search_objective(sweep: SweepConfig, base: Cell, run_dir: Path, progress: bool):
    import optuna
    from optuna.trial import TrialState

    search = sweep.search

    def objective(trial) -> float:
        sampled = {}
        for key, dimension in search.space.items():
            if dimension.type == "categorical":
                sampled[key] = trial.suggest_categorical(key, dimension.choices)
            elif dimension.type == "int":
                sampled[key] = trial.suggest_int(key, int(dimension.low), int(dimension.high), log=dimension.log)
            else:
                sampled[key] = trial.suggest_float(key, dimension.low, dimension.high, log=dimension.log)
        earlier = _earlier_trial_with_params(trial)
        if earlier is not None:
            trial.set_user_attr("duplicate_of", earlier.number)
            if earlier.state == TrialState.COMPLETE:  # Optuna's FAQ: a repeated point takes its earlier value
                return earlier.value
            raise optuna.TrialPruned(f"the parameters of trial {earlier.number}, which is {earlier.state.name}")
        training = base.training
        for key, value in sampled.items():
            training = merge(training, nested(key, value))
        cell = Cell(_search_cell_id(trial, training), "trained", training, sampled)
        trial.set_user_attr("cell", cell.cell_id)
        on_validation = prune_on_validation(trial) if search.prune else None
        try:
            check_cell(cell)
            result = _run_cell_retrying_simulator_deaths(sweep, cell, run_dir, on_validation=on_validation,
                                                         trial_number=trial.number, progress=progress)
        except optuna.TrialPruned:
            raise
        except Exception as error:  # noqa: BLE001
            message = record_failure(sweep, cell, run_dir, error, trial.number)
            trial.set_user_attr("error", message)
            raise CellFailed(message) from error
        trial.set_user_attr("success", result.success)
        trial.set_user_attr("evaluation_split", result.evaluation_split)
        if search.objective == "success":  # on the validation episodes unless the sweep file names test
            return result.success
        curve = read_training_curve(run_dir, cell.cell_id)
        if "val/loss" not in curve or curve["val/loss"].dropna().empty:
            raise CellFailed("objective val_loss needs train.validation_fraction > 0")
        return float(curve["val/loss"].dropna().iloc[-1])

    return objective


def _earlier_trial_with_params(trial):
    """An earlier trial that drew the same parameters (possible in an integer or categorical space): a finished one
    (complete or pruned), or one running that was queued before this one."""
    from optuna.trial import TrialState

    considered = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return next((other for other in trial.study.get_trials(deepcopy=False, states=considered)
                 if other.number != trial.number and other.params == trial.params
                 and (other.state != TrialState.RUNNING or other.number < trial.number)), None)


def _search_cell_id(trial, training: dict) -> str:
    """A search cell's id holds its trial's number (the first attempt's, when a trial is retried after its worker
    died, so that training resumes), so no two trials ever share a cell directory."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    frozen = next(other for other in trial.study.get_trials(deepcopy=False) if other.number == trial.number)
    number = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return f"search-{trial.number if number is None else number:04d}-{make_cell_id(training)}"


def prune_on_validation(trial) -> Callable[[int, dict[str, float]], None]:
    """Reports the validation loss to the trial after each validation, and stops a trial the pruner gives up on.
    Called in the worker, also for a cell trained by several processes (robovlms/training/launch.py)."""

    def report(step: int, metrics: dict[str, float]) -> None:
        import optuna

        value = metrics.get("val/loss")
        if value is None:
            return
        trial.report(value, step=step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: val/loss {value:.4f}")

    return report


def work(study, sweep: SweepConfig, cells: list[Cell], run_dir: Path, mode: str, *, wait: bool = False,
         progress: bool = False, on_change: Callable[[], None] | None = None) -> None:
    """Take waiting cells until none is left; with `wait`, until no other worker holds one either (dead workers'
    cells go stale and come back to the queue, so a re-run after a crash finishes the sweep)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    trainings = [cell.training for cell in cells if cell.kind == "trained"] or [search_base(sweep).training]
    seconds = warm_up(*plugin_names(trainings))  # before the first cell's clock starts (robovlms/sweep/startup.py)
    logger.info(f"worker ready in {seconds:.1f} s")
    if mode == "search":
        _work_search(study, sweep, run_dir, wait, progress, on_change)
        return
    by_id = {cell.cell_id: cell for cell in cells}
    checked_stale = -float("inf")
    while True:
        if time.monotonic() - checked_stale >= sweep.heartbeat_seconds:  # a trial goes stale in 2 heartbeats
            fail_stale_trials(study)
            checked_stale = time.monotonic()
        popped = pop_waiting_trial(study)
        if popped is None:
            fail_stale_trials(study)
            checked_stale = time.monotonic()
            popped = pop_waiting_trial(study)
        if popped is not None:
            _run_trial(study, *popped, sweep, by_id, run_dir, progress)
        elif wait and count_trials(study).get(TrialState.RUNNING):
            time.sleep(1)
        else:
            return
        if on_change is not None:
            on_change()


def _run_trial(study, trial_id: int, number: int, sweep: SweepConfig, by_id: dict[str, Cell], run_dir: Path,
               progress: bool) -> None:
    """Run a popped trial's cell and tell Optuna how it ended. The attempt that commits the cell's files is the one
    still running in the ledger: one taken for dead (its heartbeat lapsed under load) was failed and re-enqueued by
    another worker, so it drops its result, logs it and goes on."""
    cell = by_id[popped_cell(study, trial_id)]

    def holds_cell() -> bool:
        return trial_state(study, trial_id) == TrialState.RUNNING

    completed_by = _completed_by(study, cell, run_dir, number)
    if completed_by is not None:  # enqueued twice by sweeps started at the same time
        study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        logger.warning(f"cell {cell.cell_id} was already completed by trial {completed_by}; trial {number} "
                       f"is pruned")
        return
    try:
        with get_heartbeat_thread(trial_id, study._storage):
            result = _run_cell_retrying_simulator_deaths(sweep, cell, run_dir, trial_number=number,
                                                         progress=progress, holds_cell=holds_cell)
    except CellReleased:
        _log_released(cell, number)
        return
    except Exception as error:  # noqa: BLE001 - any error of a cell is recorded, and the sweep goes on
        if not holds_cell():
            _log_released(cell, number)
            return
        message = record_failure(sweep, cell, run_dir, error, number)
        _tell(study, trial_id, number, cell, TrialState.FAIL, None, {"error": message})
        return
    except BaseException:  # interrupted: the cell goes back to the queue at once, not after its heartbeat lapses
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        raise
    _tell(study, trial_id, number, cell, TrialState.COMPLETE, result.success, {})


def _run_cell_retrying_simulator_deaths(sweep: SweepConfig, cell: Cell, run_dir: Path, **options) -> CellResult:
    """run_cell, run again when its simulator died (training resumes from its last checkpoint, so only the
    evaluation is repeated), at most SIMULATOR_ATTEMPTS times in all; an earlier attempt's error.txt is removed once
    the cell completes."""
    for attempt in range(1, SIMULATOR_ATTEMPTS + 1):
        try:
            result = run_cell(sweep, cell, run_dir, **options)
        except Exception as error:
            if not is_infrastructure_failure(error) or attempt == SIMULATOR_ATTEMPTS:
                raise
            logger.warning(f"cell {cell.cell_id}: the simulator died ({str(error).splitlines()[0]}); running the "
                           f"cell again, attempt {attempt + 1} of {SIMULATOR_ATTEMPTS}")
        else:
            clear_failure(run_dir, cell)
            return result
    raise AssertionError("unreachable")


def _completed_by(study, cell: Cell, run_dir: Path, number: int) -> int | None:
    """The other trial that completed this cell, from the cell's result and that one trial alone."""
    result = read_cell_result(run_dir / CELLS_DIR / cell.cell_id)
    if result is None or result.status != "complete" or result.trial in (None, number):
        return None
    try:
        other = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, result.trial)
    except KeyError:
        return None
    return result.trial if study._storage.get_trial(other).state == TrialState.COMPLETE else None


def _tell(study, trial_id: int, number: int, cell: Cell, state: TrialState, value: float | None,
          attributes: dict) -> None:
    """Finish the trial in the storage (a grid has no sampler to tell), unless another worker failed it first."""
    try:
        for key, attribute in attributes.items():
            study._storage.set_trial_user_attr(trial_id, key, attribute)
        study._storage.set_trial_state_values(trial_id, state, None if value is None else [value])
    except UpdateFinishedTrialError:  # failed by another worker between the commit and this
        _log_released(cell, number)


def _log_released(cell: Cell, number: int) -> None:
    logger.warning(f"trial {number} of cell {cell.cell_id} was taken for dead by another worker (its heartbeat "
                   f"lapsed) and the cell re-run; this attempt's result is dropped and the worker goes on")


def _work_search(study, sweep: SweepConfig, run_dir: Path, wait: bool, progress: bool,
                 on_change: Callable[[], None] | None) -> None:
    """Pop the search's queued trials (its budget, queued when `robovlms tune` starts, and retries of killed ones)
    until none is left; a worker never asks for a trial beyond them."""
    objective = _search_objective(sweep, search_base(sweep), run_dir, progress)
    checked_stale = -float("inf")
    while True:
        if time.monotonic() - checked_stale >= sweep.heartbeat_seconds:
            fail_stale_trials(study)
            checked_stale = time.monotonic()
        popped = pop_waiting_trial(study)
        if popped is None:
            fail_stale_trials(study)  # a dead worker's trial comes back as a retry
            checked_stale = time.monotonic()
            popped = pop_waiting_trial(study)
        if popped is not None:
            _run_search_trial(study, popped[0], objective)
        elif wait and count_trials(study).get(TrialState.RUNNING):
            time.sleep(1)
        else:
            return
        if on_change is not None:
            on_change()


def _run_search_trial(study, trial_id: int, objective: Callable) -> None:
    """Run the objective on a popped trial under its heartbeat and tell how it ended, unless another worker took
    this one for dead and failed it meanwhile: then it is logged and dropped, as for a grid's cells (the retry
    trains the same cell)."""
    import optuna

    trial = optuna.Trial(study, trial_id)  # the sampler draws its parameters as the objective suggests them
    value, state = None, TrialState.COMPLETE
    try:
        with get_heartbeat_thread(trial_id, study._storage):
            value = objective(trial)
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except CellFailed:
        state = TrialState.FAIL
    except UpdateFinishedTrialError:  # the objective wrote to a trial another worker had failed meanwhile
        pass
    except BaseException:  # interrupted: the trial is failed now (the next `robovlms tune` retries it), not after
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)  # its heartbeat lapses
        raise
    if trial_state(study, trial_id).is_finished():
        logger.warning(f"search trial {trial.number} was taken for dead by another worker (its heartbeat lapsed) "
                       f"and retried; this attempt's result is dropped and the worker goes on")
        return
    study.tell(trial, value, state=state, skip_if_finished=True)
