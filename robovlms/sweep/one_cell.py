"""Running one cell: train it (resuming from its last checkpoint), evaluate it by rollouts, time a policy step,
and commit its files (robovlms/results.py).

A trained cell's policy is loaded once, on `evaluation.device` in the dtype it trained in; this process serves it to
the evaluation's simulator workers (robovlms/serving/evaluation_server.py), and its step is timed there, on that
device, with as many episodes at once as there are workers."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from robovlms.atomic_files import remove_leftovers
from robovlms.baselines import baseline_factory
from robovlms.benchmark import BENCHMARKS, Benchmark, EpisodeSpec, Observation, create_benchmark
from robovlms.data.store import EpisodeStore
from robovlms.errors import ConfigError
from robovlms.results import (
    CELLS_DIR,
    TRAIN_DIR,
    CellResult,
    cpu_seconds,
    read_training_curve,
    software_versions,
    write_cell_result,
    write_records,
)
from robovlms.sweep.cells import Cell
from robovlms.sweep.config import SweepConfig, evaluation_split


def sweep_benchmark(sweep: SweepConfig, store: EpisodeStore | None) -> Benchmark:
    """The sweep's benchmark, with the options its store was generated with, checked against the store."""
    BENCHMARKS.get(sweep.benchmark.name)  # an unknown name lists the valid ones before the store is compared
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


def check_evaluated_tasks(sweep: SweepConfig, store: EpisodeStore, benchmark: Benchmark) -> None:
    """Evaluating on tasks the store holds no demonstrations of would be recorded as an ordinary result: refused.
    Checked where the store names its tasks as the benchmark does (an imported dataset may name them its own way,
    e.g. Bridge by the dataset)."""
    stored = set(store.tasks())
    named_as_benchmark = set(create_benchmark(benchmark.name, **store.metadata.get("benchmark_options", {})).tasks())
    missing = sorted(set(benchmark.tasks()) - stored)
    if missing and stored & named_as_benchmark:
        remedy = ("set benchmark.options.tasks to tasks of the store" if "tasks" in benchmark.options() else
                  f"{benchmark.name} evaluates on all of its tasks, so train on a store that holds them")
        raise ConfigError(f"the sweep evaluates on task(s) {', '.join(missing)} that the store {store.path} holds "
                          f"no demonstrations of (it holds: {', '.join(sorted(stored))}); {remedy}")


def ensure_store(sweep: SweepConfig) -> EpisodeStore:
    """The sweep's store; generated when it is missing and the sweep says how (`store.generate`)."""
    from robovlms.data.demonstrations import check_generated_as, generate_demonstrations

    path = Path(sweep.store.path)
    if sweep.store.generate is None:
        return EpisodeStore(path)
    if (path / "meta.json").exists():
        store = EpisodeStore(path)
        check_generated_as(store, sweep.store.generate.episodes, sweep.store.generate.scenes)
        return store

    benchmark = sweep_benchmark(sweep, None)
    generation = sweep.store.generate
    resume = path.with_name(path.name + ".partial").exists()
    return generate_demonstrations(benchmark, sweep.benchmark.split, generation.episodes, path,
                                   scenes=generation.scenes, workers=generation.workers, resume=resume)


class CellReleased(Exception):
    """This attempt no longer holds its cell: another worker took it for dead and the cell runs again."""


