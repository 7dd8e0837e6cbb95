"""What a sweep records for each cell, on disk, so reports read it without re-running anything.

A sweep's run directory:
    sweep.yaml                  the validated sweep file
    optuna.db                   the default Optuna storage (SQLite), when no storage URL is given
    cells/<cell_id>/
        result.json             one CellResult: settings, status, costs, success (written last, atomically)
        records.parquet, .csv   one row per evaluation episode (EpisodeRecord fields)
        train/                  the training run directory (config.yaml, checkpoints/, logs/, tensorboard/)
    results/cells.parquet, .csv       every cell's CellResult flattened, one row each (gathered by `gather`)
    results/episodes.parquet, .csv    every episode of every cell, with its cell_id
    results/trials.csv, best.json     a search's trials (Optuna's trials_dataframe) and its best trial

A cell's files are written by the one worker that holds its Optuna trial; result.json is the cell's commit
record: a cell directory without it is unfinished. A result.json that cannot be read (truncated, or keys this
robovlms does not know) counts as unfinished to the sweep, which runs the cell again, and as damaged to a report.
"""

from __future__ import annotations

import json
import platform
import warnings
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd

from robovlms.atomic_files import write_json_atomically
from robovlms.benchmark import BENCHMARKS, EpisodeRecord
from robovlms.errors import RobovlmsError
from robovlms.records import records_frame, write_table
from robovlms.registry import PluginSource

SWEEP_FILE = "sweep.yaml"
CELLS_DIR = "cells"
RESULTS_DIR = "results"
RESULT_FILE = "result.json"
SEARCH_TRIALS_FILE = "trials.csv"
SEARCH_BEST_FILE = "best.json"
RECORDS_FILE = "records.parquet"
TRAIN_DIR = "train"
VERSIONED_PACKAGES = ("robovlms", "torch", "transformers", "lightning", "optuna", "metaworld", "mujoco", "peft")


@dataclass
class CellResult:
    """One cell of a sweep: a trained configuration (kind "trained") or a baseline policy (kind "baseline")."""

    cell_id: str
    status: str  # "complete" | "failed"
    kind: str  # "trained" | "baseline"
    benchmark: str
    split: str  # the benchmark's split, e.g. "ABC->D"
    policy: str  # "trained", or the baseline's name: "zero", "mean", "replay"
    backbone: str | None = None  # registered name, None for baselines
    backbone_label: str | None = None  # e.g. "gpt-scratch (tiny, random init)"
    backbone_size: str | None = None  # e.g. "hidden 64, 64 px images, 0.31M parameters"
    random_init: bool | None = None
    formulation: str | None = None
    action_objective: str | None = None  # e.g. "flow-matching (10 steps)"; None where the formulation has none
    history: int | None = None
    chunk: int | None = None
    data_fraction: float | None = None
    episodes_per_task: int | None = None  # few-shot: training episodes per task
    seed: int = 0
    error: str | None = None  # why a failed cell failed
    episodes: int = 0
    successes: int = 0
    success: float | None = None  # successes / episodes
    scores: dict[str, float] = field(default_factory=dict)  # the benchmark's own `score` (per task, chain lengths)
    parameters: int | None = None
    trainable_parameters: int | None = None
    train_seconds: float | None = None
    eval_seconds: float | None = None
    step_latency_ms: float | None = None  # one policy step (observations in, actions out), median
    latency_device: str | None = None  # where it was timed: "cpu", "cuda:0 (NVIDIA H200)"
    latency_batch: int | None = None  # episodes stepped together in it (the evaluation's workers when served)
    final_train_loss: float | None = None
    checkpoint: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the resolved training config (or baseline settings)
    axes: dict[str, Any] = field(default_factory=dict)  # this cell's values of the sweep's grid axes
    versions: dict[str, str] = field(default_factory=dict)
    sweep: str = ""  # the sweep's name (its study)
    trial: int | None = None  # the Optuna trial number that produced it
    # which episodes of the split its numbers come from: "validation" (for choosing settings) or "test"; results
    # written before the field existed were all evaluated on the test episodes
    evaluation_split: str = "test"


def software_versions(benchmark: str | None = None, training: dict[str, Any] | None = None) -> dict[str, str]:
    """Python, the core packages, and the package and version of each plugin a cell used: its `benchmark` and,
    for a trained cell (`training`: its training settings), its backbone and formulation."""
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    for source in _plugin_sources(benchmark, training):
        if source.distribution is not None:
            versions[source.distribution] = source.version
    return versions


