"""Sweeps: grids and searches over backbone x formulation x data, each cell one trial of an Optuna study.

Optuna is the ledger and the queue. `prepare_sweep` validates a sweep file, expands its grid into cells and
enqueues one trial per unfinished cell in the study (SQLite in the run directory by default; a PostgreSQL URL
lets workers on many machines join). Workers pop waiting trials atomically, train the cell, evaluate it by
rollouts and commit its files (robovlms/results.py). A worker's heartbeat keeps its trial alive: when a worker
dies, its trial goes stale, is marked failed and re-enqueued, and the cell's training resumes from its last
checkpoint. A cell is recorded by the one trial that completes it; a cell that raises is recorded as failed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from robovlms.atomic_files import write_atomically, write_json_atomically
from robovlms.baselines import BASELINES, baseline_factory, check_baseline_data
from robovlms.benchmark import Benchmark, EpisodeSpec, Observation, create_benchmark
from robovlms.errors import ConfigError, RobovlmsError, config_error, read_yaml_mapping
from robovlms.results import (CELLS_DIR, RESULTS_DIR, SWEEP_FILE, TRAIN_DIR, CellResult, gather,
                              read_cell_result, read_training_curve, software_versions, write_cell_result,
                              write_records)
from robovlms.store import EpisodeStore

STUDY_SPEC = "robovlms_sweep"  # study user attributes: the validated sweep file and its fingerprint
STUDY_FINGERPRINT = "robovlms_fingerprint"
STUDY_MODE = "robovlms_mode"  # "grid" (`robovlms sweep`) or "search" (`robovlms tune`, study "<name>-search")
MAX_RETRIES = 3  # a cell whose worker died this many times is left failed
FIXED_TRAINING_KEYS = ("store", "run_dir")  # set by the sweep, never by its grid


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BenchmarkSettings(_Strict):
    name: str = "metaworld"
    split: str = "ABC->D"
    options: dict[str, Any] = {}  # the benchmark's own options (Meta-World: tasks, image_size, cameras, max_steps)


class StoreGeneration(_Strict):
    episodes: int = Field(20, ge=1)  # successful demonstrations per task and training scene
    scenes: str | None = None  # training scenes instead of the split's
    workers: int = Field(2, ge=1)


class StoreSettings(_Strict):
    path: str
    generate: StoreGeneration | None = None  # when the store is missing, make it with the scripted experts


class EvaluationSettings(_Strict):
    episodes_per_task: int = Field(10, ge=1)
    workers: int = Field(1, ge=1)  # simulator processes per cell
    execution: Literal["first", "ensemble", "chunk"] | None = None  # overrides each cell's own
    videos_per_task: int = Field(0, ge=0)
    latency_steps: int = Field(20, ge=1)  # policy steps timed for the step latency


class SearchDimension(_Strict):
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None


class SearchSettings(_Strict):
    trials: int = Field(10, ge=1)
    space: dict[str, SearchDimension]  # training keys, dotted for nested ones (formulation.options.head)
    objective: Literal["success", "val_loss"] = "success"
    prune: bool = True  # median pruning on the validation loss
    seed: int = 0


class SweepConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # the Optuna study's name
    run_dir: str
    storage: str | None = None  # Optuna storage URL; default sqlite:///<run_dir>/optuna.db
    benchmark: BenchmarkSettings = BenchmarkSettings()
    store: StoreSettings
    train: dict[str, Any] = {}  # fixed training settings (robovlms.training.TrainingConfig keys)
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]] = {}  # axes; a list of grids is their union
    baselines: list[Literal["zero", "mean", "replay"]] = list(BASELINES)
    evaluation: EvaluationSettings = EvaluationSettings()
    search: SearchSettings | None = None  # for `robovlms tune`
    heartbeat_seconds: int = Field(30, ge=1)  # a worker silent for twice this long is taken for dead


@dataclass
class Cell:
    """One configuration of a sweep: a training config (kind "trained") or a baseline policy."""

    cell_id: str
    kind: Literal["trained", "baseline"]
    training: dict[str, Any] = field(default_factory=dict)  # TrainingConfig without store and run_dir
    axes: dict[str, Any] = field(default_factory=dict)
    policy: str = "trained"


# ---- reading and expanding a sweep file ---------------------------------------------------------------------


def load_sweep(source: str | Path | dict[str, Any]) -> SweepConfig:
    raw = source if isinstance(source, dict) else read_yaml_mapping(source, "sweep settings")
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as error:
        raise config_error("invalid sweep file", SweepConfig, error) from None


def expand_cells(sweep: SweepConfig) -> list[Cell]:
    """The grid's cells (union of its grids, duplicates once), then one cell per baseline, each validated."""
    from robovlms.training import TrainingConfig

    grids = sweep.grid if isinstance(sweep.grid, list) else [sweep.grid]
    valid_axes = [key for key in TrainingConfig.model_fields if key not in FIXED_TRAINING_KEYS]
    for key in sweep.train:
        if key not in valid_axes:
            raise ConfigError(f"unknown key 'train.{key}'; valid keys: {', '.join(valid_axes)}")
    cells: dict[str, Cell] = {}
    for index, grid in enumerate(grids):
        where = f"grid[{index}]" if isinstance(sweep.grid, list) else "grid"
        for axis, values in grid.items():
            if axis not in valid_axes:
                raise ConfigError(f"unknown axis '{where}.{axis}'; valid axes: {', '.join(valid_axes)}")
            if not values:
                raise ConfigError(f"axis '{where}.{axis}' has no values, so the grid expands to zero cells")
        for combination in itertools.product(*grid.values()):
            axes = dict(zip(grid.keys(), combination))
            training = _cell_training(sweep.train, axes)
            cell = Cell(_cell_id(training), "trained", training, axes)
            cells.setdefault(cell.cell_id, cell)
    trained = list(cells.values())
    for cell in trained:
        _check_cell(cell)
    baselines = [Cell(f"baseline-{name}", "baseline", axes={"policy": name}, policy=name) for name in sweep.baselines]
    if not trained and not baselines:
        raise ConfigError("the sweep has no cells: give a grid, training settings or baselines")
    return trained + baselines


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{key: _merge(base.get(key), value) for key, value in override.items()}}
    return override