def run_cell(sweep: SweepConfig, cell: Cell, run_dir: Path, on_validation: Callable | None = None,
             trial_number: int | None = None, progress: bool = False,
             holds_cell: Callable[[], bool] | None = None) -> CellResult:
    """Train (resuming from the cell's last checkpoint; `on_validation(step, metrics)` after each validation) and
    evaluate one cell; commit its files, unless `holds_cell` says that this attempt was taken for dead meanwhile
    (then CellReleased)."""
    cell_dir = run_dir / CELLS_DIR / cell.cell_id
    cell_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(cell_dir, recursive=True)  # of an attempt killed mid-write
    cpu_started = cpu_seconds()
    if cell.kind == "pretraining":
        return run_pretraining_cell(sweep, cell, cell_dir, trial_number, progress, holds_cell)
    store = EpisodeStore(sweep.store.path)
    benchmark = sweep_benchmark(sweep, store)
    result = CellResult(cell_id=cell.cell_id, status="complete", kind=cell.kind, benchmark=benchmark.name,
                        split=sweep.benchmark.split, policy=cell.policy, axes=cell.axes,
                        versions=software_versions(benchmark.name, cell.training if cell.kind == "trained" else None),
                        sweep=sweep.name, trial=trial_number, evaluation_split=evaluation_split(sweep))
    specs = benchmark.split_episodes(sweep.benchmark.split, evaluation_split(sweep), sweep.evaluation.episodes_per_task)
    evaluation = sweep.evaluation
    served = cell.kind == "trained" and evaluation.policy_server
    if cell.kind == "baseline":
        policy = baseline_factory(cell.policy, benchmark, store.path, seed=0)
        result.config = {"policy": cell.policy, "store": str(store.path)}
        timed = policy()
    else:
        from robovlms.policy import policy_factory

        timed = train_cell(sweep, cell, cell_dir, result, on_validation, progress, evaluation.device if served else "cpu")
        one_process = served or evaluation.workers <= 1  # with one worker, the episodes run here, on this copy
        policy = timed if one_process else policy_factory(cell_dir / TRAIN_DIR, evaluation.execution)
    result.latency_device = describe_device(timed.device) if cell.kind == "trained" else "cpu"
    result.latency_batch = min(evaluation.workers, len(specs)) if served else 1
    if cell.kind == "trained" and sweep.probe is not None:
        from robovlms.pretraining.probe import probe_trained_cell

        result.probe = probe_trained_cell(sweep, benchmark, cell_dir / TRAIN_DIR)
    started = time.perf_counter()
    from robovlms.rollout import evaluate

    records = evaluate(benchmark, policy, specs, workers=evaluation.workers, progress=progress,
                       video_dir=cell_dir / "videos" if evaluation.videos_per_task else None,
                       videos_per_task=evaluation.videos_per_task, description=cell.cell_id)
    result.eval_seconds = time.perf_counter() - started
    one_thread = not served and evaluation.workers > 1  # as each worker runs its own copy
    result.step_latency_ms = _step_latency_ms(timed, store, specs[0], evaluation.latency_steps, result.latency_batch,
                                              one_thread)
    result.episodes, result.successes = len(records), int(sum(record.success for record in records))
    result.success = result.successes / result.episodes
    result.scores = benchmark.score(records)
    result.cpu_seconds = cpu_seconds() - cpu_started
    if holds_cell is not None and not holds_cell():
        raise CellReleased(cell.cell_id)
    write_records(cell_dir, records)
    write_cell_result(cell_dir, result)
    return result


def train_cell(sweep: SweepConfig, cell: Cell, cell_dir: Path, result: CellResult, on_validation: Callable | None,
               progress: bool, device: str):
    """Train (in processes of its own when devices > 1), fill in what the trained formulation tells; return its
    policy, loaded on `device`."""
    from robovlms.action_objectives import describe_objective
    from robovlms.formulation import ContinuousActionConfig
    from robovlms.policy import load_batched_policy, resolve_device
    from robovlms.training import CHECKPOINT_DIR, CONFIG_FILE, LAST_CHECKPOINT, load_config, train, training_seconds

    resolve_device(device)  # a device this machine lacks is refused before training, not after
    train_dir = cell_dir / TRAIN_DIR
    config = load_config({**cell.training, "store": sweep.store.path, "run_dir": str(train_dir)})
    if cell.needs is not None:  # done by its own cell, which ran first, unless the sweep's order could not wait
        from robovlms.pretraining import pretrain

        pretrain(cell.needs.training, sweep.pretraining.path, workers=sweep.pretraining.workers, progress=progress)
    train(config, progress=progress, on_validation=on_validation)  # its own processes when devices > 1
    result.train_seconds = training_seconds(train_dir)  # every attempt's, a killed one's too
    policy = load_batched_policy(train_dir, sweep.evaluation.execution, device=device)
    formulation, config = policy.formulation, load_config(train_dir / CONFIG_FILE)
    result.backbone, result.backbone_label = config.backbone.name, formulation.backbone.label
    result.random_init, result.backbone_size = formulation.backbone.random_init, formulation.backbone.describe()
    result.formulation, result.history, result.chunk = config.formulation.name, config.history, config.chunk
    if isinstance(formulation.config, ContinuousActionConfig):
        result.action_objective = describe_objective(formulation.config)
    result.data_fraction, result.seed = config.data_fraction, config.seed
    result.episodes_per_task = config.episodes_per_task
    result.parameters = sum(p.numel() for p in formulation.parameters())
    result.trainable_parameters = sum(p.numel() for p in formulation.parameters() if p.requires_grad)
    result.checkpoint = str(train_dir / CHECKPOINT_DIR / LAST_CHECKPOINT)
    result.config = config.model_dump(mode="json")
    curve = read_training_curve(cell_dir.parent.parent, cell.cell_id)
    if "train/loss" in curve:
        result.final_train_loss = float(curve["train/loss"].dropna().iloc[-1])
    return policy