def _plugin_sources(benchmark: str | None, training: dict[str, Any] | None) -> list[PluginSource]:
    from robovlms.backbone import BACKBONES
    from robovlms.formulation import FORMULATIONS
    from robovlms.training import load_config

    sources = [BENCHMARKS.source(benchmark)] if benchmark is not None else []
    if training is not None:
        config = load_config({**training, "store": "-", "run_dir": "-"})
        sources += [BACKBONES.source(config.backbone.name), FORMULATIONS.source(config.formulation.name)]
    return sources


def write_records(cell_dir: Path, records: list[EpisodeRecord]) -> None:
    write_table(records_frame(records), cell_dir, Path(RECORDS_FILE).stem)


def write_cell_result(cell_dir: Path, result: CellResult) -> None:
    """Commit a cell: result.json is written last and atomically, so a crash leaves the cell unfinished."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(cell_dir / RESULT_FILE, asdict(result))


class DamagedResultError(RobovlmsError):
    """A cell's result.json that is not a readable CellResult."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path} is damaged: {reason}")


def load_cell_result(cell_dir: Path) -> CellResult | None:
    """A cell's committed result; None when it has none. DamagedResultError when result.json is truncated or does
    not hold a CellResult."""
    path = Path(cell_dir) / RESULT_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedResultError(path, f"{RESULT_FILE} is truncated or not JSON ({error})") from None
    if not isinstance(payload, dict):
        raise DamagedResultError(path, f"{RESULT_FILE} holds no JSON object")
    try:
        return CellResult(**payload)
    except TypeError as error:  # an unknown or a missing key
        reason = str(error).removeprefix("CellResult.__init__() ")
        raise DamagedResultError(path, f"{RESULT_FILE} is not a cell result of this robovlms ({reason})") from None


def read_cell_result(cell_dir: Path) -> CellResult | None:
    """A cell's committed result, as the sweep reads it: a damaged one is None (unfinished: the cell runs again)."""
    try:
        return load_cell_result(cell_dir)
    except DamagedResultError as error:
        warnings.warn(f"{error}; the cell counts as unfinished", stacklevel=2)
        return None


def read_cell_results(run_dir: str | Path) -> list[CellResult]:
    """Every committed cell of a sweep's run directory, in cell-id order (damaged ones left out)."""
    cells = Path(run_dir) / CELLS_DIR
    results = [read_cell_result(cell) for cell in sorted(cells.iterdir())] if cells.is_dir() else []
    return [result for result in results if result is not None]


def read_cell_records(run_dir: str | Path, cell_id: str) -> pd.DataFrame:
    path = Path(run_dir) / CELLS_DIR / cell_id / RECORDS_FILE
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()


def read_training_curve(run_dir: str | Path, cell_id: str) -> pd.DataFrame:
    """Lightning's CSV log of a trained cell: one row per logged step (columns step, train/loss, ...)."""
    logs = Path(run_dir) / CELLS_DIR / cell_id / TRAIN_DIR / "logs"
    files = sorted(logs.glob("version_*/metrics.csv"))
    if not files:
        return pd.DataFrame()
    frame = pd.concat([pd.read_csv(file) for file in files], ignore_index=True)
    return frame.groupby("step", as_index=False).last() if "step" in frame else frame


def gather(run_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write results/cells.* and results/episodes.* from the committed cells; return (cells, episodes)."""
    run_dir = Path(run_dir)
    results = read_cell_results(run_dir)
    cells = pd.DataFrame([_flat(asdict(result)) for result in results])
    episodes = [read_cell_records(run_dir, result.cell_id).assign(cell_id=result.cell_id) for result in results]
    episodes = pd.concat([frame for frame in episodes if len(frame)], ignore_index=True) if any(
        len(frame) for frame in episodes) else pd.DataFrame()
    out = run_dir / RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    write_table(cells, out, "cells")
    write_table(episodes, out, "episodes")
    return cells, episodes


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """Nested fields (config, axes, scores, versions) as JSON strings, so Parquet and CSV hold them."""
    return {key: json.dumps(value, sort_keys=True) if isinstance(value, dict) else value for key, value in row.items()}
