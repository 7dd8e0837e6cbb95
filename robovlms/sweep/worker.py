"""The worker loop: take waiting cells (grid) or sample new trials (search) until none is left, run each, and
tell Optuna its value."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L

from robovlms.results import read_training_curve
from robovlms.sweep.cells import Cell, check_cell, make_cell_id, merge, nested, search_base
from robovlms.sweep.config import SweepConfig
from robovlms.sweep.failures import CellFailed, record_failure
from robovlms.sweep.one_cell import run_cell


def _grid_objective(sweep: SweepConfig, cells: list[Cell], run_dir: Path, progress: bool):
    import optuna
    from optuna.trial import TrialState

    by_id = {cell.cell_id: cell for cell in cells}

    def objective(trial) -> float:
        cell_id = trial.suggest_categorical("cell", list(by_id))
        trials = trial.study.get_trials(deepcopy=False)
        if "fixed_params" not in next(t for t in trials if t.number == trial.number).system_attrs:
            raise optuna.TrialPruned("no cell was waiting: another worker took the last one")
        done = [t for t in trials if t.params.get("cell") == cell_id and t.state == TrialState.COMPLETE]
        if done:
            raise optuna.TrialPruned(f"cell {cell_id} was already completed by trial {done[0].number}")
        cell = by_id[cell_id]
        try:
            result = run_cell(sweep, cell, run_dir, trial_number=trial.number, progress=progress)
        except Exception as error:  # noqa: BLE001 - any error of a cell is recorded, and the sweep goes on
            message = record_failure(sweep, cell, run_dir, error, trial.number)
            trial.set_user_attr("error", message)
            raise CellFailed(message) from error
        trial.set_user_attr("successes", result.successes)
        trial.set_user_attr("episodes", result.episodes)
        return result.success

    return objective


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
        callbacks = (OptunaPruning(trial),) if search.prune else ()
        try:
            check_cell(cell)
            result = run_cell(sweep, cell, run_dir, callbacks=callbacks, trial_number=trial.number, progress=progress)
        except optuna.TrialPruned:
            raise
        except Exception as error:  # noqa: BLE001
            message = record_failure(sweep, cell, run_dir, error, trial.number)
            trial.set_user_attr("error", message)
            raise CellFailed(message) from error
        trial.set_user_attr("success", result.success)
        if search.objective == "success":
            return result.success
        curve = read_training_curve(run_dir, cell.cell_id)
        if "val/loss" not in curve or curve["val/loss"].dropna().empty:
            raise CellFailed("objective val_loss needs train.validation_fraction > 0")
        return float(curve["val/loss"].dropna().iloc[-1])

    return objective


def _earlier_trial_with_params(trial):
    """An earlier trial (complete, pruned or running) that drew the same parameters: possible in an integer or
    categorical space."""
    from optuna.trial import TrialState

    considered = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return next((other for other in trial.study.get_trials(deepcopy=False, states=considered)
                 if other.number < trial.number and other.params == trial.params), None)


def _search_cell_id(trial, training: dict) -> str:
    """A search cell's id holds its trial's number (the first attempt's, when a trial is retried after its worker
    died, so that training resumes), so no two trials ever share a cell directory."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    frozen = next(other for other in trial.study.get_trials(deepcopy=False) if other.number == trial.number)
    number = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return f"search-{trial.number if number is None else number:04d}-{make_cell_id(training)}"


class OptunaPruning(L.Callback):
    """Reports the validation loss to the trial after each validation, and stops a trial the pruner gives up on."""

    def __init__(self, trial):
        self.trial = trial

    def on_validation_end(self, trainer, module) -> None:
        import optuna

        value = trainer.callback_metrics.get("val/loss")
        if value is None:
            return
        self.trial.report(float(value), step=trainer.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {trainer.global_step}: val/loss {float(value):.4f}")


def work(study, sweep: SweepConfig, cells: list[Cell], run_dir: Path, mode: str, *, wait: bool = False,
         progress: bool = False, on_change: Callable[[], None] | None = None) -> None:
    """Take waiting cells until none is left; with `wait`, until no other worker holds one either (dead workers'
    cells go stale and come back to the queue, so a re-run after a crash finishes the sweep)."""
    import optuna
    from optuna.trial import TrialState

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    search = mode == "search"
    objective = (_search_objective(sweep, search_base(sweep), run_dir, progress) if search
                 else _grid_objective(sweep, cells, run_dir, progress))
    while True:
        optuna.storages.fail_stale_trials(study)
        states = [trial.state for trial in study.get_trials(deepcopy=False)]
        if search:
            finished = sum(state.is_finished() for state in states)
            if finished + states.count(TrialState.RUNNING) < sweep.search.trials or TrialState.WAITING in states:
                study.optimize(objective, n_trials=1, catch=(CellFailed,))
            elif wait and TrialState.RUNNING in states:
                time.sleep(1)
            else:
                return
        elif TrialState.WAITING in states:
            study.optimize(objective, n_trials=1, catch=(CellFailed,))
        elif wait and TrialState.RUNNING in states:
            time.sleep(1)
        else:
            return
        if on_change is not None:
            on_change()
