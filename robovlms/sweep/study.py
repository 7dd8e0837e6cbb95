"""The ledger and the queue: an Optuna study per sweep (SQLite in the run directory by default, PostgreSQL for
many machines), one trial per cell. Workers pop waiting trials atomically; a worker's heartbeat keeps its trial
alive, and a dead worker's trial goes stale and is re-enqueued."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import sys
import time
import warnings
import weakref
from pathlib import Path

from robovlms.data.store import EpisodeStore
from robovlms.errors import ConfigError, LedgerError
from robovlms.results import CELLS_DIR, read_cell_result
from robovlms.sweep.cells import Cell, fingerprint, sweep_cells
from robovlms.sweep.config import SweepConfig, load_sweep
from robovlms.sweep.one_cell import sweep_benchmark

STUDY_SPEC = "robovlms_sweep"  # study user attributes: the validated sweep file and its fingerprint
STUDY_FINGERPRINT = "robovlms_fingerprint"
STUDY_MODE = "robovlms_mode"  # "grid" (`robovlms sweep`) or "search" (`robovlms tune`, study "<name>-search")
MAX_RETRIES = 3  # a cell whose worker died this many times is left failed
OPTUNA_SCHEMA = "v3.2.0.a"  # the schema of Optuna's tables that `ledger_tables` reads (Optuna 3.2 to 5.1)

logger = logging.getLogger(__name__)


def storage_url(sweep: SweepConfig, url: str | None = None) -> str:
    if url or sweep.storage:
        return url or sweep.storage
    Path(sweep.run_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(sweep.run_dir).resolve() / 'optuna.db'}"


def creation_lock_file(url: str) -> Path | None:
    """The file locked while a sweep creates the tables and study of a SQLite storage; None for other storages."""
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        return None
    database = Path(url.removeprefix("sqlite:///"))
    return database.with_name(f".{database.name}.lock")


@contextlib.contextmanager
def creating_study(url: str, name: str):
    """Held while a sweep creates its storage's tables and its study, sets the study's settings and queues its cells,
    so that sweeps started at once create them once: the others say that another sweep is creating the study, wait,
    then join it (as workers of the same sweep file, or refused as another's). A file lock beside a SQLite database,
    an advisory lock of the study's name in PostgreSQL."""
    lock_file = creation_lock_file(url)
    if lock_file is not None:
        with open(lock_file, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _say_waiting(url, name)
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        return
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(f"robovlms study {name}".encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10}, poolclass=sqlalchemy.pool.NullPool)
    try:
        connection = engine.connect()
    except sqlalchemy.exc.SQLAlchemyError as error:
        raise ConfigError(f"cannot reach the Optuna storage {redact(url)}: {str(error).splitlines()[0]}") from None
    with connection:
        if not connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar():
            _say_waiting(url, name)
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})


@contextlib.contextmanager
def ledger_errors(url: str):
    """A storage that fails mid-sweep (its disk full, its server gone) as one LedgerError line."""
    import sqlalchemy

    try:
        yield
    except sqlalchemy.exc.OperationalError as error:
        reason = str(error.orig if error.orig is not None else error).splitlines()[0]
        raise LedgerError(f"the sweep's ledger {redact(url)} cannot be written ({reason}); what was committed is "
                          f"kept: free space on its disk, or bring its database server back, then run the sweep "
                          f"again to resume it") from None


def _say_waiting(url: str, name: str) -> None:
    print(f"another sweep is creating the study {name} in {redact(url)}; waiting for it to finish, then joining the "
          f"study", file=sys.stderr, flush=True)


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
        # No wait for the write-ahead log's flush at each commit, as for SQLite below: a server crash can lose only
        # the last commits, whose cells then run again.
        engine = {"pool_pre_ping": True,
                  "connect_args": {"connect_timeout": 10, "options": "-c synchronous_commit=off"}}
    heartbeat = {}
    if heartbeat_seconds:
        heartbeat = {"heartbeat_interval": heartbeat_seconds, "grace_period": 2 * heartbeat_seconds,
                     "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRIES)}
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, **heartbeat)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
        raise ConfigError(f"cannot reach the Optuna storage {redact(url)}: {str(error).splitlines()[0]}") from None
    schema = storage.get_current_version()
    if schema != OPTUNA_SCHEMA:
        raise ConfigError(f"the Optuna storage {redact(url)} has schema {schema} (Optuna {optuna.__version__}); the "
                          f"sweep ledger reads schema {OPTUNA_SCHEMA}: install optuna in the range robovlms' "
                          f"pyproject.toml gives")
    if url.startswith("sqlite"):
        # SQLite ignores the SELECT ... FOR UPDATE with which Optuna pops a waiting trial, so two workers could
        # both read it as waiting and run the same cell; a transaction that takes the write lock when it begins
        # makes the pop atomic.
        sqlalchemy.event.listen(storage.engine, "begin", lambda connection: connection.exec_driver_sql(
            "BEGIN IMMEDIATE"))
        # Write-ahead logging without an fsync per commit: a cell's few commits cost microseconds instead of tens of
        # milliseconds. A process killed at any point loses nothing; a power cut may lose the last commits, which
        # only sends their cells back to the queue (a cell's files are written before its trial is told).
        sqlalchemy.event.listen(storage.engine, "connect", _write_ahead_log)
        storage.engine.dispose()  # the connection that made the tables, opened before the listener
    return storage


