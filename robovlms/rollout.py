"""Run evaluation episodes of a benchmark with a policy, spread over worker processes (one environment each)."""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from robovlms.benchmark import Benchmark, EpisodeRecord, EpisodeSpec, Policy, Trajectory

PolicyFactory = Callable[[], Policy]  # picklable: each worker builds its own policy

_worker = {}


def _start_worker(benchmark: Benchmark, policy_factory: PolicyFactory) -> None:
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    _worker["benchmark"] = benchmark
    _worker["environment"] = benchmark.make_environment()
    _worker["policy"] = policy_factory()


def _run_one(spec: EpisodeSpec, record_trajectory: bool, video_path: str | None
             ) -> tuple[EpisodeRecord, Trajectory | None]:
    benchmark, environment, policy = _worker["benchmark"], _worker["environment"], _worker["policy"]
    trajectory = Trajectory() if record_trajectory else None
    frames = [] if video_path else None
    on_frame = (lambda observation: frames.append(next(iter(observation.images.values())))) if video_path else None
    record = benchmark.run_episode(environment, spec, policy, trajectory=trajectory, on_frame=on_frame)
    if video_path and frames:
        from robovlms.video import write_video

        write_video(video_path, frames)
        record.extra["video"] = video_path
    return record, trajectory


def run_episodes(benchmark: Benchmark, policy_factory: PolicyFactory, specs: Sequence[EpisodeSpec], *,
                 workers: int = 1, record_trajectories: bool = False, video_dir: str | Path | None = None,
                 videos_per_task: int = 0, progress: bool = True, description: str = "rollouts",
                 ) -> Iterator[tuple[EpisodeSpec, EpisodeRecord, Trajectory | None]]:
    """Yield (spec, record, trajectory) in the order of `specs`; workers=1 runs in this process."""
    video_paths = _video_paths(specs, video_dir, videos_per_task)
    jobs = [(spec, record_trajectories, video_paths.get(i)) for i, spec in enumerate(specs)]
    bar = tqdm(total=len(jobs), desc=description, disable=not progress, unit="episode")
    if workers <= 1:
        _start_worker(benchmark, policy_factory)
        try:
            for job in jobs:
                record, trajectory = _run_one(*job)
                bar.update()
                yield job[0], record, trajectory
        finally:
            _worker.pop("environment").close()
            _worker.clear()
            bar.close()
        return
    context = multiprocessing.get_context("spawn")  # MuJoCo's GL contexts and torch's threads do not survive fork
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(benchmark, policy_factory)) as pool:
        try:
            for job, (record, trajectory) in zip(jobs, pool.map(_run_one, *zip(*jobs))):
                bar.update()
                yield job[0], record, trajectory
        finally:
            bar.close()


def _video_paths(specs: Sequence[EpisodeSpec], video_dir: str | Path | None, per_task: int) -> dict[int, str]:
    if video_dir is None or per_task <= 0:
        return {}
    os.makedirs(video_dir, exist_ok=True)
    paths, counts = {}, {}
    for i, spec in enumerate(specs):
        if counts.get(spec.task, 0) < per_task:
            counts[spec.task] = counts.get(spec.task, 0) + 1
            paths[i] = str(Path(video_dir) / f"{spec.task}_{spec.scene}_{spec.seed}.mp4")
    return paths


def evaluate(benchmark: Benchmark, policy_factory: PolicyFactory, specs: Sequence[EpisodeSpec], *, workers: int = 1,
             video_dir: str | Path | None = None, videos_per_task: int = 0, progress: bool = True,
             description: str = "evaluation") -> list[EpisodeRecord]:
    return [record for _, record, _ in run_episodes(benchmark, policy_factory, specs, workers=workers,
                                                    video_dir=video_dir, videos_per_task=videos_per_task,
                                                    progress=progress, description=description)]


def records_frame(records: Sequence[EpisodeRecord]) -> pd.DataFrame:
    """One row per episode; `extra` (benchmark-specific, free-form) is kept as a JSON string."""
    rows = [asdict(record) for record in records]
    for row in rows:
        row["extra"] = json.dumps(row["extra"], sort_keys=True)
    return pd.DataFrame(rows)
