"""The dry run's cost estimate: training time measured on a synthetic batch of each cell's shapes, and a bound on
evaluation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from robovlms.benchmark import Benchmark
from robovlms.data.store import EpisodeStore
from robovlms.sweep.cells import Cell
from robovlms.sweep.config import SweepConfig
from robovlms.sweep.one_cell import sweep_benchmark


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
    from robovlms.data.store import Statistics

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
