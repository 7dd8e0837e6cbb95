"""A sweep's cells: the grid expanded into training configs and baselines, each with a readable, unique id and
checked before any training."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from robovlms.errors import ConfigError, RobovlmsError
from robovlms.sweep.config import FIXED_TRAINING_KEYS, SweepConfig

PRETRAINING_AXIS = "pretraining"  # a grid axis when the sweep has pre-training settings


@dataclass
class Cell:
    """One configuration of a sweep: a training config (kind "trained") or a baseline policy."""

    cell_id: str
    kind: Literal["trained", "baseline", "pretraining"]
    # TrainingConfig without store and run_dir; a pre-training cell's PretrainingConfig
    training: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, Any] = field(default_factory=dict)
    policy: str = "trained"
    needs: Cell | None = None  # the pre-training cell whose backbone a trained cell starts from


def expand_cells(sweep: SweepConfig) -> list[Cell]:
    """The pre-training cells the grid's cells need, the grid's cells (union of its grids, duplicates once), then
    one cell per baseline, each validated. Without a grid, the training settings alone are one cell; an empty grid
    has no cells."""
    from robovlms.training import TrainingConfig

    if sweep.grid is None:
        grids = [{}] if sweep.train else []
    else:
        grids = sweep.grid if isinstance(sweep.grid, list) else [sweep.grid]
    valid_axes = [key for key in TrainingConfig.model_fields if key not in FIXED_TRAINING_KEYS]
    if sweep.pretraining is not None:
        valid_axes.append(PRETRAINING_AXIS)
    for key in sweep.train:
        if key not in valid_axes:
            raise ConfigError(f"unknown key 'train.{key}'; valid keys: {', '.join(valid_axes)}")
    cells: dict[str, Cell] = {}
    for index, grid in enumerate(grids):
        where = f"grid[{index}]" if isinstance(sweep.grid, list) else "grid"
        for axis, values in grid.items():
            if axis.split(".")[0] not in valid_axes:
                raise ConfigError(f"unknown axis '{where}.{axis}'; valid axes: {', '.join(valid_axes)}")
            if not values:
                raise ConfigError(f"axis '{where}.{axis}' has no values, so the grid expands to zero cells")
        if sweep.grid is not None and not grid:
            continue  # an empty grid, unlike no grid, has no cells
        for combination in itertools.product(*grid.values()):
            axes = dict(zip(grid.keys(), combination))
            training, pretraining = pretrained_backbone(sweep, cell_training(sweep.train, axes))
            cell = Cell(make_cell_id(training), "trained", training, axes, needs=pretraining)
            cells.setdefault(cell.cell_id, cell)
    trained = list(cells.values())
    for cell in trained:
        check_cell(cell)
    pretraining = list({cell.needs.cell_id: cell.needs for cell in trained if cell.needs is not None}.values())
    baselines = [Cell(f"baseline-{name}", "baseline", axes={"policy": name}, policy=name) for name in sweep.baselines]
    if not trained and not baselines:
        raise ConfigError("the sweep has no cells: its grid is empty and it has no baselines; give grid axes, "
                          "training settings without a grid, or baselines")
    # pre-training first; then the cells that need none, so that the workers rarely wait for one
    return pretraining + sorted(trained, key=lambda cell: cell.needs is not None) + baselines


def pretrained_backbone(sweep: SweepConfig, training: dict[str, Any]) -> tuple[dict[str, Any], Cell | None]:
    """A cell's `pretraining` setting resolved: "none" trains its backbone from a random init as configured; the
    name of one of the sweep's pre-training settings makes a pre-training cell of the cell's backbone with them,
    and the cell trains from the directory that cell writes (size pretrained). The pre-training is checked to see
    neither a task nor a scene the sweep evaluates on, test or validation (robovlms/pretraining/held_out.py)."""
    from robovlms.pretraining import check_held_out, pretrained_path, pretraining_config

    training = dict(training)
    name = training.pop(PRETRAINING_AXIS, "none")
    if name in ("none", None):
        return training, None
    settings = sweep.pretraining.settings if sweep.pretraining is not None else {}
    if name not in settings:
        from robovlms.errors import UnknownNameError

        raise UnknownNameError("pre-training (the sweep's pretraining.settings, or none)", name, [*settings, "none"])
    backbone = merge({"name": "gpt-scratch"}, training.get("backbone") or {})
    config = pretraining_config(settings[name], {key: value for key, value in backbone.items()
                                                 if key in ("name", "size", "path", "options")})
    check_held_out(config, sweep.benchmark.name, sweep.benchmark.options, sweep.benchmark.split, f"pretraining {name}")
    path = pretrained_path(config, sweep.pretraining.path)
    cell = Cell(f"pretrain-{path.name}", "pretraining", config.model_dump(mode="json"),
                {"backbone": config.backbone.name, PRETRAINING_AXIS: name}, policy="pretraining")
    kept = {key: value for key, value in backbone.items() if key not in ("size", "path", "options")}
    training["backbone"] = {**kept, "size": "pretrained", "path": str(path)}
    return training, cell


def sweep_cells(sweep: SweepConfig, mode: str) -> list[Cell]:
    """A grid's cells and baselines; a search makes its cells as it samples them."""
    if mode == "grid":
        return expand_cells(sweep)
    if sweep.search is None:
        raise ConfigError("`robovlms tune` needs a `search:` section (trials, space, objective)")
    base = search_base(sweep)
    check_cell(base)
    return []


