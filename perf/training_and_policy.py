"""Costs of the training path and the rollout policy, as ratios measured in one run (one thread).

    python perf/training_and_policy.py [--steps 60]

Reports: the time of Lightning training steps (FormulationModule with its logging and checks) against a plain
PyTorch loop on the same model and batches (target: at most 1.05x); policy-head training samples per second when
each sampled sequence of H=8 frames is encoded once and all its frames are supervised, against recomputing the
H frames of each window for its last frame only (target: at least 4x); the rollout step latency of policy-head at
H=16 against H=1 (target: within 1.3x).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from robovlms.backbone import create_backbone
from robovlms.benchmark import EpisodeSpec, Observation
from robovlms.data.windows import WindowDataset
from robovlms.formulation import create_formulation
from robovlms.policy import CheckpointPolicy
from robovlms.data.store import Episode, EpisodeStoreWriter, FrameLayout
from robovlms.training import FormulationModule, TrainingConfig, WarmupCosine


def synthetic_store(path: Path, episodes: int = 8, length: int = 40):
    rng = np.random.default_rng(0)
    with EpisodeStoreWriter(path, FrameLayout(("rgb_static",), 64, 4, 4)) as writer:
        for i in range(episodes):
            writer.add(Episode(task="button-press-topdown", instruction="press the button from the top", scene="A",
                               seed=i, images={"rgb_static": rng.integers(0, 256, (length, 64, 64, 3), np.uint8)},
                               state=rng.normal(size=(length, 4)).astype(np.float32),
                               actions=rng.uniform(-1, 1, (length, 4)).astype(np.float32)))
        return writer.commit()


def formulation(store, name, history, chunk, **options):
    torch.manual_seed(0)
    return create_formulation(name, create_backbone("gpt-scratch"), store.action_statistics, store.state_statistics,
                              history=history, chunk=chunk, use_state=True, **options)


def batches(store, history, chunk, count, batch_size=32):
    dataset = WindowDataset(store, history, chunk)
    rng = np.random.default_rng(0)
    return [dataset.__getitems__(rng.choice(len(dataset), batch_size, replace=False)) for _ in range(count)]


def plain_loop(model, data, config: TrainingConfig) -> float:
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, WarmupCosine(config.warmup_steps, config.max_steps))
    started = time.perf_counter()
    for batch in data:
        loss, _ = model.loss(batch)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
        optimiser.step()
        schedule.step()
    return time.perf_counter() - started


def lightning_loop(model, data, config: TrainingConfig, log_dir: Path) -> float:
    trainer = L.Trainer(max_steps=len(data), gradient_clip_val=config.gradient_clip, logger=CSVLogger(log_dir),
                        log_every_n_steps=config.log_every, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    loader = DataLoader(data, batch_size=None, shuffle=False, collate_fn=lambda batch: batch)
    started = time.perf_counter()
    trainer.fit(FormulationModule(model, config), loader)
    return time.perf_counter() - started


def lightning_overhead(store, steps: int, work: Path) -> None:
    data = batches(store, 1, 8, steps)
    config = TrainingConfig(store=str(store.path), run_dir=str(work), max_steps=steps, chunk=8)
    model = formulation(store, "one-step-continuous", 1, 8)
    plain_loop(copy.deepcopy(model), data[:5], config)  # warm-up
    plain, lightning = [], []
    for repeat in range(3):
        plain.append(plain_loop(copy.deepcopy(model), data, config))
        lightning.append(lightning_loop(copy.deepcopy(model), data, config, work / f"logs{repeat}"))
    ratio = min(lightning) / min(plain)
    print(f"Lightning vs plain loop, {steps} steps of one-step-continuous/gpt-scratch at batch 32: "
          f"{min(lightning):.2f} s vs {min(plain):.2f} s = {ratio:.3f}x (target <= 1.05x)")


def policy_head_sequences(store, steps: int) -> None:
    H = 8
    model = formulation(store, "policy-head", H, 4)
    data = batches(store, H, 4, steps, batch_size=8)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def last_frame_loss(batch):
        encoded = model.encode(batch["images"], batch["state"], batch["instruction"])
        condition = model(encoded, batch["instruction"])  # (B, T, W)
        target_arm, target_gripper = model.actions.normalise(batch["actions"][:, -1:])
        return model.head.loss(condition[:, -1:], target_arm, target_gripper, batch["action_mask"][:, -1:])

    rates = {}
    for label, loss_fn, samples in [("every frame of a sequence", model.loss, lambda b: int(b["frame_mask"].sum())),
                                    ("last frame of each window", last_frame_loss, lambda b: len(b["instruction"]))]:
        loss_fn(data[0])
        started, count = time.perf_counter(), 0
        for batch in data:
            loss, _ = loss_fn(batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            count += samples(batch)
        rates[label] = count / (time.perf_counter() - started)
    sequence, window = rates.values()
    print(f"policy-head training at H={H}: {sequence:.0f} supervised samples/s encoding each sampled sequence once, "
          f"{window:.0f}/s recomputing each window = {sequence / window:.1f}x (target >= 4x)")


def rollout_latency(store, steps: int = 60) -> None:
    rng = np.random.default_rng(0)
    observations = [Observation(images={"rgb_static": rng.integers(0, 256, (64, 64, 3), np.uint8)},
                                state=rng.normal(size=4).astype(np.float32),
                                instruction="press the button from the top") for _ in range(steps)]
    latency = {}
    for history in (1, 16):
        policy = CheckpointPolicy(formulation(store, "policy-head", history, 8), ["rgb_static"], "first")
        policy.reset(EpisodeSpec("button-press-topdown", "A", "press the button from the top", 0))
        times = []
        for observation in observations:
            started = time.perf_counter()
            policy.step(observation)
            times.append(time.perf_counter() - started)
        latency[history] = float(np.median(times[16:]))
    print(f"policy-head rollout step (median, cache full): H=1 {latency[1] * 1e3:.1f} ms, H=16 "
          f"{latency[16] * 1e3:.1f} ms = {latency[16] / latency[1]:.2f}x (target <= 1.3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        store = synthetic_store(Path(work) / "store")
        lightning_overhead(store, args.steps, Path(work))
        policy_head_sequences(store, max(args.steps // 4, 8))
        rollout_latency(store)


if __name__ == "__main__":
    main()
