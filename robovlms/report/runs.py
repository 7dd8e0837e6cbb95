"""Reading sweep run directories: every committed cell, its episodes and training curves, of one benchmark and
split."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow
import yaml

from robovlms.errors import ReportError
from robovlms.results import (CELLS_DIR, RECORDS_FILE, RESULTS_DIR, SEARCH_BEST_FILE, SEARCH_TRIALS_FILE, SWEEP_FILE,
                              CellResult, DamagedResultError, load_cell_result, read_training_curve)

# The columns that name one configuration; seeds of a configuration are pooled into one row. Any other training
# setting that differs between cells (a searched learning rate, a grid's batch size or formulation option) is a
# configuration column too (SweepRuns.settings).
PRETRAINING_AXIS = "pretraining"  # a grid axis of sweeps with pre-training cells (robovlms/sweep/cells.py)
CONFIGURATION = ["backbone_label", "formulation", "history", "chunk", "data_fraction"]
DAMAGED_COLUMNS = ["run", "cell_id", "status", "axes", "error"]
# Resolved training config keys that are not settings of their own: the seed (pooled), where the data and the run
# live, and what the CONFIGURATION columns already show (the backbone's label names its size, or its weights' path).
NOT_SETTINGS = {"seed", "store", "run_dir", "backbone", "backbone.name", "backbone.size", "backbone.path",
                "formulation", "formulation.name", "history", "chunk", "data_fraction", "episodes_per_task"}
# The formulation options of the action objective (robovlms/action_objectives.py OBJECTIVE_OPTIONS, named here so
# that reading reports needs no torch): the ACTION_OBJECTIVE column shows them together.
OBJECTIVE_OPTIONS = ("objective", "arm_loss", "denoising_steps", "expert_width", "expert_layers")
ACTION_OBJECTIVE = "action_objective"
DEFAULT_SETTING = "(default)"  # a setting a trained cell's resolved config leaves to its plugin's default
REPEAT_RUN = "repeat_run"  # the run of a cell whose configuration and seed another run repeats, so kept apart
# What decides the evaluation in a run's sweep.yaml (section, key); runs that differ in one are not compared.
EVALUATION_SETTINGS = {"episodes per task": ("evaluation", "episodes_per_task"),
                       "evaluation execution": ("evaluation", "execution"), "store": ("store", "path")}
BASELINE_LABELS = {"zero": "zero action (baseline)", "mean": "mean action (baseline)",
                   "replay": "demo replay (baseline)", "expert": "scripted expert (baseline)"}


@dataclass
class SweepRuns:
    """The cells of one or more sweep run directories, all of one benchmark, one split and one evaluation split."""

    benchmark: str | None  # None when no cell has committed
    split: str | None
    # One row per committed cell: CellResult fields plus `run`; the CONFIGURATION columns are display strings
    # ("" where a baseline has none), `fraction` keeps data_fraction as a number. Sorted trained first.
    cells: pd.DataFrame
    episodes: pd.DataFrame  # one row per evaluation episode of a complete cell, with its cell's CONFIGURATION
    curves: pd.DataFrame  # Lightning's logged metrics of every trained cell: run, cell_id, step, train/loss, ...
    unfinished: pd.DataFrame  # run, cell_id of cell directories without result.json
    results: list[CellResult]
    # run, cell_id, status, axes, error of cells whose files cannot be read: a damaged result.json (the cell is in
    # no other table), or a complete cell's missing or corrupt records.parquet (left out of the per-episode tables)
    damaged: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=DAMAGED_COLUMNS))
    settings: list[str] = field(default_factory=list)  # configuration columns beyond CONFIGURATION
    repeats: list[str] = field(default_factory=list)  # each configuration and seed that several runs hold
    trials: dict[str, pd.DataFrame] = field(default_factory=dict)  # run -> a search's results/trials.csv
    best: dict[str, dict] = field(default_factory=dict)  # run -> a search's results/best.json
    evaluation_split: str | None = None  # "validation" or "test": which episodes of the split every cell ran
    pretraining: list[CellResult] = field(default_factory=list)  # the pre-training cells, which have no episodes

    @property
    def configuration(self) -> list[str]:
        """The columns that tell one row of a table from another."""
        return [*CONFIGURATION, *self.settings]


def read_sweep_runs(run_dirs: Iterable[str | Path]) -> SweepRuns:
    paths = list(dict.fromkeys(Path(path) for path in run_dirs))
    for path in paths:
        if not (path / CELLS_DIR).is_dir() and not (path / SWEEP_FILE).is_file():
            raise ReportError(f"{path} is not a sweep run directory: it has neither {CELLS_DIR}/ nor {SWEEP_FILE}")
    names = [path.name for path in paths]
    runs = names if len(set(names)) == len(names) else [str(path) for path in paths]

    results, rows, unfinished, damaged, pretraining = [], [], [], [], []
    for run, path in zip(runs, paths):
        cell_dirs = sorted((path / CELLS_DIR).iterdir()) if (path / CELLS_DIR).is_dir() else []
        for cell in filter(Path.is_dir, cell_dirs):
            try:
                result = load_cell_result(cell)
            except DamagedResultError as error:
                damaged.append({"run": run, "cell_id": cell.name, "status": "damaged", "axes": "",
                                "error": error.reason})
                continue
            if result is None:
                unfinished.append({"run": run, "cell_id": cell.name})
                continue
            if result.kind == "pretraining":  # no episodes: its own section reads it (report/pretraining.py)
                pretraining.append(result)
                continue
            results.append(result)
            rows.append({**asdict(result), "run": run, "run_dir": path})
    cells = pd.DataFrame(rows, columns=[f.name for f in fields(CellResult)] + ["run", "run_dir"])
    benchmark = _one_value(cells, "benchmark", "benchmarks")
    split = _one_value(cells, "split", f"splits of {benchmark}")
    evaluation_split = _one_value(cells, "evaluation_split", "evaluation splits (validation episodes choose "
                                  "settings, test episodes report them)")
    _check_evaluated_alike(dict(zip(runs, paths)))
    cells = _with_configuration(cells)
    cells, settings = _with_settings(cells)
    cells, repeats = _with_repeats_apart(cells, [*CONFIGURATION, *settings])
    if repeats:
        settings.append(REPEAT_RUN)
    configuration = [*CONFIGURATION, *settings]

    episodes = []
    for cell in cells[cells.status == "complete"].itertuples():
        try:
            episodes.append(_cell_records(cell.run_dir / CELLS_DIR / cell.cell_id).assign(run=cell.run,
                                                                                           cell_id=cell.cell_id))
        except _UnreadableRecords as problem:
            damaged.append({"run": cell.run, "cell_id": cell.cell_id, "status": "complete, records unreadable",
                            "axes": json.dumps(cell.axes, sort_keys=True),
                            "error": f"{problem}: its episodes are left out of the per-task and per-scene tables"})
    episodes = pd.concat([frame for frame in episodes if len(frame)] or [pd.DataFrame(columns=["run", "cell_id"])],
                         ignore_index=True)
    episodes = episodes.merge(cells[["run", "cell_id", *configuration]], on=["run", "cell_id"], sort=False)

    curves = [read_training_curve(cell.run_dir, cell.cell_id).assign(run=cell.run, cell_id=cell.cell_id)
              for cell in cells[cells.kind == "trained"].itertuples()]
    curves = pd.concat([frame for frame in curves if "step" in frame] or [pd.DataFrame(columns=["run", "cell_id"])],
                       ignore_index=True)
    trials = {run: pd.read_csv(path / RESULTS_DIR / SEARCH_TRIALS_FILE) for run, path in zip(runs, paths)
              if (path / RESULTS_DIR / SEARCH_TRIALS_FILE).is_file()}
    best = {run: json.loads((path / RESULTS_DIR / SEARCH_BEST_FILE).read_text()) for run, path in zip(runs, paths)
            if (path / RESULTS_DIR / SEARCH_BEST_FILE).is_file()}
    pruned = {(run, cell) for run, frame in trials.items() if "user_attrs_cell" in frame
              for cell in frame.user_attrs_cell[frame.state == "PRUNED"]}
    unfinished = [cell for cell in unfinished if (cell["run"], cell["cell_id"]) not in pruned]  # with the trials
    return SweepRuns(benchmark, split, cells.drop(columns="run_dir"), episodes, curves,
                     pd.DataFrame(unfinished, columns=["run", "cell_id"]), results,
                     damaged=pd.DataFrame(damaged, columns=DAMAGED_COLUMNS), settings=settings, repeats=repeats,
                     trials=trials, best=best, evaluation_split=evaluation_split, pretraining=pretraining)


class _UnreadableRecords(Exception):
    pass


def _cell_records(cell_dir: Path) -> pd.DataFrame:
    path = cell_dir / RECORDS_FILE
    if not path.is_file():
        raise _UnreadableRecords(f"{RECORDS_FILE} is missing")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise _UnreadableRecords(f"{RECORDS_FILE} is corrupt ({' '.join(str(error).split())})") from None


def _check_evaluated_alike(run_dirs: dict[str, Path]) -> None:
    """Runs whose sweep files evaluate differently (other benchmark options such as tasks or cameras, episodes per
    task, execution, store) are refused: their rates are not rates of one thing."""
    sweeps = {run: yaml.safe_load((path / SWEEP_FILE).read_text()) or {} for run, path in run_dirs.items()
              if (path / SWEEP_FILE).is_file()}
    options = {run: sweep.get("benchmark", {}).get("options", {}) for run, sweep in sweeps.items()}
    settings = {**{f"benchmark option {key!r}": ("benchmark", "options", key)
                   for key in sorted({key for values in options.values() for key in values})},
                **EVALUATION_SETTINGS}
    for name, path in settings.items():
        found: dict[str, list[str]] = {}
        for run, sweep in sweeps.items():
            value: Any = sweep
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            found.setdefault(json.dumps(value, sort_keys=True), []).append(run)
        if len(found) > 1:
            listing = "; ".join(f"{value} in {', '.join(runs)}" for value, runs in found.items())
            raise ReportError(f"cannot pool runs evaluated with different {name}: {listing}. Report each one "
                              f"separately.")


def _flat(mapping: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted keys and their values; an empty mapping (options: {}) sets nothing, so it has no key."""
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _setting_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # every digit: values that differ are never shown, or grouped, as one
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _with_settings(cells: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """A column for each training setting (dotted for nested ones: formulation.options.head) whose value differs
    between complete trained cells, so that cells differing in it are never pooled as seeds."""
    flat = [dict(_flat(config)) if kind == "trained" else {} for kind, config in zip(cells.kind, cells.config)]
    compared = [settings for settings, kind, status in zip(flat, cells.kind, cells.status)
                if kind == "trained" and status == "complete"]
    objective_settings = {f"formulation.options.{option}" for option in OBJECTIVE_OPTIONS}
    keys = sorted({key for settings in compared for key in settings} - NOT_SETTINGS - objective_settings)
    varied = [key for key in keys if len({_setting_text(settings.get(key)) for settings in compared}) > 1]
    columns = [key if key not in cells else f"config.{key}" for key in varied]
    for key, column in zip(varied, columns):
        cells[column] = [_setting_text(settings[key]) if key in settings else
                         DEFAULT_SETTING if kind == "trained" else "" for settings, kind in zip(flat, cells.kind)]
    cells[ACTION_OBJECTIVE] = cells[ACTION_OBJECTIVE].fillna("")
    trained = cells[(cells.kind == "trained") & (cells.status == "complete")]
    if trained[ACTION_OBJECTIVE].replace("", None).nunique() > 1:  # "": a formulation without one
        columns.insert(0, ACTION_OBJECTIVE)
    return cells, columns


def _with_repeats_apart(cells: pd.DataFrame, configuration: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """A seed counts once. Cells of one configuration and seed in several runs (a copied run, a sweep run twice) are
    kept apart: the REPEAT_RUN column holds their run, so each run's cells of that configuration make their own
    row. Returns the cells and one line per repeat; a repeat within one run is refused."""
    complete = cells[cells.status == "complete"]
    repeats, repeated = [], set()
    for key, group in complete.groupby([*configuration, "seed"], sort=False):
        if len(group) == 1:
            continue
        listing = ", ".join(f"{run} (cell {cell})" for run, cell in zip(group.run, group.cell_id))
        label = ", ".join(f"{column} {value}" for column, value in zip(configuration, key[:-1]) if value != "")
        if group.run.nunique() < len(group):
            raise ReportError(f"cells {listing} repeat one configuration ({label}) and seed {key[-1]} in one run; "
                              f"remove the copies")
        repeats.append(f"seed {key[-1]} of ({label}) is in {listing}")
        repeated.add(key[:-1])
    keys = list(cells[configuration].itertuples(index=False, name=None))
    if repeats:
        cells[REPEAT_RUN] = [run if key in repeated else "" for key, run in zip(keys, cells.run)]
    return cells, repeats


def _one_value(cells: pd.DataFrame, column: str, what: str) -> str | None:
    """The single benchmark (or split) of every cell; a report compares like with like, so mixtures are refused."""
    found = cells.groupby(column)["run"].unique()
    if len(found) > 1:
        listing = "; ".join(f"{value!r} in {', '.join(runs)}" for value, runs in found.items())
        raise ReportError(f"cannot report different {what} together: {listing}. Report each one separately.")
    return found.index[0] if len(found) else None


def _baseline_order(policy: str) -> int:
    return list(BASELINE_LABELS).index(policy) + 1 if policy in BASELINE_LABELS else len(BASELINE_LABELS) + 1


def _backbone_label(cell: pd.Series) -> str:
    if cell.kind == "baseline":
        return BASELINE_LABELS.get(cell.policy, f"{cell.policy} (baseline)")
    if cell.backbone_label:
        return cell.backbone_label
    if not cell.backbone:  # a failed cell: the sweep records only its axes and config
        return ""
    return f"{cell.backbone} (random init)" if cell.random_init else cell.backbone


def _with_configuration(cells: pd.DataFrame) -> pd.DataFrame:
    """Sort trained cells first, then baselines, and turn the CONFIGURATION columns into display strings."""
    cells = cells.assign(fraction=pd.to_numeric(cells.data_fraction, errors="coerce"),
                         order=[0 if kind == "trained" else _baseline_order(policy)
                                for kind, policy in zip(cells.kind, cells.policy)])
    cells["backbone_label"] = [_backbone_label(cell) for _, cell in cells.iterrows()]
    cells = cells.sort_values(["order", "backbone_label", "formulation", "history", "chunk", "fraction", "seed",
                               "run", "cell_id"], na_position="first", ignore_index=True)
    cells["formulation"] = cells.formulation.fillna("")
    for column in ("history", "chunk"):
        cells[column] = [_integer_text(value) for value in cells[column]]
    cells["data_fraction"] = ["" if pd.isna(value) else f"{value:g}" + ("" if pd.isna(per_task) else f", {per_task:g}/task")
                              for value, per_task in zip(cells.fraction, cells.episodes_per_task)]
    return cells


def _integer_text(value: object) -> str:
    return "" if pd.isna(value) else str(int(value))


def complete_cells(runs: SweepRuns) -> pd.DataFrame:
    return runs.cells[runs.cells.status == "complete"]