def _cell_training(fixed: dict[str, Any], axes: dict[str, Any]) -> dict[str, Any]:
    training = dict(fixed)
    for axis, value in axes.items():
        if axis in ("backbone", "formulation") and isinstance(value, str):
            value = {"name": value}
        training[axis] = _merge(training.get(axis), value)
    return training


def _cell_id(training: dict[str, Any]) -> str:
    """Readable and unique: the main axes, then a hash of the whole training config."""
    backbone = _merge({"name": "gpt-scratch"}, training.get("backbone") or {})["name"]
    formulation = _merge({"name": "policy-head"}, training.get("formulation") or {})["name"]
    digest = hashlib.sha256(json.dumps(training, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parts = [backbone, formulation, f"h{training.get('history', 1)}", f"l{training.get('chunk', 1)}",
             f"f{training.get('data_fraction', 1.0)}", f"s{training.get('seed', 0)}", digest]
    return "-".join(str(part) for part in parts)


def _check_cell(cell: Cell) -> None:
    """Everything that can be checked before training: config keys and ranges, names, formulation settings."""
    from robovlms.backbone import BACKBONES
    from robovlms.formulation import FORMULATIONS
    from robovlms.training import load_config

    try:
        config = load_config({**cell.training, "store": "-", "run_dir": "-"})
        BACKBONES.get(config.backbone.name)
        FORMULATIONS.get(config.formulation.name).check_settings(config.history, config.chunk,
                                                                 config.formulation.options)
    except RobovlmsError as error:
        error.args = (f"cell {cell.cell_id} ({_describe_axes(cell.axes)}): {error}",)
        raise


def _describe_axes(axes: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in axes.items()) or "fixed settings"


def fingerprint(sweep: SweepConfig, cells: list[Cell]) -> str:
    """What decides a sweep's results; workers, storage and heartbeats may change between runs."""
    decisive = sweep.model_dump(mode="json", exclude={"storage", "heartbeat_seconds", "run_dir"})
    decisive["evaluation"].pop("workers")
    decisive["store"].pop("generate")
    decisive["cells"] = [cell.cell_id for cell in cells]
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()


# ---- the study ----------------------------------------------------------------------------------------------


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
        raise ConfigError(f"cannot reach the Optuna storage {_redact(url)}: {str(error).splitlines()[0]}") from None
    if url.startswith("sqlite"):
        # SQLite ignores the SELECT ... FOR UPDATE with which Optuna pops a waiting trial, so two workers could
        # both read it as waiting and run the same cell; a transaction that takes the write lock when it begins
        # makes the pop atomic.
        sqlalchemy.event.listen(storage.engine, "begin", lambda connection: connection.exec_driver_sql(
            "BEGIN IMMEDIATE"))
    return storage


def _redact(url: str) -> str:
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
        return optuna.samplers.TPESampler(seed=sweep.search.seed)
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
            raise ConfigError(f"study {name!r} in {_redact(url)} belongs to another sweep file (other cells or "
                              f"settings); give this sweep another name, or re-run the file that made it")
        return study
    if not create:
        raise ConfigError(f"no study {name!r} in {_redact(url)}; start it with `robovlms sweep FILE`")
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
        raise ConfigError(f"no study {name!r} in {_redact(url)}; start it with `robovlms sweep FILE`")
    attributes = optuna.load_study(study_name=name, storage=storage).user_attrs
    if STUDY_SPEC not in attributes:
        raise ConfigError(f"study {name!r} in {_redact(url)} was not made by `robovlms sweep` or `robovlms tune`")
    sweep, mode = load_sweep(attributes[STUDY_SPEC]), attributes[STUDY_MODE]
    sweep_benchmark(sweep, EpisodeStore(sweep.store.path)).check_available()  # before this machine takes a cell
    cells = sweep_cells(sweep, mode)
    return open_study(sweep, cells, url, mode, create=False), sweep, cells, mode


def sweep_cells(sweep: SweepConfig, mode: str) -> list[Cell]:
    """A grid's cells and baselines; a search makes its cells as it samples them."""
    if mode == "grid":
        return expand_cells(sweep)
    if sweep.search is None:
        raise ConfigError("`robovlms tune` needs a `search:` section (trials, space, objective)")
    base = _search_base(sweep)
    _check_cell(base)
    return []


def _cell_trials(study) -> dict[str, list]:
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

    trials = _cell_trials(study)
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


# ---- running one cell ---------------------------------------------------------------------------------------


class CellFailed(RobovlmsError):
    """A cell raised; its error is recorded in its result.json and the sweep goes on."""


def sweep_benchmark(sweep: SweepConfig, store: EpisodeStore | None) -> Benchmark:
    """The sweep's benchmark, with the options its store was generated with, checked against the store."""
    options = dict(sweep.benchmark.options)
    if store is not None:
        if store.metadata.get("benchmark", sweep.benchmark.name) != sweep.benchmark.name:
            raise ConfigError(f"the store {store.path} holds {store.metadata['benchmark']} data, not "
                              f"{sweep.benchmark.name}")
        options = {**store.metadata.get("benchmark_options", {}), **options}
    benchmark = create_benchmark(sweep.benchmark.name, **options)
    if sweep.benchmark.split not in benchmark.splits():
        from robovlms.errors import UnknownNameError

        raise UnknownNameError(f"{benchmark.name} split", sweep.benchmark.split, benchmark.splits())
    if store is not None:
        benchmark.check_frames(store.layout.cameras, store.layout.image_size, store.layout.action_dim,
                               f"the store {store.path}")
    return benchmark


def ensure_store(sweep: SweepConfig) -> EpisodeStore:
    path = Path(sweep.store.path)
    if (path / "meta.json").exists() or sweep.store.generate is None:
        return EpisodeStore(path)
    from robovlms.demonstrations import generate_demonstrations

    benchmark = sweep_benchmark(sweep, None)
    generation = sweep.store.generate
    resume = path.with_name(path.name + ".partial").exists()
    return generate_demonstrations(benchmark, sweep.benchmark.split, generation.episodes, path,
                                   scenes=generation.scenes, workers=generation.workers, resume=resume)


def run_cell(sweep: SweepConfig, cell: Cell, run_dir: Path, callbacks: tuple = (), trial_number: int | None = None,
             progress: bool = False) -> CellResult:
    """Train (resuming from the cell's last checkpoint) and evaluate one cell; commit its files."""
    cell_dir = run_dir / CELLS_DIR / cell.cell_id
    cell_dir.mkdir(parents=True, exist_ok=True)
    store = EpisodeStore(sweep.store.path)
    benchmark = sweep_benchmark(sweep, store)
    result = CellResult(cell_id=cell.cell_id, status="complete", kind=cell.kind, benchmark=benchmark.name,
                        split=sweep.benchmark.split, policy=cell.policy, axes=cell.axes,
                        versions=software_versions(benchmark.name, cell.training if cell.kind == "trained" else None),
                        sweep=sweep.name, trial=trial_number)
    specs = benchmark.evaluation_episodes(sweep.benchmark.split, sweep.evaluation.episodes_per_task)
    if cell.kind == "baseline":
        factory = baseline_factory(cell.policy, benchmark, store.path, seed=0)
        local_policy = factory()
        result.config = {"policy": cell.policy, "store": str(store.path)}
    else:
        factory, local_policy = _train_cell(sweep, cell, cell_dir, result, callbacks, progress)
    started = time.perf_counter()
    from robovlms.rollout import evaluate

    records = evaluate(benchmark, factory, specs, workers=sweep.evaluation.workers, progress=progress,
                       video_dir=cell_dir / "videos" if sweep.evaluation.videos_per_task else None,
                       videos_per_task=sweep.evaluation.videos_per_task, description=cell.cell_id)
    result.eval_seconds = time.perf_counter() - started
    result.step_latency_ms = _step_latency_ms(local_policy, store, specs[0], sweep.evaluation.latency_steps)
    result.episodes, result.successes = len(records), int(sum(record.success for record in records))
    result.success = result.successes / result.episodes
    result.scores = benchmark.score(records)
    write_records(cell_dir, records)
    write_cell_result(cell_dir, result)
    return result


def _train_cell(sweep: SweepConfig, cell: Cell, cell_dir: Path, result: CellResult, callbacks: tuple,
                progress: bool):
    """Train, fill in what the trained formulation tells; return the evaluation workers' policy factory and a
    policy in this process (the formulation already loaded), for timing a step."""
    from robovlms.policy import CheckpointPolicy, policy_factory
    from robovlms.training import CHECKPOINT_DIR, LAST_CHECKPOINT, load_config, load_formulation, train

    train_dir = cell_dir / TRAIN_DIR
    config = load_config({**cell.training, "store": sweep.store.path, "run_dir": str(train_dir)})
    started = time.perf_counter()
    train(config, progress=progress, callbacks=callbacks)
    result.train_seconds = time.perf_counter() - started
    formulation, config = load_formulation(train_dir)
    result.backbone, result.backbone_label = config.backbone.name, formulation.backbone.label
    result.random_init, result.backbone_size = formulation.backbone.random_init, formulation.backbone.describe()
    result.formulation, result.history, result.chunk = config.formulation.name, config.history, config.chunk
    result.data_fraction, result.seed = config.data_fraction, config.seed
    result.episodes_per_task = config.episodes_per_task
    result.parameters = sum(p.numel() for p in formulation.parameters())
    result.trainable_parameters = sum(p.numel() for p in formulation.parameters() if p.requires_grad)
    result.checkpoint = str(train_dir / CHECKPOINT_DIR / LAST_CHECKPOINT)
    result.config = config.model_dump(mode="json")
    curve = read_training_curve(cell_dir.parent.parent, cell.cell_id)
    if "train/loss" in curve:
        result.final_train_loss = float(curve["train/loss"].dropna().iloc[-1])
    execution = sweep.evaluation.execution or config.execution
    local_policy = CheckpointPolicy(formulation, config.cameras, execution, frame_stride=config.frame_stride)
    return policy_factory(train_dir, sweep.evaluation.execution), local_policy


def _step_latency_ms(policy, store: EpisodeStore, spec: EpisodeSpec, steps: int) -> float:
    """Median wall time of one policy step on a stored frame, in this process (one thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = store.episodes.iloc[0]
        frame = int(row["start"])
        observation = Observation(images={camera: np.array(images[frame]) for camera, images in store.images.items()},
                                  state=np.array(store.state[frame]), instruction=spec.instruction)
        policy.reset(spec)
        timings = []
        for _ in range(steps + 3):
            started = time.perf_counter()
            policy.step(observation)
            timings.append(time.perf_counter() - started)
        return float(np.median(timings[3:]) * 1000)
    finally:
        torch.set_num_threads(threads)


def _record_failure(sweep: SweepConfig, cell: Cell, run_dir: Path, error: BaseException, trial_number: int | None
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
    write_cell_result(cell_dir, result)
    (cell_dir / "error.txt").write_text("".join(traceback.format_exception(error)))
    return message


def _record_abandoned(study, sweep: SweepConfig, cells: list[Cell], run_dir: Path) -> None:
    """Cells whose workers died every time they were retried are recorded as failed, so reports list them."""
    from optuna.trial import TrialState

    trials = _cell_trials(study)
    for cell in cells:
        attempts = trials.get(cell.cell_id, [])
        if attempts and all(t.state == TrialState.FAIL for t in attempts) and read_cell_result(
                run_dir / CELLS_DIR / cell.cell_id) is None:
            error = RuntimeError(f"its worker stopped without a result in all {len(attempts)} attempts (killed, out "
                                 f"of memory, machine lost); run the sweep again with --retry-failed to try again")
            _record_failure(sweep, cell, run_dir, error, attempts[-1].number)


# ---- workers ------------------------------------------------------------------------------------------------


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
            message = _record_failure(sweep, cell, run_dir, error, trial.number)
            trial.set_user_attr("error", message)
            raise CellFailed(message) from error
        trial.set_user_attr("successes", result.successes)
        trial.set_user_attr("episodes", result.episodes)
        return result.success

    return objective


def _search_objective(sweep: SweepConfig, base: Cell, run_dir: Path, progress: bool):
    import optuna

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
        training = base.training
        for key, value in sampled.items():
            training = _merge(training, _nested(key, value))
        cell = Cell("search-" + _cell_id(training), "trained", training, sampled)
        callbacks = (OptunaPruning(trial),) if search.prune else ()
        try:
            _check_cell(cell)
            result = run_cell(sweep, cell, run_dir, callbacks=callbacks, trial_number=trial.number, progress=progress)
        except optuna.TrialPruned:
            raise
        except Exception as error:  # noqa: BLE001
            message = _record_failure(sweep, cell, run_dir, error, trial.number)
            trial.set_user_attr("error", message)
            raise CellFailed(message) from error
        trial.set_user_attr("cell", cell.cell_id)
        trial.set_user_attr("success", result.success)
        if search.objective == "success":
            return result.success
        curve = read_training_curve(run_dir, cell.cell_id)
        if "val/loss" not in curve or curve["val/loss"].dropna().empty:
            raise CellFailed("objective val_loss needs train.validation_fraction > 0")
        return float(curve["val/loss"].dropna().iloc[-1])

    return objective


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


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
    objective = (_search_objective(sweep, _search_base(sweep), run_dir, progress) if search
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


def _search_base(sweep: SweepConfig) -> Cell:
    return Cell("search-base", "trained", _cell_training(sweep.train, {}), {})


# ---- the commands -------------------------------------------------------------------------------------------


@dataclass
class SweepStatus:
    cells: int
    done: int = 0
    running: int = 0
    failed: int = 0
    waiting: int = 0


def sweep_status(study, cells: list[Cell], run_dir: Path) -> SweepStatus:
    from optuna.trial import TrialState

    status = SweepStatus(cells=len(cells))
    trials = _cell_trials(study)
    for cell in cells:
        states = {trial.state for trial in trials.get(cell.cell_id, [])}
        result = read_cell_result(run_dir / CELLS_DIR / cell.cell_id)
        if TrialState.COMPLETE in states:
            status.done += 1
        elif TrialState.RUNNING in states:
            status.running += 1
        elif TrialState.WAITING in states:
            status.waiting += 1
        elif result is not None and result.status == "failed":
            status.failed += 1
    return status


def prepare_sweep(path: str | Path, storage: str | None = None, retry_failed: bool = False, mode: str = "grid"):
    """Validate a sweep file, open (or create) its study, make its store if asked, enqueue unfinished cells."""
    sweep = load_sweep(path)
    cells = sweep_cells(sweep, mode)
    url = storage_url(sweep, storage)
    study = open_study(sweep, cells, url, mode, create=True)
    run_dir = Path(sweep.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False)
    write_atomically(run_dir / SWEEP_FILE, lambda temporary: temporary.write_text(spec))
    store = ensure_store(sweep)
    benchmark = sweep_benchmark(sweep, store)
    benchmark.check_available()
    for baseline in sweep.baselines:
        check_baseline_data(baseline, benchmark, store.path)
    enqueue_cells(study, cells, run_dir, retry_failed)
    return sweep, cells, study, url


def run_sweep(path: str | Path, *, workers: int = 1, storage: str | None = None, retry_failed: bool = False,
              mode: str = "grid", progress: Callable[[SweepStatus], None] | None = None) -> SweepStatus:
    """`robovlms sweep FILE` (mode grid) and `robovlms tune FILE` (mode search): every cell trained, evaluated and
    recorded, results gathered into the run directory."""
    sweep, cells, study, url = prepare_sweep(path, storage, retry_failed, mode)
    run_dir = Path(sweep.run_dir)

    def report() -> None:
        if progress is not None:
            progress(sweep_status(study, cells, run_dir))

    report()
    if workers <= 1:
        work(study, sweep, cells, run_dir, mode, wait=True, on_change=report)
    else:
        _run_worker_processes(study.study_name, url, workers, run_dir, report)
        work(study, sweep, cells, run_dir, mode, wait=True, on_change=report)  # what died with a worker
    _record_abandoned(study, sweep, cells, run_dir)
    status = sweep_status(study, cells, run_dir)
    report()
    gather(run_dir)
    if mode == "search":
        _write_best(study, run_dir)
    return status


def _run_worker_processes(name: str, url: str, workers: int, run_dir: Path, report: Callable) -> None:
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    processes = []
    for index in range(workers):
        log = open(logs / f"worker-{index}.log", "a")
        command = [sys.executable, "-m", "robovlms.cli", "worker", "--storage", url, "--study", name,
                   "--run-dir", str(run_dir)]
        threads = str(max(1, (os.cpu_count() or 1) // workers))  # workers share the cores instead of fighting
        environment = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
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


def _write_best(study, run_dir: Path) -> None:
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return
    best = study.best_trial
    write_json_atomically(run_dir / RESULTS_DIR / "best.json",
                          {"trial": best.number, "value": best.value, "params": best.params,
                           "cell": best.user_attrs.get("cell"), "direction": study.direction.name.lower()})


def estimate_cost(sweep: SweepConfig, cells: list[Cell], measure_steps: int = 2) -> list[dict[str, Any]]:
    """Per cell: seconds per training step measured on a synthetic batch of the cell's shapes (tiny backbones
    only), the training estimate, and an upper bound on evaluation (every episode runs to the step limit)."""
    import torch

    from robovlms.backbone import create_backbone
    from robovlms.formulation import create_formulation
    from robovlms.training import load_config

    benchmark = sweep_benchmark(sweep, EpisodeStore(sweep.store.path) if (Path(sweep.store.path) / "meta.json")
                                .exists() else None)
    episodes = len(benchmark.tasks()) * sweep.evaluation.episodes_per_task
    rows, measured = [], {}
    for cell in cells:
        row = {"cell": cell.cell_id, "backbone": cell.policy, "formulation": "", "H": "", "L": "", "fraction": "",
               "seed": "", "train_s": 0.0}
        steps_per_observation = 1
        if cell.kind == "trained":
            config = load_config({**cell.training, "store": "-", "run_dir": "-"})
            row.update(backbone=f"{config.backbone.name} ({config.backbone.size})",
                       formulation=config.formulation.name, H=config.history, L=config.chunk,
                       fraction=config.data_fraction, seed=config.seed)
            shape_key = json.dumps([config.backbone.model_dump(), config.formulation.model_dump(), config.history,
                                    config.chunk, config.batch_size, config.use_state], sort_keys=True, default=str)
            if config.backbone.size == "tiny" and shape_key not in measured:
                torch.manual_seed(0)
                formulation = create_formulation(config.formulation.name,
                                                 create_backbone(config.backbone.name, **config.backbone.options),
                                                 _unit_statistics(benchmark.action_dim),
                                                 _unit_statistics(benchmark.state_dim), history=config.history,
                                                 chunk=config.chunk, use_state=config.use_state,
                                                 **config.formulation.options)
                batch = _synthetic_batch(benchmark, config.batch_size, config.history, config.chunk)
                timings = []
                for _ in range(measure_steps + 1):
                    started = time.perf_counter()
                    formulation.loss(batch)[0].backward()
                    timings.append(time.perf_counter() - started)
                measured[shape_key] = float(np.median(timings[1:]))
            per_step = measured.get(shape_key)
            row["train_s"] = per_step * config.max_steps if per_step is not None else float("nan")
            execution = sweep.evaluation.execution or config.execution
            steps_per_observation = config.chunk if execution == "chunk" else 1
        renders_per_second = 60.0  # measured for Meta-World at 64-128 px with shadows and MSAA off
        row["eval_max_s"] = episodes * benchmark.max_steps / steps_per_observation / renders_per_second / max(
            1, sweep.evaluation.workers)
        rows.append(row)
    return rows


def _unit_statistics(dim: int):
    from robovlms.store import Statistics

    return Statistics(p01=[-1.0] * dim, p99=[1.0] * dim, mean=[0.0] * dim, std=[1.0] * dim, min=[-1.0] * dim,
                      max=[1.0] * dim)


def _synthetic_batch(benchmark: Benchmark, batch: int, history: int, chunk: int) -> dict[str, Any]:
    import torch

    views, size = len(benchmark.cameras), benchmark.image_size
    return {"images": torch.randint(0, 256, (batch, history, views, size, size, 3), dtype=torch.uint8),
            "state": torch.zeros(batch, history, benchmark.state_dim),
            "actions": torch.zeros(batch, history, chunk, benchmark.action_dim),
            "action_mask": torch.ones(batch, history, chunk, dtype=torch.bool),
            "frame_mask": torch.ones(batch, history, dtype=torch.bool),
            "task": torch.zeros(batch, dtype=torch.long), "instruction": ["press the button"] * batch}

