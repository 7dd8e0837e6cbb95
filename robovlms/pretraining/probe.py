"""A linear probe of a policy's [LRN] state for the target object's position: how much of where things are its
backbone hands on to the action head.

The probe's views are frames of the tasks a sweep evaluates, rendered in its validation scene with seeds of their own
(robovlms/pretraining/frames.py: the scripted expert with noise, so the hand is near and away from the target), from
the policy's cameras. A view's feature is the policy's [LRN] hidden state in its per-frame context
`<s> [images] instruction [LRN]` (the task's validation instruction, the proprio state where the policy reads it);
its target is the target object's offset from the gripper (x, y, z), which the policy needs to reach it. A ridge
regression fit on the views of half the episodes predicts the offsets of the other half: R^2 (averaged over x, y,
z; 0 is no better than the mean offset) and the mean error in cm; the same for the target's world position, and both
probes of the proprio state alone for reference. Measured twice: at initialisation (the backbone as
loaded, random or pre-trained, and a random [LRN] embedding) and after training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robovlms.pretraining.config import FrameSettings
from robovlms.pretraining.frames import FrameSet, frame_set

RIDGE_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)  # chosen per probe by cross-validation on its fit half
FOLDS = 4
BATCH = 64
PROBE_SEED = 424242  # probe frames' seed: never a pre-training frame set's default seed


def probe_frames(benchmark, split: str, cameras: list[str], episodes_per_task: int, frames_per_episode: int,
                 root: str | Path) -> tuple[FrameSet, dict[str, str]]:
    """The probe's frame set (made once under `root`) and each task's validation instruction."""
    specs = benchmark.validation_episodes(split, 1)
    settings = FrameSettings(tasks=list(benchmark.tasks()), scenes="".join(sorted({spec.scene for spec in specs})),
                             episodes_per_task=episodes_per_task, frames_per_episode=frames_per_episode,
                             cameras=list(cameras), image_size=benchmark.image_size, seed=PROBE_SEED)
    return frame_set(settings, root), {spec.task: spec.instruction for spec in specs}


def probe_policy(formulation, frames: FrameSet, instructions: dict[str, str], cameras: list[str]) -> dict[str, float]:
    """R^2 and mean error (cm) of ridge probes of `formulation`'s [LRN] state for the target's offset from the
    gripper and for its position in the world (position_r2, position_error_cm)."""
    images, states, texts, offsets, episodes = probe_inputs(frames, instructions, cameras)
    features = lrn_states(formulation, images, states, texts)
    position = ridge_probe(features, target_positions(frames, cameras), episodes)
    return {**ridge_probe(features, offsets, episodes), "position_r2": position["r2"],
            "position_error_cm": position["error_cm"]}


def state_probe(frames: FrameSet, instructions: dict[str, str], cameras: list[str]) -> dict[str, float]:
    """The same probes of the proprio state alone (the hand's position and opening), for reference: the hand moves
    towards the target, so its position tells part of the target's without any image."""
    _, states, _, offsets, episodes = probe_inputs(frames, instructions, cameras)
    return {"r2_state_only": ridge_probe(states, offsets, episodes)["r2"],
            "position_r2_state_only": ridge_probe(states, target_positions(frames, cameras), episodes)["r2"]}


def target_positions(frames: FrameSet, cameras: list[str]) -> np.ndarray:
    """(N, 3) the target's world position per frame, in the frame order of `probe_inputs`."""
    views = frames.views.reset_index(names="view")
    grouped = views.pivot_table(index=["task", "scene", "seed", "step"], columns="camera", values="view",
                                aggfunc="first")[cameras]
    return np.array([frames.objects(view)[0]["position"] for view in grouped[cameras[0]]])


def probe_inputs(frames: FrameSet, instructions: dict[str, str], cameras: list[str]):
    """Per frame: images (N, V, S, S, 3) in `cameras` order, state (N, 4), instruction, the target's offset (N, 3)
    and the frame's episode number."""
    views = frames.views.reset_index(names="view")
    keys = ["task", "scene", "seed", "step"]
    grouped = views.pivot_table(index=keys, columns="camera", values="view", aggfunc="first")[cameras]
    images = np.stack([np.asarray(frames.images[grouped[camera].to_numpy()]) for camera in cameras], axis=1)
    first = views.set_index(keys).loc[grouped.index].groupby(level=keys, sort=False).first()
    states = first[["hand_x", "hand_y", "hand_z", "gripper"]].to_numpy(np.float32)
    offsets = np.array([frames.objects(view)[0]["offset"] for view in grouped[cameras[0]]])
    episodes = grouped.reset_index().groupby(["task", "scene", "seed"], sort=False).ngroup().to_numpy()
    texts = [instructions[task] for task in grouped.index.get_level_values("task")]
    return images, states, texts, offsets, episodes


@torch.no_grad()
def lrn_states(formulation, images: np.ndarray, states: np.ndarray, instructions: list[str]) -> np.ndarray:
    """The [LRN] hidden state (N, D) of each frame in the per-frame context."""
    from robovlms.formulation import Formulation

    formulation.eval()
    found = []
    for start in range(0, len(images), BATCH):
        rows = slice(start, start + BATCH)
        texts = instructions[rows]
        inputs = Formulation.encode(formulation, torch.tensor(images[rows]).unsqueeze(1),
                                    torch.tensor(states[rows]).unsqueeze(1), texts)  # (B, 1, ...)
        hidden = formulation.backbone(inputs["pixel_values"], texts, formulation.lrn_embeds(inputs))  # (B, 1, K, D)
        found.append(hidden[:, 0, -1].float())
    return torch.cat(found).numpy()


def ridge_probe(features: np.ndarray, targets: np.ndarray, episodes: np.ndarray) -> dict[str, float]:
    """Fit on the frames of the even-numbered episodes (penalty by cross-validation over them), score on the odd."""
    fit, scored = episodes % 2 == 0, episodes % 2 == 1
    mean, std = features[fit].mean(axis=0), features[fit].std(axis=0) + 1e-6
    x = (features - mean) / std
    folds = (episodes[fit] // 2) % FOLDS
    penalty = min(RIDGE_PENALTIES, key=lambda penalty: sum(
        _squared_error(x[fit][folds != fold], targets[fit][folds != fold], x[fit][folds == fold],
                       targets[fit][folds == fold], penalty) for fold in range(FOLDS)))
    predicted = _ridge(x[fit], targets[fit], penalty)(x[scored])
    truth = targets[scored]
    r2 = 1 - ((truth - predicted) ** 2).sum(axis=0) / ((truth - truth.mean(axis=0)) ** 2).sum(axis=0)
    return {"r2": float(r2.mean()), "error_cm": float(np.linalg.norm(truth - predicted, axis=1).mean() * 100),
            "mean_error_cm": float(np.linalg.norm(truth - targets[fit].mean(axis=0), axis=1).mean() * 100),
            "frames": len(features), "penalty": float(penalty)}


def _ridge(x: np.ndarray, y: np.ndarray, penalty: float):
    offset = y.mean(axis=0)
    weights = np.linalg.solve(x.T @ x + penalty * len(x) * np.eye(x.shape[1]), x.T @ (y - offset))
    return lambda new: new @ weights + offset


def _squared_error(x_fit, y_fit, x_test, y_test, penalty: float) -> float:
    if len(x_test) == 0 or len(x_fit) == 0:
        return 0.0
    return float(((_ridge(x_fit, y_fit, penalty)(x_test) - y_test) ** 2).sum())


def probe_trained_cell(sweep, benchmark, train_dir: Path) -> dict[str, Any]:
    """The probe of a trained cell, at initialisation and after training (robovlms.sweep.one_cell's hook)."""
    import lightning as L

    from robovlms.backbone import create_backbone
    from robovlms.data.store import Statistics
    from robovlms.training import STATISTICS_FILE, build_formulation, load_formulation

    trained, config = load_formulation(train_dir)
    frames, instructions = probe_frames(benchmark, sweep.benchmark.split, config.cameras,
                                        sweep.probe.episodes_per_task, sweep.probe.frames_per_episode,
                                        sweep.probe.path)
    statistics = json.loads((train_dir / STATISTICS_FILE).read_text())
    L.seed_everything(config.seed, workers=True, verbose=False)  # the initialisation training started from
    backbone = create_backbone(config.backbone.name, config.backbone.size, config.backbone.path,
                               **config.backbone.options)
    initial = build_formulation(config, backbone, Statistics(**statistics["actions"]),
                                Statistics(**statistics["state"]) if statistics["state"] else None)
    before = probe_policy(initial, frames, instructions, config.cameras)
    after = probe_policy(trained, frames, instructions, config.cameras)
    return {**{f"{key}_initial": value for key, value in before.items() if key not in ("frames", "mean_error_cm")},
            **{f"{key}_trained": value for key, value in after.items() if key not in ("frames", "mean_error_cm")},
            **state_probe(frames, instructions, config.cameras), "frames": after["frames"],
            "mean_error_cm": after["mean_error_cm"]}