def search_base(sweep: SweepConfig) -> Cell:
    return Cell("search-base", "trained", cell_training(sweep.train, {}), {})


def merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{key: merge(base.get(key), value) for key, value in override.items()}}
    return override


def nested(dotted: str, value: Any) -> dict[str, Any]:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def cell_training(fixed: dict[str, Any], axes: dict[str, Any]) -> dict[str, Any]:
    """The fixed settings with the axes merged over them; a backbone or formulation may be given by name, in
    either, and a dotted axis (formulation.options.objective) sets one nested setting."""
    training: dict[str, Any] = {}
    for key, value in [*fixed.items(), *axes.items()]:
        if key in ("backbone", "formulation") and isinstance(value, str):
            value = {"name": value}
        key, value = next(iter(nested(key, value).items()))  # formulation.options.objective: one option an axis
        training[key] = merge(training.get(key), value)
    return training


def make_cell_id(training: dict[str, Any]) -> str:
    """Readable and unique: the main axes, then a hash of the whole training config."""
    backbone = merge({"name": "gpt-scratch"}, training.get("backbone") or {})["name"]
    formulation = merge({"name": "policy-head"}, training.get("formulation") or {})["name"]
    digest = hashlib.sha256(json.dumps(training, sort_keys=True, default=str).encode()).hexdigest()[:8]
    parts = [backbone, formulation, f"h{training.get('history', 1)}", f"l{training.get('chunk', 1)}",
             f"f{training.get('data_fraction', 1.0)}", f"s{training.get('seed', 0)}", digest]
    return "-".join(str(part) for part in parts)


def check_cell(cell: Cell) -> None:
    """Everything that can be checked before training: config keys and ranges, names, backbone options,
    formulation settings, what the backbone and strategy support."""
    from robovlms.training import check_training, load_config

    try:
        config = load_config({**cell.training, "store": "-", "run_dir": "-"})
        check_training(config)
        if config.num_nodes > 1:
            raise ConfigError(f"num_nodes {config.num_nodes}: a sweep trains each cell on one machine (its workers "
                              f"take cells on every machine); train a cell across machines with torchrun or srun "
                              f"on each (docs/scaling.md)")
    except RobovlmsError as error:
        error.args = (f"cell {cell.cell_id} ({describe_axes(cell.axes)}): {error}",)
        raise


