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
    """Per cell, measured on synthetic batches of the cell's shapes (tiny backbones only): seconds per training
    step (forward, backward and AdamW step) times the steps, the policy's step latency (one observation in, one
    chunk out: a full decoding, so autoregressive discrete decoding counts its backbone pass per token), and an upper
    bound on evaluation: every episode runs to the step limit, each observation rendered and answered by the
    policy."""
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
               "seed": "", "train_s": 0.0, "step_ms": 0.0}
        steps_per_observation = 1
        if cell.kind == "trained":
            config = load_config({**cell.training, "store": "-", "run_dir": "-"})
            row.update(backbone=f"{config.backbone.name} ({config.backbone.size})",
                       formulation=" ".join([config.formulation.name, *(f"{key}={value}" for key, value in
                                                                        config.formulation.options.items())]),
                       H=config.history, L=config.chunk,
                       fraction=config.data_fraction, seed=config.seed)
            shape_key = json.dumps([config.backbone.model_dump(), config.formulation.model_dump(), config.history,
                                    config.chunk, config.batch_size, config.use_state, config.state_input],
                                   sort_keys=True, default=str)
            if config.backbone.size == "tiny" and shape_key not in measured:
                torch.manual_seed(0)
                formulation = create_formulation(config.formulation.name,
                                                 create_backbone(config.backbone.name, **config.backbone.options),
                                                 _unit_statistics(benchmark.action_dim),
                                                 _unit_statistics(benchmark.state_dim), history=config.history,
                                                 chunk=config.chunk, use_state=config.use_state,
                                                 state_input=config.state_input,
                                                 **config.formulation.options)
                measured[shape_key] = (_training_step_seconds(formulation, benchmark, config, measure_steps),
                                       _policy_step_seconds(formulation, benchmark, config, measure_steps))
            per_step, policy_step = measured.get(shape_key, (float("nan"), float("nan")))
            row["train_s"], row["step_ms"] = per_step * config.max_steps, policy_step * 1000
            execution = sweep.evaluation.execution or config.execution
            steps_per_observation = config.chunk if execution == "chunk" else 1
        renders_per_second = 60.0  # measured for Meta-World at 64-128 px with shadows and MSAA off
        observations = episodes * benchmark.max_steps / steps_per_observation
        row["eval_max_s"] = observations * (1 / renders_per_second + row["step_ms"] / 1000) / max(
            1, sweep.evaluation.workers)
        rows.append(row)
    return rows


def _median_seconds(call, repeats: int) -> float:
    timings = []
    for _ in range(repeats + 1):  # the first call warms up
        started = time.perf_counter()
        call()
        timings.append(time.perf_counter() - started)
    return float(np.median(timings[1:]))


def _training_step_seconds(formulation, benchmark: Benchmark, config, repeats: int) -> float:
    import torch

    batch = _synthetic_batch(benchmark, config.batch_size, config.history, config.chunk)
    optimiser = torch.optim.AdamW(formulation.parameters(), lr=config.learning_rate)

    def step() -> None:
        optimiser.zero_grad()
        formulation.loss(batch)[0].backward()
        optimiser.step()

    return _median_seconds(step, repeats)


def _policy_step_seconds(formulation, benchmark: Benchmark, config, repeats: int) -> float:
    import torch

    window = _synthetic_batch(benchmark, 1, config.history, config.chunk)
    formulation.eval()
    with torch.no_grad():
        return _median_seconds(lambda: formulation.act(window["images"], window["state"], window["instruction"]),
                               repeats)


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