def _write_ahead_log(connection, _) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")


def redact(url: str) -> str:
    """A storage URL without its password, for messages."""
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    if ":" in credentials:
        return f"{scheme}://{credentials.split(':')[0]}:***@{host}"
    return url


def study_names(storage) -> set[str]:
    return {study.study_name for study in storage.get_all_studies()}  # without reading any trial


def study_name(sweep: SweepConfig, mode: str) -> str:
    return sweep.name if mode == "grid" else f"{sweep.name}-search"


def _sampler(sweep: SweepConfig, cells: list[Cell], mode: str):
    import optuna

    if mode == "search":
        from robovlms.sweep.search_sampler import TrialSeededTPESampler

        return TrialSeededTPESampler(sweep.search.seed)
    return optuna.samplers.RandomSampler(seed=0)  # a grid samples nothing: its cells are enqueued trials


def open_study(sweep: SweepConfig, cells: list[Cell], url: str, mode: str, *, create: bool):
    """The sweep's study: created (create=True) or joined. A study made by another sweep file is refused."""
    import optuna

    storage = open_storage(url, sweep.heartbeat_seconds)
    name, mine = study_name(sweep, mode), fingerprint(sweep, cells)
    if name in study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler(sweep, cells, mode),
                                  pruner=_pruner(sweep, mode))
        if study.user_attrs.get(STUDY_FINGERPRINT) == mine:
            return study
        if not create or not replace_failed_study(study, storage, Path(sweep.run_dir)):
            raise ConfigError(another_sweep_file(study, url, Path(sweep.run_dir)))
    if not create:
        raise ConfigError(f"no study {name!r} in {redact(url)}; start it with `robovlms sweep FILE`")
    direction = "minimize" if mode == "search" and sweep.search.objective == "val_loss" else "maximize"
    study = optuna.create_study(study_name=name, storage=storage, direction=direction,
                                sampler=_sampler(sweep, cells, mode), pruner=_pruner(sweep, mode), load_if_exists=True)
    study.set_user_attr(STUDY_SPEC, sweep.model_dump(mode="json"))
    study.set_user_attr(STUDY_MODE, mode)
    study.set_user_attr(STUDY_FINGERPRINT, mine)
    return study


def replace_failed_study(study, storage, run_dir: Path) -> bool:
    """A study made by an earlier version of a sweep file whose trained cells all failed, and in which nothing
    runs or waits, holds no result worth keeping: it is deleted, so the edited file can start afresh under the same
    name, and its cells' directories are moved to run_dir/replaced/<time>/ (their errors stay readable)."""
    import optuna
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if any(trial.state in (TrialState.RUNNING, TrialState.WAITING) for trial in trials):
        return False
    if any(trial.state == TrialState.COMPLETE and not str(trial_cell(trial)).startswith("baseline-")
           for trial in trials):
        return False
    moved = run_dir / "replaced" / time.strftime("%Y%m%dT%H%M%S")
    for cell in sorted({trial_cell(trial) for trial in trials} - {None}):
        if (run_dir / CELLS_DIR / cell).exists():
            moved.mkdir(parents=True, exist_ok=True)
            (run_dir / CELLS_DIR / cell).rename(moved / cell)
    optuna.delete_study(study_name=study.study_name, storage=storage)
    logger.warning(f"study {study.study_name!r} came from an earlier version of this sweep file and none of its "
                   f"trained cells completed: it is replaced by this file"
                   + (f" (its cells' directories are in {moved})" if moved.exists() else ""))
    return True