def built_as(cell: Cell) -> dict[str, Any]:
    """A trained cell's training settings as they can be built before the sweep runs: a cell that trains from a
    pre-training cell's directory, which is not there yet, as the architecture that cell pre-trains."""
    if cell.needs is None:
        return cell.training
    started_from = {key: cell.needs.training["backbone"][key] for key in ("size", "path", "options")}
    return {**cell.training, "backbone": {**cell.training["backbone"], **started_from}}


def check_cells_build(cells: list[Cell], action_dim: int, state_dim: int, execution: str | None) -> None:
    """Before a store is made: a rollout can observe each trained cell's history under its execution (`execution`
    overrides the cells'); and each distinct architecture among them built on the meta device, as training will
    build it (no weights are loaded, so this takes a fraction of a second per architecture): settings that only
    building reveals, such as a hidden size its attention heads do not divide, a pretrained path that is not there,
    or LoRA targets a backbone lacks, are refused before the study exists."""
    from robovlms.serving.batched_policy import check_execution
    from robovlms.training import load_config
    from robovlms.training.memory import meta_formulation

    built = set()
    for cell in cells:
        if cell.kind != "trained":
            continue
        config = load_config({**built_as(cell), "store": "-", "run_dir": "-"})
        with _naming(cell):
            check_execution(config.history, config.chunk, config.frame_stride, execution or config.execution)
        architecture = json.dumps(config.model_dump(mode="json", include={"backbone", "formulation", "history",
                                                                           "chunk", "use_state", "state_input"}),
                                  sort_keys=True)
        if architecture in built:
            continue
        built.add(architecture)
        with _naming(cell):
            try:
                meta_formulation(config, action_dim, state_dim)
            except RobovlmsError:
                raise
            except Exception as error:  # noqa: BLE001 - freezing or LoRA refused the settings: one line, not a trace
                raise ConfigError(f"building it failed: {type(error).__name__}: {str(error).splitlines()[0]}") from None


def check_cells_on_store(cells: list[Cell], store, benchmark) -> None:
    """What the store and the benchmark tell about each trained cell, before the study exists: its cameras are in
    both, and its history and chunk fit the shortest episode it trains on."""
    from robovlms.data.windows import check_windows_fit
    from robovlms.training import load_config

    for cell in cells:
        if cell.kind != "trained":
            continue
        config = load_config({**cell.training, "store": str(store.path), "run_dir": "-"})
        with _naming(cell):
            for camera in config.cameras or []:
                if camera not in store.layout.cameras or camera not in benchmark.cameras:
                    raise ConfigError(f"camera {camera!r} is not among the store's {list(store.layout.cameras)} "
                                      f"and the benchmark's {list(benchmark.cameras)}")
            validation = store.holdout(config.validation_fraction)
            episodes = store.subset(config.data_fraction, config.seed, exclude=validation,
                                    per_task=config.episodes_per_task)
            check_windows_fit(store, episodes, config.history, config.chunk, config.frame_stride)


@contextlib.contextmanager
def _naming(cell: Cell):
    """Errors raised inside name the cell and its axes."""
    try:
        yield
    except RobovlmsError as error:
        error.args = (f"cell {cell.cell_id} ({describe_axes(cell.axes)}): {error}",)
        raise


def describe_axes(axes: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in axes.items()) or "fixed settings"


def fingerprint(sweep: SweepConfig, cells: list[Cell]) -> str:
    """What decides a sweep's results; workers, storage and heartbeats may change between runs."""
    decisive = sweep.model_dump(mode="json", exclude={"storage", "heartbeat_seconds", "run_dir"})
    decisive["evaluation"].pop("workers")
    if decisive["evaluation"].get("split") in (None, "test"):  # what every sweep evaluated before it could choose
        decisive["evaluation"].pop("split", None)
    decisive["store"].pop("generate")
    decisive["grid"] = decisive["grid"] or {}  # no grid was stored as {} before it could be None
    decisive["cells"] = [cell.cell_id for cell in cells]
    return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()
