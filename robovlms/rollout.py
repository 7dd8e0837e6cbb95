"""Run evaluation episodes of a benchmark with a policy, spread over worker processes (one environment each).

A trained policy is served: this process holds it (a BatchedPolicy, on its device) and its policy server answers
every worker, batching the steps that wait (robovlms/serving/evaluation_server.py); with one worker the episodes run
here, against the same policy. A policy factory instead (baselines, scripted experts, or a trained run with
`evaluation.policy_server: false`) is called in every worker, each holding its own copy, limited to one torch thread
so that the workers share the cores.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from tqdm.auto import tqdm

from robovlms.atomic_files import write_json_atomically
from robovlms.benchmark import Benchmark, EpisodeRecord, EpisodeSpec, Policy, Trajectory
from robovlms.errors import ConfigError
from robovlms.records import records_frame, write_table

if TYPE_CHECKING:
    from robovlms.serving.batched_policy import BatchedPolicy

PolicyFactory = Callable[[], Policy]  # picklable: each worker builds its own policy

_worker = {}


def _start_worker(benchmark: Benchmark, policy_factory: PolicyFactory, own_process: bool = True) -> None:
    _worker["benchmark"] = benchmark
    _worker["environment"] = benchmark.make_environment()
    _worker["policy"] = policy_factory()
    if own_process and "torch" in sys.modules:  # a policy computing in every worker: one thread each
        sys.modules["torch"].set_num_threads(1)


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


def run_episodes(benchmark: Benchmark, policy: PolicyFactory | BatchedPolicy, specs: Sequence[EpisodeSpec], *,
                 workers: int = 1, record_trajectories: bool = False, video_dir: str | Path | None = None,
                 videos_per_task: int = 0, progress: bool = True, description: str = "rollouts",
                 ) -> Iterator[tuple[EpisodeSpec, EpisodeRecord, Trajectory | None]]:
    """Yield (spec, record, trajectory) in the order of `specs`; workers=1 runs in this process. `policy`: a
    BatchedPolicy in this process, which serves every worker, or a factory that each worker calls."""
    video_paths = _video_paths(specs, video_dir, videos_per_task)
    jobs = [(spec, record_trajectories, video_paths.get(i)) for i, spec in enumerate(specs)]
    bar = tqdm(total=len(jobs), desc=description, disable=not progress, unit="episode")
    if workers <= 1:
        threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
        _start_worker(benchmark, policy if callable(policy) else _episode_policy_factory(policy), own_process=False)
        failure = None
        try:
            for job in jobs:
                record, trajectory = _run_one(*job)
                bar.update()
                yield job[0], record, trajectory
        except Exception as error:
            failure = error
            raise
        finally:
            _close_environment(failure)
            bar.close()
            if threads is not None:  # this process goes on (a sweep's next cell trains on its own threads)
                sys.modules["torch"].set_num_threads(threads)
        return
    context = multiprocessing.get_context("spawn")  # MuJoCo's GL contexts and torch's threads do not survive fork
    with contextlib.ExitStack() as stack:
        if not callable(policy):
            from robovlms.serving.evaluation_server import PolicyServer

            policy = stack.enter_context(PolicyServer(policy)).client_factory()
        pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                       initargs=(benchmark, policy)))
        try:
            for job, (record, trajectory) in zip(jobs, pool.map(_run_one, *zip(*jobs))):
                bar.update()
                yield job[0], record, trajectory
        finally:
            bar.close()


def _episode_policy_factory(policy: BatchedPolicy) -> PolicyFactory:
    from robovlms.serving.batched_policy import EpisodePolicy

    return lambda: EpisodePolicy(policy)


def _close_environment(failure: Exception | None) -> None:
    """Close this process's environment. After an episode failed (`failure`), an error in closing is noted on that
    failure rather than replacing it: what went wrong is the failure, not the close that followed."""
    environment = _worker.pop("environment")
    _worker.clear()
    if failure is None:
        environment.close()
        return
    try:
        environment.close()
    except Exception as error:  # noqa: BLE001 - kept as a note on the error that is raised
        failure.add_note(f"closing the environment afterwards failed too: {type(error).__name__}: {error}")


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


def evaluate(benchmark: Benchmark, policy: PolicyFactory | BatchedPolicy, specs: Sequence[EpisodeSpec], *,
             workers: int = 1, video_dir: str | Path | None = None, videos_per_task: int = 0, progress: bool = True,
             description: str = "evaluation") -> list[EpisodeRecord]:
    return [record for _, record, _ in run_episodes(benchmark, policy, specs, workers=workers,
                                                    video_dir=video_dir, videos_per_task=videos_per_task,
                                                    progress=progress, description=description)]


# ---- one evaluation split over machines ---------------------------------------------------------------------

SHARD_FILE = "shard.json"


def parse_shard(text: str) -> tuple[int, int]:
    """"K/N" (1-based) -> (K, N)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"shard {text!r} must be K/N, e.g. 2/8") from None
    if not 1 <= index <= count:
        raise ConfigError(f"shard {text!r}: K must be between 1 and N")
    return index, count


