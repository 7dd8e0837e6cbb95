"""`robovlms sweep FILE` and `robovlms tune FILE`: validate, open the study, enqueue, run workers, gather."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from robovlms.atomic_files import (remove_leftovers, why_directory_cannot_be_made, write_atomically,
                                   write_json_atomically)
from robovlms.baselines import check_baseline_data
from robovlms.errors import ConfigError
from robovlms.results import (
    CELLS_DIR,
    RESULTS_DIR,
    SEARCH_BEST_FILE,
    SEARCH_TRIALS_FILE,
    SWEEP_FILE,
    gather,
    read_cell_result,
)
from robovlms.sweep.cells import Cell, check_cells_build, check_cells_on_store, search_base, sweep_cells
from robovlms.sweep.config import evaluation_split, load_sweep, with_evaluation_split
from robovlms.sweep.failures import record_abandoned
from robovlms.sweep.gpus import assign_gpus, cell_devices, describe_worker_gpus, worker_environment
from robovlms.sweep.one_cell import check_evaluated_tasks, ensure_store, sweep_benchmark
from robovlms.sweep.study import (abandoned, cell_trials, count_cell_errors, count_trials, creating_study,
                                  enqueue_cells, enqueue_search_trials, ledger_errors, open_study, search_attempts,
                                  storage_url, study_name)
from robovlms.sweep.worker import work
from robovlms.training.launch import SWEEP_VARIABLE

PROGRESS_SECONDS = 1.0  # between progress reports, so that reporting costs nothing beside cells that take no time


@dataclass
class SweepStatus:
    cells: int  # a grid's cells, or a search's trials
    done: int = 0
    running: int = 0
    failed: int = 0
    waiting: int = 0
    pruned: int = 0
    unit: str = "cells"  # "trials" for a search


def sweep_status(study, cells: list[Cell], run_dir: Path, trials: int | None = None) -> SweepStatus:
    """A grid's cells done, running, waiting and failed; for a search (`trials`, its number of trials), its trials
    complete, pruned, running, waiting and failed (by an error, or abandoned after its workers died in every
    retry; a trial whose worker died once is retried, not failed)."""
    from optuna.trial import TrialState

    if trials is not None:
        found = study.get_trials(deepcopy=False)
        states = [trial.state for trial in found]
        failed = sum(t.state == TrialState.FAIL and "error" in t.user_attrs for t in found)
        failed += sum(abandoned(attempts) for attempts in search_attempts(study).values())
        return SweepStatus(cells=trials, done=states.count(TrialState.COMPLETE), running=states.count(TrialState.RUNNING),
                           failed=failed, waiting=states.count(TrialState.WAITING),
                           pruned=states.count(TrialState.PRUNED), unit="trials")
    status = SweepStatus(cells=len(cells))
    trials = cell_trials(study)
    for cell in cells:
        states = {trial.state for trial in trials.get(cell.cell_id, [])}
        result = read_cell_result(run_dir / CELLS_DIR / cell.cell_id)
        if TrialState.COMPLETE in states:
            status.done += 1
        elif TrialState.RUNNING in states:
            status.running += 1
        elif TrialState.WAITING in states:
            status.waiting += 1
        elif (result is not None and result.status == "failed") or any(
                trial.state == TrialState.FAIL and "error" in trial.user_attrs for trial in trials.get(cell.cell_id, [])):
            status.failed += 1  # by its result, or by the ledger alone when its result could not be written
    return status


def ledger_status(study, cells: list[Cell]) -> SweepStatus:
    """Progress from trial counts alone, as cheap at 10,000 cells as at 10 (sweep_status reads every trial). A cell
    queued again with --retry-failed counts as failed until it ends."""
    from optuna.trial import TrialState

    counts = count_trials(study)
    return SweepStatus(cells=len(cells), done=counts.get(TrialState.COMPLETE, 0),
                       running=counts.get(TrialState.RUNNING, 0), waiting=counts.get(TrialState.WAITING, 0),
                       failed=count_cell_errors(study))


def prepare_sweep(path: str | Path, storage: str | None = None, retry_failed: bool = False, mode: str = "grid"):
    """Validate a sweep file, open (or create) its study, make its store if asked, enqueue unfinished cells."""
    sweep = with_evaluation_split(load_sweep(path), mode)
    cells = sweep_cells(sweep, mode)
    checked = cells if mode == "grid" else [search_base(sweep)]
    run_dir = Path(sweep.run_dir)
    check_run_dir(run_dir)
    planned = sweep_benchmark(sweep, None)  # name, split, options and evaluation split, before a store is made
    planned.split_episodes(sweep.benchmark.split, sweep.evaluation.split, 1)  # with them
    check_cells_build(checked, planned.action_dim, planned.state_dim, sweep.evaluation.execution)
    store = ensure_store(sweep)
    store.verify()
    benchmark = sweep_benchmark(sweep, store)
    benchmark.check_available()
    check_evaluated_tasks(sweep, store, benchmark)
    check_cells_on_store(checked, store, benchmark)
    for baseline in sweep.baselines:
        check_baseline_data(baseline, benchmark, store.path)
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused sweep file leaves no study behind
    for directory in (run_dir, run_dir / RESULTS_DIR):
        remove_leftovers(directory)  # of a sweep killed while writing sweep.yaml or gathering
    url = storage_url(sweep, storage)
    with creating_study(url, study_name(sweep, mode)):  # sweeps started at once create and queue it once
        study = open_study(sweep, cells, url, mode, create=True)
        spec = yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False)
        write_atomically(run_dir / SWEEP_FILE, lambda temporary: temporary.write_text(spec))
        if mode == "search":
            enqueue_search_trials(study, sweep.search.trials)
        else:
            enqueue_cells(study, cells, run_dir, retry_failed)
    return sweep, cells, study, url


def check_run_dir(run_dir: Path) -> None:
    """The run directory is, or can be made as, a directory."""
    reason = why_directory_cannot_be_made(run_dir)
    if reason is not None:
        raise ConfigError(f"run_dir {run_dir} cannot be made: {reason}")


def run_sweep(path: str | Path, *, workers: int = 1, storage: str | None = None, retry_failed: bool = False,
              mode: str = "grid", progress: Callable[[SweepStatus], None] | None = None,
              notice: Callable[[str], None] | None = None) -> SweepStatus:
    """`robovlms sweep FILE` (mode grid) and `robovlms tune FILE` (mode search): every cell trained, evaluated and
    recorded, results gathered into the run directory. With `workers` > 1 on a machine with GPUs each worker gets
    its own (robovlms/sweep/gpus.py); `notice` is told which."""
    gpus = assign_gpus(cell_devices(load_sweep(path), mode), workers) if workers > 1 else None
    sweep, cells, study, url = prepare_sweep(path, storage, retry_failed, mode)
    run_dir = Path(sweep.run_dir)
    trials = sweep.search.trials if mode == "search" else None

    last_report = -float("inf")

    def report() -> None:
        nonlocal last_report
        if progress is not None and time.monotonic() - last_report >= PROGRESS_SECONDS:
            progress(ledger_status(study, cells) if mode == "grid" else sweep_status(study, cells, run_dir, trials))
            last_report = time.monotonic()

    with ledger_errors(url):
        report()
        if workers <= 1:
            if notice is not None:
                notice(describe_worker_gpus())
            work(study, sweep, cells, run_dir, mode, wait=True, on_change=report)
        else:
            run_worker_processes(study.study_name, url, workers, run_dir, gpus, report, notice)
            work(study, sweep, cells, run_dir, mode, wait=True, on_change=report)  # what died with a worker
        record_abandoned(study, sweep, cells, run_dir)
        status = sweep_status(study, cells, run_dir, trials)
    if progress is not None:
        progress(status)
    gather(run_dir)
    if mode == "search":
        write_search_results(study, run_dir, sweep.search.objective, evaluation_split(sweep))
    return status


def run_worker_processes(name: str, url: str, workers: int, run_dir: Path, gpus: list[list[str]] | None,
                         report: Callable, notice: Callable[[str], None] | None = None) -> None:
    """`workers` processes of `robovlms worker` on this machine, each with its own GPUs (`gpus`: one list per
    worker, or None), logging to the run directory's logs/worker-N.log; they die with this process."""
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    processes = []
    for index in range(workers):
        log = open(logs / f"worker-{index}.log", "a")
        command = [sys.executable, "-m", "robovlms.cli", "worker", "--storage", url, "--study", name,
                   "--run-dir", str(run_dir)]
        threads = str(max(1, (os.cpu_count() or 1) // workers))  # workers share the cores instead of fighting
        environment = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                       **worker_environment(gpus[index] if gpus else None, index, workers),
                       SWEEP_VARIABLE: str(os.getpid())}
        if notice is not None:
            notice(f"worker {index}/{workers}: " + (f"GPUs {','.join(gpus[index])}" if gpus else "no GPU, the CPU")
                   + f", log {logs / f'worker-{index}.log'}")
        processes.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment), log))
    try:
        while any(process.poll() is None for process, _ in processes):
            report()
            time.sleep(2)
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.terminate()
                process.wait()
            log.close()


def write_search_results(study, run_dir: Path, objective: str, split: str) -> None:
    """results/trials.csv: every trial of the search (Optuna's trials_dataframe: number, state, value, params_*,
    user_attrs_cell, ...), and results/best.json: the best complete trial, the objective and the evaluation split
    its success was measured on."""
    from optuna.trial import TrialState

    trials = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "duration"))
    write_atomically(run_dir / RESULTS_DIR / SEARCH_TRIALS_FILE,
                     lambda temporary: trials.to_csv(temporary, index=False))
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return
    best = study.best_trial
    write_json_atomically(run_dir / RESULTS_DIR / SEARCH_BEST_FILE,
                          {"trial": best.number, "value": best.value, "params": best.params,
                           "cell": best.user_attrs.get("cell"), "objective": objective, "evaluation_split": split,
                           "direction": study.direction.name.lower()})
