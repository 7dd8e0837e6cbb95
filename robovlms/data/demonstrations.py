"""Demonstrations from a benchmark's scripted experts, written to an episode store (successful episodes only)."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import NoReturn

import numpy as np

from robovlms.benchmark import Benchmark
from robovlms.data.store import Episode, EpisodeStore, EpisodeStoreWriter, FrameLayout
from robovlms.errors import ConfigError, StoreError
from robovlms.rollout import run_episodes


def generate_demonstrations(benchmark: Benchmark, split: str, episodes_per_scene: int, path: str | Path, *,
                            scenes: str | None = None, workers: int = 1, overwrite: bool = False, resume: bool = False,
                            attempts: int = 3, allow_short: bool = False, progress: bool = True) -> EpisodeStore:
    """Run the scripted expert on every (task, training scene) until `episodes_per_scene` succeed.

    `scenes` (e.g. "AB") replaces the split's training scenes. Failed episodes are dropped and replaced by episodes with fresh seeds, at most `attempts` rounds. With
    `resume`, episodes already flushed to an interrupted `<path>.partial` are kept and not generated again.
    A (task, scene) still short after the last round is a StoreError that leaves the partial store to resume,
    unless `allow_short`, which commits it with the shortfall in its metadata.
    """
    layout = FrameLayout(benchmark.cameras, benchmark.image_size, benchmark.state_dim, benchmark.action_dim)
    metadata = {"benchmark": benchmark.name, "benchmark_options": benchmark.options(), "split": split, "scenes": scenes,
                "source": "scripted experts", "episodes_per_scene": episodes_per_scene}
    writer = EpisodeStoreWriter(path, layout, overwrite=overwrite, resume=resume, metadata=metadata)
    with writer:
        done = {(row["task"], row["scene"], row["seed"]) for row in writer.index}
        have = Counter((row["task"], row["scene"]) for row in writer.index)
        attempted = kept = 0
        for attempt in range(attempts):
            specs, wanted = [], Counter()
            for spec in benchmark.demonstration_episodes(split, episodes_per_scene, attempt, scenes):
                key = (spec.task, spec.scene)
                if (spec.task, spec.scene, spec.seed) in done:
                    continue
                if have[key] + wanted[key] < episodes_per_scene:
                    wanted[key] += 1
                    specs.append(spec)
            if not specs:
                break
            for spec, record, trajectory in run_episodes(
                    benchmark, benchmark.scripted_expert(), specs, workers=workers, record_trajectories=True,
                    progress=progress, description=f"demonstrations (round {attempt + 1})"):
                attempted += 1
                if not record.success:
                    continue
                writer.add(Episode(
                    task=spec.task, instruction=spec.instruction, scene=spec.scene, seed=spec.seed,
                    images={camera: np.stack(frames) for camera, frames in trajectory.images.items()},
                    state=np.stack(trajectory.states), actions=np.stack(trajectory.actions)))
                have[(spec.task, spec.scene)] += 1
                kept += 1
        short = {f"{task}/{scene}": episodes_per_scene - have[(task, scene)]
                 for task, scene in {(s.task, s.scene) for s in benchmark.demonstration_episodes(split, 1, 0, scenes)}
                 if have[(task, scene)] < episodes_per_scene}
        if short:
            shortfall = (f"the scripted expert fell short of {episodes_per_scene} episodes per task and scene after "
                         f"{attempts} rounds: {_describe_shortfall(short, episodes_per_scene)}")
            if not allow_short:
                raise StoreError(f"{shortfall}. The {len(writer)} episodes written are kept in {writer.partial}: "
                                 f"re-run with --resume --allow-short (allow_short=True) to commit the store as it is")
            warnings.warn(shortfall)
        writer.metadata["expert_success_rate"] = kept / attempted if attempted else None
        writer.metadata["shortfall"] = short
        return writer.commit()


def _describe_shortfall(short: dict[str, int], wanted: int) -> str:
    """'scene A: door-open 3/20; scene C: door-open 0/20, reach 18/20' from {"task/scene": missing}."""
    by_scene: dict[str, list[str]] = {}
    for key, missing in sorted(short.items()):
        task, scene = key.rsplit("/", 1)
        by_scene.setdefault(scene, []).append(f"{task} {wanted - missing}/{wanted}")
    return "; ".join(f"scene {scene}: {', '.join(tasks)}" for scene, tasks in sorted(by_scene.items()))


def check_generated_as(store: EpisodeStore, episodes_per_scene: int, scenes: str | None) -> None:
    """A sweep's `store.generate` settings against the store already at its path, which was generated with them
    or is refused: a store is never changed under the sweeps that trained on it, nor silently used for other
    settings. A store that was not generated (imported) has nothing to compare."""
    metadata = store.metadata
    if metadata.get("source") != "scripted experts":
        return
    held, asked = metadata.get("episodes_per_scene"), episodes_per_scene
    if held != asked:
        _refuse(store, "episodes", asked, held, f"with {held} episodes per task and scene",
                f"with {asked} episodes per task and scene")
    held, asked = metadata.get("scenes"), scenes
    if held != asked:
        _refuse(store, "scenes", asked, held, f"from scenes {held!r}" if held else "from the split's training scenes",
                f"from scenes {asked!r}" if asked else "from the split's training scenes")


def _refuse(store: EpisodeStore, key: str, asked, held, generated: str, wanted: str) -> NoReturn:
    raise ConfigError(f"store.generate.{key} is {asked!r}, but the store {store.path} was generated {generated}; an "
                      f"existing store is never regenerated: point store.path at a new directory to generate one "
                      f"{wanted}, or set store.generate.{key}: {held!r} to use this one")