def shard_specs(specs: Sequence[EpisodeSpec], index: int, count: int) -> list[EpisodeSpec]:
    """Every count-th episode from the index-th (1-based): shards are disjoint and together are all of `specs`."""
    return list(specs[index - 1::count])


def write_shard(out: Path, records: Sequence[EpisodeRecord], description: dict) -> None:
    """An evaluation's records and what they are a shard of (benchmark, split, episodes, policy, K/N)."""
    out.mkdir(parents=True, exist_ok=True)
    write_table(records_frame(records), out, "records")
    write_json_atomically(out / SHARD_FILE, description)


def merge_shards(shard_dirs: Sequence[str | Path]) -> tuple[dict, pd.DataFrame]:
    """The records of every shard of one evaluation, checked complete and disjoint, in episode order. A trained
    policy is identified by its digest (robovlms.policy.policy_digest), so shards evaluated from copies of one run at
    different paths merge; `policy_paths` gathers those paths."""
    descriptions, frames = [], []
    for directory in map(Path, shard_dirs):
        if not (directory / SHARD_FILE).is_file():
            raise ConfigError(f"{directory} holds no evaluation shard ({SHARD_FILE} is missing)")
        descriptions.append(json.loads((directory / SHARD_FILE).read_text()))
        frames.append(pd.read_parquet(directory / "records.parquet"))
    evaluation = _evaluation(descriptions[0])
    for directory, description in zip(shard_dirs, descriptions):
        if _evaluation(description) != evaluation:
            raise ConfigError(f"{directory} is a shard of another evaluation: {_evaluation(description)}, not "
                              f"{evaluation}")
    counts = {description["shard"][1] for description in descriptions}
    if len(counts) > 1:
        listing = ", ".join(f"{directory} is {description['shard'][0]} of {description['shard'][1]}"
                            for directory, description in zip(shard_dirs, descriptions))
        raise ConfigError(f"these are shards of evaluations split in different numbers of parts ({listing}); give "
                          f"the shards of one --shard K/N, every K once")
    evaluation["policy_paths"] = list(dict.fromkeys(path for description in descriptions
                                                    for path in description.get("policy_paths", [])))
    count = counts.pop()
    found = sorted(description["shard"][0] for description in descriptions)
    if found != list(range(1, count + 1)):
        raise ConfigError(f"shards {found} of {count}: each of 1..{count} must be given exactly once")
    merged = pd.concat(frames, ignore_index=True).sort_values(["seed", "task", "scene"], ignore_index=True)
    if len(merged) != evaluation["episodes"]:
        raise ConfigError(f"the shards hold {len(merged)} episodes; the evaluation has {evaluation['episodes']}")
    return evaluation, merged


def _evaluation(description: dict) -> dict:
    """What a shard is a part of: its description less its part and where the policy was read from."""
    return {key: value for key, value in description.items() if key not in ("shard", "policy_paths")}
