"""The dry run: what each cell of a sweep needs, before anything runs.

For every trained cell: its parameters (total and trainable) and its training memory per device, with and without
gradient checkpointing (`robovlms/training/memory.py`), from its formulation built on the meta device, so no
weights are loaded and pretrained ones need not be on this machine; and where it runs. For the cells that train on
this machine's CPU (tiny backbones with accelerator cpu, or auto where there is no GPU), also their time: training
steps measured on a synthetic batch of the cell's shapes, on the threads one sweep worker gets, plus what a cell
costs beside its steps (building, checkpoints, validation) and, once per worker, the process start-up; and a bound
on evaluation. Cells meant for GPUs are never timed on the CPU: their time must be measured where they run.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from robovlms.benchmark import Benchmark
from robovlms.data.store import EpisodeStore
from robovlms.errors import RobovlmsError
from robovlms.sweep.cells import Cell, built_as
from robovlms.sweep.config import SweepConfig, evaluation_split
from robovlms.sweep.one_cell import sweep_benchmark

RENDERS_PER_SECOND = 60.0  # measured for Meta-World at 64-128 px with shadows and MSAA off


@dataclass
class CellCost:
    cell: Cell
    backbone: str = ""
    formulation: str = ""
    history: int | str = ""
    chunk: int | str = ""
    fraction: float | str = ""
    seed: int | str = ""
    parameters: int | None = None
    trainable: int | None = None
    memory: Any = None  # a MemoryEstimate per device
    runs_on: str = ""  # "gpu x 8 (fsdp)", "cpu"
    timed: bool = False  # trained on this machine's CPU, so its time was measured here
    train_s: float | None = None
    step_ms: float | None = None
    eval_max_s: float = 0.0
    source: str = ""  # where the backbone's sizes came from
    missing_path: str | None = None  # a pretrained path not on this machine
    notes: list[str] = field(default_factory=list)


@dataclass
class DryRun:
    cells: list[CellCost]
    threads: int  # per worker, as the sweep pins them
    startup_s: float | None = None  # a worker process's start-up, measured when cells are timed

    def total_seconds(self, workers: int) -> float | None:
        """Wall time of the timed cells on `workers` workers, evaluation at its bound, start-up once each."""
        timed = [cost for cost in self.cells if cost.timed or cost.cell.kind == "baseline"]
        if not timed:
            return None
        work = sum((cost.train_s or 0.0) + cost.eval_max_s for cost in timed)
        return (self.startup_s or 0.0) + work / max(1, workers)


def worker_threads(workers: int) -> int:
    """The threads each of `workers` sweep workers on this machine gets (`robovlms sweep --workers N`)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def dry_run(sweep: SweepConfig, cells: list[Cell], workers: int = 1, measure_steps: int = 2,
            progress: Callable[[int, int, str], None] | None = None) -> DryRun:
    """The dry run of `cells`: memory and parameters of every trained cell, times of the ones that run on this
    machine's CPU. `progress(done, total, what)` is called as each cell starts."""
    from robovlms.training import load_config

    store = EpisodeStore(sweep.store.path) if (Path(sweep.store.path) / "meta.json").exists() else None
    benchmark = sweep_benchmark(sweep, store)
    episodes = len(benchmark.tasks()) * sweep.evaluation.episodes_per_task
    instruction = longest_instruction(benchmark, sweep.benchmark.split, evaluation_split(sweep))
    threads = worker_threads(workers)
    built: dict[str, Any] = {}  # architecture -> (formulation on meta, Architecture) or the error
    timings: dict[str, tuple[float, float, float, float, float]] = {}
    costs = []
    for index, cell in enumerate(cells):
        cost = CellCost(cell, backbone=cell.policy)
        if progress is not None:
            progress(index, len(cells), cell.cell_id)
        steps_per_observation = 1
        if cell.kind == "pretraining":  # robovlms pretrain: its own frames and loss, not timed here
            cost.backbone, cost.formulation, cost.runs_on = f"{cell.axes['backbone']} (tiny)", "pre-training", "cpu"
            cost.notes.append(f"{cell.cell_id}: pre-training is not timed by the dry run; time it with `robovlms "
                              f"pretrain --backbone {cell.axes['backbone']} --steps 20` (docs/pretraining.md)")
        if cell.kind == "trained":
            # a cell that trains from a pre-training cell's directory, not there yet: the architecture it starts from
            config = load_config({**built_as(cell), "store": "-", "run_dir": "-"})
            describe(cost, config)
            estimate_memory_of(cost, config, benchmark, instruction, built)
            if cost.timed:
                key = json.dumps([config.model_dump(mode="json", include={"backbone", "formulation", "history",
                                                                          "chunk", "batch_size", "use_state",
                                                                          "state_input"})], sort_keys=True)
                if key not in timings:
                    timings[key] = measure_cell(config, benchmark, threads, measure_steps)
                build_s, step_s, forward_s, checkpoint_s, policy_s = timings[key]
                checkpoints = config.max_steps // config.checkpoint_every + 1
                validations = (config.max_steps // config.validate_every * config.validation_batches
                               if config.validation_fraction else 0)
                cost.train_s = build_s + step_s * config.max_steps + checkpoint_s * checkpoints + \
                    forward_s * validations
                cost.step_ms = policy_s * 1000
            execution = sweep.evaluation.execution or config.execution
            steps_per_observation = config.chunk if execution == "chunk" else 1
        observations = episodes * benchmark.max_steps / steps_per_observation
        cost.eval_max_s = observations * (1 / RENDERS_PER_SECOND + (cost.step_ms or 0.0) / 1000) / max(
            1, sweep.evaluation.workers)
        costs.append(cost)
    if progress is not None:
        progress(len(cells), len(cells), "")
    timed = [cost.cell.training for cost in costs if cost.timed]
    return DryRun(costs, threads, worker_startup_seconds(timed, threads) if timed else None)