def another_sweep_file(study, url: str, run_dir: Path) -> str:
    """Why a study cannot be reused by this sweep file, and exactly what to do."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = {trial_cell(trial) for trial in trials if trial.state == TrialState.COMPLETE}
    busy = sum(trial.state in (TrialState.RUNNING, TrialState.WAITING) for trial in trials)
    held = (f"{busy} of its trials are running or waiting" if busy else
            f"it holds {len(complete)} complete cell(s) ({', '.join(sorted(map(str, complete))[:3])}"
            f"{', ...' if len(complete) > 3 else ''})")
    return (f"study {study.study_name!r} in {redact(url)} belongs to another sweep file (other cells or settings), "
            f"and {held}: run the file that made it to keep them, or give this sweep another name, or delete "
            f"{run_dir} to start this file afresh (losing them)")


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
    if name not in study_names(storage):
        raise ConfigError(f"no study {name!r} in {redact(url)}; start it with `robovlms sweep FILE`")
    attributes = optuna.load_study(study_name=name, storage=storage).user_attrs
    if STUDY_SPEC not in attributes:
        raise ConfigError(f"study {name!r} in {redact(url)} was not made by `robovlms sweep` or `robovlms tune`")
    sweep, mode = load_sweep(attributes[STUDY_SPEC]), attributes[STUDY_MODE]
    # before this machine takes a cell: its simulator, and its copy of the store
    sweep_benchmark(sweep, EpisodeStore(sweep.store.path, verify=True)).check_available()
    cells = sweep_cells(sweep, mode)
    return open_study(sweep, cells, url, mode, create=False), sweep, cells, mode


# ---- the queue: what a worker does per cell reads no other trial, so it costs the same at 10 or 10,000 cells ----


def trial_cell(trial) -> str | None:
    """The cell a trial runs (studies made before cells were user attributes hold it as a fixed parameter)."""
    return trial.user_attrs.get("cell", trial.system_attrs.get("fixed_params", {}).get("cell"))


def cell_trials(study) -> dict[str, list]:
    """Every trial of each cell; reads the whole study, so only when a sweep starts or ends."""
    by_cell: dict[str, list] = {}
    for trial in study.get_trials(deepcopy=False):
        cell = trial_cell(trial)
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
        study.enqueue_trial({}, user_attrs={"cell": cell.cell_id})
        enqueued.append(cell.cell_id)
    return enqueued


def search_attempts(study) -> dict[int, list]:
    """A search's trials grouped by the point they try: a retry of a killed trial (same parameters, same cell) joins
    the group of the trial it retries."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    groups: dict[int, list] = {}
    for trial in study.get_trials(deepcopy=False):
        first = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
        groups.setdefault(trial.number if first is None else first, []).append(trial)
    return groups


def killed(trial) -> bool:
    """Failed because its worker stopped (killed, lost, interrupted), not by an error of its own."""
    from optuna.trial import TrialState

    return trial.state == TrialState.FAIL and "error" not in trial.user_attrs


def abandoned(attempts: list) -> bool:
    """Every attempt at a point was killed, and it has been retried as often as it may be."""
    return all(killed(trial) for trial in attempts) and len(attempts) > MAX_RETRIES


def enqueue_search_trials(study, trials: int) -> int:
    """Queue what a search's budget of `trials` points still misses; returns how many were queued. A point counts
    once it is complete, pruned, failed by its own error, queued, running, or abandoned after MAX_RETRIES retries;
    a point whose attempts were all killed is queued again as a retry (it resumes its cell), and the rest of the
    budget as fresh trials. Queued here, by one process, so that workers only pop: however many there are, they
    cannot draw more trials than the budget."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    counted, queued = 0, 0
    for attempts in search_attempts(study).values():
        if abandoned(attempts) or not all(killed(trial) for trial in attempts):
            counted += 1
        elif counted + queued < trials:
            RetryHeartbeatStaleTrialCallback(MAX_RETRIES)(study, attempts[-1])
            queued += 1
    for _ in range(trials - counted - queued):
        study.enqueue_trial({})
        queued += 1
    return queued


# What a worker does per cell must cost the same at 10 or 10,000 cells, which Optuna's public API cannot do for three
# questions: which waiting trial is the oldest, how many trials are in each state, how many failed by their own error
# (RDBStorage answers each by reading every trial). Those, and a popped trial's cell and state (one query, where the
# storage's methods take a few), are asked of Optuna's tables directly, reading the columns `ledger_tables` declares,
# which tests/test_sweep_ledger.py checks against the installed Optuna's schema. The rest goes through the storage's
# public methods: the study's id by its name, the pop's state change.


def _table(name: str, *columns: str):
    import sqlalchemy

    return sqlalchemy.table(name, *(sqlalchemy.column(column) for column in columns))


def ledger_tables() -> dict:
    """Optuna's tables as far as the ledger reads them: name -> a SQLAlchemy table of those columns alone."""
    return {"trials": _table("trials", "trial_id", "number", "study_id", "state"),
            "trial_user_attributes": _table("trial_user_attributes", "trial_id", "key", "value_json")}