def run_pretraining_cell(sweep: SweepConfig, cell: Cell, cell_dir: Path, trial_number: int | None, progress: bool,
                         holds_cell: Callable[[], bool] | None) -> CellResult:
    """Pre-train a backbone (robovlms/pretraining/run.py: cached, so a cell already pre-trained elsewhere takes no
    time) and commit its result: the pre-trained directory, its losses and times, no episodes."""
    from robovlms.pretraining import pretrain, pretraining_record

    path = pretrain(cell.training, sweep.pretraining.path, workers=sweep.pretraining.workers, progress=progress)
    record = pretraining_record(path)  # the times and costs of the run that made it, here or before
    result = CellResult(cell_id=cell.cell_id, status="complete", kind=cell.kind, benchmark=sweep.benchmark.name,
                        split=sweep.benchmark.split, policy=cell.policy, axes=cell.axes,
                        backbone=cell.axes["backbone"], backbone_label=record["backbone"],
                        versions=software_versions(), sweep=sweep.name, trial=trial_number,
                        train_seconds=record["train_seconds"], final_train_loss=record["final_train_loss"],
                        cpu_seconds=record["cpu_seconds"], checkpoint=str(path), config=record["settings"],
                        seed=record["settings"]["seed"])
    if holds_cell is not None and not holds_cell():
        raise CellReleased(cell.cell_id)
    write_cell_result(cell_dir, result)
    return result


def describe_device(device) -> str:
    """"cpu", or "cuda:0 (NVIDIA H200)": where a policy's step was timed."""
    if device.type != "cuda":
        return device.type
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _step_latency_ms(policy, store: EpisodeStore, spec: EpisodeSpec, steps: int, batch: int,
                     one_thread: bool) -> float:
    """Median wall time of one policy step on a stored frame, where the policy runs: a BatchedPolicy stepping
    `batch` episodes at once on its device, or a baseline; on one thread (`one_thread`) where each worker runs its
    own copy."""
    import torch

    from robovlms.serving.batched_policy import BatchedPolicy

    threads = torch.get_num_threads()
    if one_thread:
        torch.set_num_threads(1)
    try:
        row = store.episodes.iloc[0]
        frame = int(row["start"])
        observation = Observation(images={camera: np.array(images[frame]) for camera, images in store.images.items()},
                                  state=np.array(store.state[frame]), instruction=spec.instruction)
        if isinstance(policy, BatchedPolicy):
            episodes = [policy.new_episode(spec.instruction, spec.seed) for _ in range(batch)]
            step = lambda: policy.step([(episode, observation) for episode in episodes])
        else:
            policy.reset(spec)
            step = lambda: policy.step(observation)
        timings = []
        for _ in range(steps + 3):
            started = time.perf_counter()
            step()
            timings.append(time.perf_counter() - started)
        return float(np.median(timings[3:]) * 1000)
    finally:
        torch.set_num_threads(threads)