def describe(cost: CellCost, config) -> None:
    """The cell's axes, where it runs, and whether it is timed here."""
    import torch

    cost.backbone = f"{config.backbone.name} ({config.backbone.size})"
    options = " ".join(f"{key}={value}" for key, value in config.formulation.options.items())
    cost.formulation = " ".join(filter(None, [config.formulation.name, options]))
    cost.history, cost.chunk, cost.fraction, cost.seed = (config.history, config.chunk, config.data_fraction,
                                                          config.seed)
    accelerator = str(config.accelerator)
    here_on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    from robovlms.training.memory import devices

    count = devices(config.devices) * config.num_nodes
    where = "cpu" if here_on_cpu else ("gpu" if accelerator == "auto" else accelerator)
    cost.runs_on = where + (f" x {count}" if count > 1 else "") + (
        f" ({config.strategy})" if str(config.strategy) != "auto" else "")
    cost.timed = here_on_cpu and config.backbone.size == "tiny"


def estimate_memory_of(cost: CellCost, config, benchmark: Benchmark, instruction: str, built: dict) -> None:
    """Parameters and memory per device of a trained cell, from its formulation on the meta device (built once per
    architecture)."""
    from robovlms.training.memory import estimate_memory, meta_formulation

    views = len(config.cameras) if config.cameras else len(benchmark.cameras)
    key = json.dumps(config.model_dump(mode="json", include={"backbone", "formulation", "history", "chunk",
                                                              "use_state", "state_input"}), sort_keys=True)
    if key not in built:
        try:
            built[key] = meta_formulation(config, benchmark.action_dim, benchmark.state_dim, published=True)
        except RobovlmsError as error:
            built[key] = error
    if isinstance(built[key], RobovlmsError):
        cost.notes.append(str(built[key]))
        return
    formulation, architecture = built[key]
    cost.source, cost.missing_path = architecture.source, architecture.missing_path
    batch = synthetic_batch(benchmark, config.batch_size, config.history, config.chunk, views=views, device="meta")
    cost.memory = estimate_memory(config, formulation, batch, instruction)
    cost.parameters, cost.trainable = cost.memory.parameters, cost.memory.trainable
    cost.notes += cost.memory.notes


def longest_instruction(benchmark: Benchmark, split: str, evaluation_split: str = "test") -> str:
    """The longest instruction of the episodes the cells are evaluated on: every context is padded to its longest."""
    try:
        instructions = [spec.instruction for spec in benchmark.split_episodes(split, evaluation_split, 1)]
    except Exception:  # noqa: BLE001 - a benchmark that cannot list its episodes here: a typical instruction
        instructions = []
    return max(instructions, key=len, default="pick up the red block and place it in the bin")


