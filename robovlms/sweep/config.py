"""The sweep file: its schema, validated before any work starts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from robovlms.baselines import BASELINES
from robovlms.errors import config_error
from robovlms.yaml_files import read_yaml_mapping

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
    # which episodes of the split every cell is evaluated on: "validation" for choosing settings, "test" for
    # reporting them; by default test for `robovlms sweep`, validation for `robovlms tune` (evaluation_split)
    split: Literal["validation", "test"] | None = None
    episodes_per_task: int = Field(10, ge=1)
    workers: int = Field(1, ge=1)  # simulator processes per cell
    # the policy's device: auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N
    device: str = "auto"
    # one process holds the policy and serves every worker, batching their steps; false: each worker loads its own
    # copy on the CPU
    policy_server: bool = True
    execution: Literal["first", "ensemble", "chunk"] | None = None  # overrides each cell's own
    videos_per_task: int = Field(0, ge=0)
    latency_steps: int = Field(20, ge=1)  # policy steps timed for the step latency

    @field_validator("device")
    @classmethod
    def _a_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"{device!r} is none of auto, cpu, cuda, cuda:N")
        return device


class SearchDimension(_Strict):
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list[Any] | None = None


class SearchSettings(_Strict):
    trials: int = Field(10, ge=1)
    space: dict[str, SearchDimension]  # training keys, dotted for nested ones (formulation.options.head)
    # success: on the evaluation split's episodes (validation unless the sweep names test); val_loss: on held-out
    # training windows (train.validation_fraction)
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
    # axes; a list of grids is their union; without a grid the training settings alone are one cell
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]] | None = None
    baselines: list[Literal["zero", "mean", "replay"]] = list(BASELINES)
    evaluation: EvaluationSettings = EvaluationSettings()
    search: SearchSettings | None = None  # for `robovlms tune`
    heartbeat_seconds: int = Field(30, ge=1)  # a worker silent for twice this long is taken for dead


def with_evaluation_split(sweep: SweepConfig, mode: str) -> SweepConfig:
    """The sweep with its evaluation split decided: as the file names it, else test for a grid (`robovlms sweep`,
    whose results are reported) and validation for a search (`robovlms tune`, which chooses settings): a search
    selects on the test episodes only when its file names them."""
    if sweep.evaluation.split is not None:
        return sweep
    split = "validation" if mode == "search" else "test"
    return sweep.model_copy(update={"evaluation": sweep.evaluation.model_copy(update={"split": split})})


def evaluation_split(sweep: SweepConfig) -> str:
    """The episodes a sweep's cells are evaluated on; test for a sweep file made before it could choose."""
    return sweep.evaluation.split or "test"


def load_sweep(source: str | Path | dict[str, Any]) -> SweepConfig:
    raw = source if isinstance(source, dict) else read_yaml_mapping(source, "sweep settings")
    try:
        return SweepConfig.model_validate(raw)
    except ValidationError as error:
        raise config_error("invalid sweep file", SweepConfig, error) from None
