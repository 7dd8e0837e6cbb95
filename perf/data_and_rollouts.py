"""Throughput of the embedded benchmark's data path, as ratios measured in one run.

    python perf/data_and_rollouts.py [--episodes 32]

Reports: demonstrations generated per second; rollout env steps per second with one and two worker processes
(target: two give at least 1.7x); the saving of rendering only where a chunked policy observes; windows per second
served by the dataset against the windows per second a training step of the smallest backbone consumes (target: at
least 20x).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from robovlms.backbone import create_backbone
from robovlms.benchmarks.metaworld import MetaWorldBenchmark
from robovlms.data.windows import WindowDataset, window_loader
from robovlms.data.demonstrations import generate_demonstrations
from robovlms.rollout import evaluate

TASK = "button-press-topdown"


class ZeroChunkPolicy:
    """Returns `chunk` zero actions at a time: 1 observes every step, 8 is a chunked policy executing open-loop."""

    def __init__(self, chunk: int):
        self.chunk = chunk

    def reset(self, spec) -> None:
        pass

    def step(self, observation) -> np.ndarray:
        return np.zeros((self.chunk, 4), dtype=np.float32)


def rollout_steps_per_second(benchmark, factory, specs, workers: int) -> tuple[float, float, float]:
    """(steps/s over the wall clock, steps/s once the workers run, wall seconds). The second leaves out starting
    the worker processes (imports, building the simulator): it sums each episode's own time, spread over the
    workers, so it still counts how much the workers slow each other down."""
    started = time.perf_counter()
    records = evaluate(benchmark, factory, specs, workers=workers, progress=False)
    seconds = time.perf_counter() - started
    steps = sum(r.steps for r in records)
    return steps / seconds, steps / (sum(r.seconds for r in records) / workers), seconds


def training_windows_per_second(store, batch_size: int = 64, steps: int = 10) -> float:
    """Forward, backward and AdamW step of the tiny from-scratch GPT backbone with a linear action head."""
    backbone = create_backbone("gpt-scratch", size="tiny")
    head = torch.nn.Linear(backbone.hidden_size, 8 * store.layout.action_dim)
    action_token = torch.nn.Parameter(torch.zeros(1, 1, 1, backbone.hidden_size))
    optimiser = torch.optim.AdamW([*backbone.parameters(), *head.parameters(), action_token], lr=1e-4)
    batch = WindowDataset(store, history=1, chunk=8).__getitems__(np.arange(batch_size))
    targets = batch["actions"][:, -1].flatten(1)

    def step() -> None:
        pixels = backbone.preprocess_images(batch["images"])
        suffix = action_token.expand(batch_size, 1, 1, -1)
        hidden = backbone(pixels, batch["instruction"], suffix)[:, -1, -1]
        loss = torch.nn.functional.mse_loss(head(hidden), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - started)


def dataset_windows_per_second(store, history: int, chunk: int, batch_size: int = 64, batches: int = 200) -> float:
    loader = window_loader(WindowDataset(store, history=history, chunk=chunk), batch_size=batch_size, seed=0)
    served, started = 0, time.perf_counter()
    while served < batches * batch_size:
        for batch in loader:
            served += len(batch["instruction"])
            if served >= batches * batch_size:
                break
    return served / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=32, help="rollout episodes per measurement")
    parser.add_argument("--demonstrations", type=int, default=6, help="demonstrations per scene")
    args = parser.parse_args()
    torch.set_num_threads(1)
    benchmark = MetaWorldBenchmark(tasks=TASK, image_size=64, cameras=("rgb_static", "rgb_gripper"), max_steps=100)

    with tempfile.TemporaryDirectory() as directory:
        started = time.perf_counter()
        store = generate_demonstrations(benchmark, "ABC->D", args.demonstrations, Path(directory) / "store",
                                        workers=2, progress=False)
        seconds = time.perf_counter() - started
        print(f"demonstrations: {len(store)} episodes, {store.frames} frames in {seconds:.1f} s with 2 workers: "
              f"{len(store) / seconds:.2f} episodes/s, {store.frames / seconds:.0f} frames/s")

        specs = benchmark.evaluation_episodes("ABC->D", args.episodes)
        zero = functools.partial(ZeroChunkPolicy, 1)
        one, one_running, one_seconds = rollout_steps_per_second(benchmark, zero, specs, workers=1)
        two, two_running, two_seconds = rollout_steps_per_second(benchmark, zero, specs, workers=2)
        print(f"rollouts, observing every step, once the workers run: 1 worker {one_running:.0f} steps/s, "
              f"2 workers {two_running:.0f} steps/s: {two_running / one_running:.2f}x (target >= 1.7x); over the "
              f"wall clock with process start: {one:.0f} ({one_seconds:.1f} s) and {two:.0f} steps/s "
              f"({two_seconds:.1f} s): {two / one:.2f}x")
        chunked, _, chunked_seconds = rollout_steps_per_second(benchmark, functools.partial(ZeroChunkPolicy, 8), specs,
                                                               workers=1)
        print(f"rollouts, 8-step chunks open-loop (one render in eight): 1 worker {chunked:.0f} steps/s "
              f"({chunked_seconds:.1f} s): {chunked / one:.2f}x observing every step")

        consumed = training_windows_per_second(store)
        for history, chunk in [(1, 8), (8, 8)]:
            served = dataset_windows_per_second(store, history, chunk)
            print(f"dataset H={history} L={chunk}: {served:.0f} windows/s served; a training step of tiny "
                  f"gpt-scratch (H=1, batch 64) consumes {consumed:.0f} windows/s: {served / consumed:.0f}x "
                  f"(target >= 20x)")


if __name__ == "__main__":
    main()