def measure_cell(config, benchmark: Benchmark, threads: int, repeats: int) -> tuple[float, ...]:
    """A tiny cell on this machine's CPU, on `threads` threads: seconds to build it, per training step (forward,
    backward, AdamW), per validation batch, per checkpoint, and per policy step."""
    import torch

    from robovlms.backbone import create_backbone
    from robovlms.formulation import create_formulation

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        started = time.perf_counter()
        backbone = create_backbone(config.backbone.name, **config.backbone.options)
        formulation = create_formulation(config.formulation.name, backbone, _unit_statistics(benchmark.action_dim),
                                         _unit_statistics(benchmark.state_dim), history=config.history,
                                         chunk=config.chunk, use_state=config.use_state,
                                         state_input=config.state_input, **config.formulation.options)
        backbone.freeze(config.backbone.freeze, lora_rank=config.backbone.lora_rank,
                        lora_targets=config.backbone.lora_targets)
        build = time.perf_counter() - started
        step, optimiser = _training_step_seconds(formulation, benchmark, config, repeats)
        batch = synthetic_batch(benchmark, config.batch_size, config.history, config.chunk)
        with torch.no_grad():
            forward = _median_seconds(lambda: formulation.loss(batch), repeats)
        checkpoint = _median_seconds(lambda: torch.save({"state_dict": formulation.state_dict(),
                                                         "optimizer": optimiser.state_dict()}, io.BytesIO()), 1)
        policy = _policy_step_seconds(formulation, benchmark, config, repeats)
    finally:
        torch.set_num_threads(before)
    return build, step, forward, checkpoint, policy


def worker_startup_seconds(trainings: list[dict], threads: int) -> float | None:
    """What a sweep worker process pays before its first cell, measured: a fresh interpreter importing robovlms
    and warming up as a worker does (`robovlms/sweep/startup.py`) for cells of these training settings."""
    from robovlms.sweep.startup import plugin_names

    backbones, formulations = plugin_names(trainings)
    command = [sys.executable, "-c", ("import sys; from robovlms.sweep.startup import warm_up; "
                                      "warm_up(sys.argv[1].split(','), sys.argv[2].split(','))"),
               ",".join(sorted(backbones)), ",".join(sorted(formulations))]
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, env=environment, check=False)
    return time.perf_counter() - started if finished.returncode == 0 else None


def _median_seconds(call, repeats: int) -> float:
    timings = []
    for _ in range(repeats + 1):  # the first call warms up
        started = time.perf_counter()
        call()
        timings.append(time.perf_counter() - started)
    return float(np.median(timings[1:]))


def _training_step_seconds(formulation, benchmark: Benchmark, config, repeats: int):
    import torch

    batch = synthetic_batch(benchmark, config.batch_size, config.history, config.chunk)
    optimiser = torch.optim.AdamW([p for p in formulation.parameters() if p.requires_grad],
                                  lr=config.learning_rate)

    def step() -> None:
        optimiser.zero_grad()
        formulation.loss(batch)[0].backward()
        optimiser.step()

    return _median_seconds(step, repeats), optimiser


def _policy_step_seconds(formulation, benchmark: Benchmark, config, repeats: int) -> float:
    import torch

    window = synthetic_batch(benchmark, 1, config.history, config.chunk)
    formulation.eval()
    with torch.no_grad():
        return _median_seconds(lambda: formulation.act(window["images"], window["state"], window["instruction"]),
                               repeats)


def _unit_statistics(dim: int):
    from robovlms.data.store import Statistics

    return Statistics(p01=[-1.0] * dim, p99=[1.0] * dim, mean=[0.0] * dim, std=[1.0] * dim, min=[-1.0] * dim,
                      max=[1.0] * dim)


def synthetic_batch(benchmark: Benchmark, batch: int, history: int, chunk: int, views: int | None = None,
                    device: str = "cpu") -> dict[str, Any]:
    """A training batch of the benchmark's shapes: random images, zero state and actions."""
    import torch

    views, size = views or len(benchmark.cameras), benchmark.image_size
    return {"images": torch.randint(0, 256, (batch, history, views, size, size, 3), dtype=torch.uint8,
                                    device=device),
            "state": torch.zeros(batch, history, benchmark.state_dim, device=device),
            "actions": torch.zeros(batch, history, chunk, benchmark.action_dim, device=device),
            "action_mask": torch.ones(batch, history, chunk, dtype=torch.bool, device=device),
            "frame_mask": torch.ones(batch, history, dtype=torch.bool, device=device),
            "task": torch.zeros(batch, dtype=torch.long, device=device), "instruction": ["press the button"] * batch}
