"""The ledger and the queue: an Optuna study per sweep (SQLite in the run directory by default, PostgreSQL for
many machines), one trial per cell. Workers pop waiting trials atomically; a worker's heartbeat keeps its trial
alive, and a dead worker's trial goes stale and is re-enqueued."""

from __future__ import annotations

import warnings
from pathlib import Path

from robovlms.data.store import EpisodeStore
from robovlms.errors import ConfigError
from robovlms.results import CELLS_DIR, read_cell_result
from robovlms.sweep.cells import Cell, fingerprint, sweep_cells
from robovlms.sweep.config import SweepConfig, load_sweep
from robovlms.sweep.one_cell import sweep_benchmark

STUDY_SPEC = "robovlms_sweep"  # study user attributes: the validated sweep file and its fingerprint
STUDY_FINGERPRINT = "robovlms_fingerprint"
STUDY_MODE = "robovlms_mode"  # "grid" (`robovlms sweep`) or "search" (`robovlms tune`, study "<name>-search")
MAX_RETRIES = 3  # a cell whose worker died this many times is left failed


def storage_url(sweep: SweepConfig, url: str | None = None) -> str:
    if url or sweep.storage:
        return url or sweep.storage
    Path(sweep.run_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(sweep.run_dir).resolve() / 'optuna.db'}"


def open_storage(url: str, heartbeat_seconds: int | None = None):
    """An Optuna RDB storage with heartbeats; a worker whose trial goes stale has it re-enqueued."""
    import optuna
    import sqlalchemy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if url.startswith("sqlite"):
        # sqlite3 in autocommit mode, so that each transaction's BEGIN is ours (see below)
        engine = {"connect_args": {"timeout": 60, "isolation_level": None}}
    else:
        engine = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    heartbeat = {}
    if heartbeat_seconds:
        heartbeat = {"heartbeat_interval": heartbeat_seconds, "grace_period": 2 * heartbeat_seconds,
                     "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRIES)}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, **heartbeat)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
        raise ConfigError(f"cannot reach the Optuna storage {redact(url)}: {str(error).splitlines()[0]}") from None
    if url.startswith("sqlite"):
        # SQLite ignores the SELECT ... FOR UPDATE with which Optuna pops a waiting trial, so two workers could
        # both read it as waiting and run the same cell; a transaction that takes the write lock when it begins
        # makes the pop atomic.
        sqlalchemy.event.listen(storage.engine, "begin", lambda connection: connection.exec_driver_sql(
            "BEGIN IMMEDIATE"))
    return storage


def redact(url: str) -> str:
    """A storage URL without its password, for messages."""
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    if ":" in credentials:
        return f"{scheme}://{credentials.split(':')[0]}:***@{host}"
    return url


def study_name(sweep: SweepConfig, mode: str) -> str:
    return sweep.name if mode == "grid" else f"{sweep.name}-search"


def _sampler(sweep: SweepConfig, cells: list[Cell], mode: str):
    import optuna

    if mode == "search":
        from robovlms.sweep.search_sampler import TrialSeededTPESampler

        return TrialSeededTPESampler(sweep.search.seed)
    return optuna.samplers.GridSampler({"cell": [cell.cell_id for cell in cells]}, seed=0)


def open_study(sweep: SweepConfig, cells: list[Cell], url: str, mode: str, *, create: bool):
    """The sweep's study: created (create=True) or joined. A study made by another sweep file is refused."""
    import optuna

    storage = open_storage(url, sweep.heartbeat_seconds)
    name, mine = study_name(sweep, mode), fingerprint(sweep, cells)
    if name in {summary.study_name for summary in optuna.get_all_study_summaries(storage)}:
        study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler(sweep, cells, mode),
                                  pruner=_pruner(sweep, mode))
        if study.user_attrs.get(STUDY_FINGERPRINT) != mine:
            raise ConfigError(f"study {name!r} in {redact(url)} belongs to another sweep file (other cells or "
                              f"settings); give this sweep another name, or re-run the file that made it")
        return study
    if not create:
        raise ConfigError(f"no study {name!r} in {redact(url)}; start it with `robovlms sweep FILE`")
    direction = "minimize" if mode == "search" and sweep.search.objective == "val_loss" else "maximize"
    study = optuna.create_study(study_name=name, storage=storage, direction=direction,
                                sampler=_sampler(sweep, cells, mode), pruner=_pruner(sweep, mode), load_if_exists=True)
    study.set_user_attr(STUDY_SPEC, sweep.model_dump(mode="json"))
    study.set_user_attr(STUDY_MODE, mode)
    study.set_user_attr(STUDY_FINGERPRINT, mine)
    return study


def _pruner(sweep: SweepConfig, mode: str):
    import optuna

    if mode == "search" and sweep.search.prune:
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    return optuna.pruners.NopPruner()


def join_study(url: str, name: str):
    """A worker's view of a running sweep: the study, its sweep file, cells and mode, from the storage alone."""
    import optuna

    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"no sweep storage at {url}: the SQLite file does not exist")
    storage = open_storage(url)
    if name not in {summary.study_name for summary in optuna.get_all_study_summaries(storage)}:
        raise ConfigError(f"no study {name!r} in {redact(url)}; start it with `robovlms sweep FILE`")
    attributes = optuna.load_study(study_name=name, storage=storage).user_attrs
    if STUDY_SPEC not in attributes:
        raise ConfigError(f"study {name!r} in {redact(url)} was not made by `robovlms sweep` or `robovlms tune`")
    sweep, mode = load_sweep(attributes[STUDY_SPEC]), attributes[STUDY_MODE]
    sweep_benchmark(sweep, EpisodeStore(sweep.store.path)).check_available()  # before this machine takes a cell
    cells = sweep_cells(sweep, mode)
    return open_study(sweep, cells, url, mode, create=False), sweep, cells, mode


def cell_trials(study) -> dict[str, list]:
    by_cell: dict[str, list] = {}
    for trial in study.get_trials(deepcopy=False):
        cell = trial.system_attrs.get("fixed_params", {}).get("cell", trial.params.get("cell"))
        if cell is not None:
            by_cell.setdefault(cell, []).append(trial)
    return by_cell


def enqueue_cells(study, cells: list[Cell], run_dir: Path, retry_failed: bool = False) -> list[str]:
    """Enqueue every cell that is neither complete, queued, running, nor (unless retry_failed) failed by its own
    error. A cell whose worker was killed has no result: it is enqueued again."""
    from optuna.trial import TrialState

    trials = cell_trials(study)
    enqueued = []
    for cell in cells:
        states = {trial.state for trial in trials.get(cell.cell_id, [])}
        if states & {TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING}:
            continue
        result = read_cell_result(run_dir / CELLS_DIR / cell.cell_id)
        if result is not None and result.status == "failed" and not retry_failed:
            continue
        study.enqueue_trial({"cell": cell.cell_id})
        enqueued.append(cell.cell_id)
    return enqueued