def _rdb_storage(study):
    """The RDBStorage behind a study (Optuna puts a cache in front of it): the one private attribute the ledger reads,
    as a study does not expose its storage."""
    return getattr(study._storage, "_backend", study._storage)


_study_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a study's id never changes: asked once


def _study_id(study) -> int:
    if study not in _study_ids:
        _study_ids[study] = _rdb_storage(study).get_study_id_from_name(study.study_name)
    return _study_ids[study]


def pop_waiting_trial(study) -> tuple[int, int] | None:
    """The id and number of the oldest waiting trial, now running in this worker; None when none waits. Atomic as
    Optuna's own pop (the state changes only if still waiting), without reading every waiting trial as Optuna's
    does."""
    import sqlalchemy
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage, trials = _rdb_storage(study), ledger_tables()["trials"]
    study_id, after = _study_id(study), -1
    while True:
        query = (sqlalchemy.select(trials.c.trial_id, trials.c.number)
                 .where(trials.c.study_id == study_id, trials.c.state == TrialState.WAITING.name,
                        trials.c.trial_id > after)
                 .order_by(trials.c.trial_id).limit(1))
        with storage.engine.connect() as connection:
            row = connection.execute(query).first()
        if row is None:
            return None
        try:
            if storage.set_trial_state_values(row.trial_id, state=TrialState.RUNNING):
                return row.trial_id, row.number
        except UpdateFinishedTrialError:
            pass
        after = row.trial_id  # another worker took it first


def popped_cell(study, trial_id: int) -> str | None:
    """The cell of a trial, by one query."""
    import sqlalchemy

    attributes = ledger_tables()["trial_user_attributes"]
    query = sqlalchemy.select(attributes.c.value_json).where(attributes.c.trial_id == trial_id,
                                                             attributes.c.key == "cell")
    with _rdb_storage(study).engine.connect() as connection:
        value = connection.execute(query).scalar()
    return json.loads(value) if value is not None else trial_cell(_rdb_storage(study).get_trial(trial_id))


def trial_state(study, trial_id: int):
    import sqlalchemy
    from optuna.trial import TrialState

    trials = ledger_tables()["trials"]
    with _rdb_storage(study).engine.connect() as connection:
        state = connection.execute(sqlalchemy.select(trials.c.state).where(trials.c.trial_id == trial_id)).scalar()
    return None if state is None else TrialState[state]


def count_trials(study) -> dict:
    """Trials per state, counted by the database."""
    import sqlalchemy
    from optuna.trial import TrialState

    trials = ledger_tables()["trials"]
    query = (sqlalchemy.select(trials.c.state, sqlalchemy.func.count()).where(trials.c.study_id == _study_id(study))
             .group_by(trials.c.state))
    with _rdb_storage(study).engine.connect() as connection:
        return {TrialState[state]: count for state, count in connection.execute(query).all()}


def count_cell_errors(study) -> int:
    """Trials that ended in their cell's own error (not a lapsed heartbeat), counted by the database."""
    import sqlalchemy
    from optuna.trial import TrialState

    tables = ledger_tables()
    trials, attributes = tables["trials"], tables["trial_user_attributes"]
    query = (sqlalchemy.select(sqlalchemy.func.count())
             .select_from(attributes.join(trials, attributes.c.trial_id == trials.c.trial_id))
             .where(trials.c.study_id == _study_id(study), trials.c.state == TrialState.FAIL.name,
                    attributes.c.key == "error"))
    with _rdb_storage(study).engine.connect() as connection:
        return connection.execute(query).scalar()
