"""The rollout step latency of one-step-discrete against one-step-continuous on the same backbone, as ratios
measured in one run (one thread, chunk 8, 7-D actions: 56 action tokens a step).

    python perf/discrete_decoding.py [--backbones gpt-scratch paligemma kosmos2 flamingo film-convnet] [--steps 20]

Target: a parallel-decoding discrete step costs at most 3x a continuous one (issue: 1,235 ms against 52 ms with the
autoregressive loop on gpt-scratch, 24x).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from robovlms.backbone import create_backbone
from robovlms.benchmark import EpisodeSpec, Observation
from robovlms.data.store import Episode, EpisodeStoreWriter, FrameLayout
from robovlms.formulation import create_formulation
from robovlms.policy import CheckpointPolicy

CHUNK, ACTION_DIM = 8, 7


def synthetic_store(path: Path):
    rng = np.random.default_rng(0)
    with EpisodeStoreWriter(path, FrameLayout(("rgb_gripper",), 64, 4, ACTION_DIM)) as writer:
        writer.add(Episode(task="button-press-topdown", instruction="press the button from the top", scene="A",
                           seed=0, images={"rgb_gripper": rng.integers(0, 256, (40, 64, 64, 3), np.uint8)},
                           state=rng.normal(size=(40, 4)).astype(np.float32),
                           actions=rng.uniform(-1, 1, (40, ACTION_DIM)).astype(np.float32)))
        return writer.commit()


def step_latency_ms(store, backbone: str, name: str, steps: int, **options) -> float:
    torch.manual_seed(0)
    formulation = create_formulation(name, create_backbone(backbone), store.action_statistics,
                                     store.state_statistics, chunk=CHUNK, use_state=True, **options).eval()
    policy = CheckpointPolicy(formulation, ["rgb_gripper"], execution="first")
    observation = Observation(images={"rgb_gripper": np.array(store.images["rgb_gripper"][0])},
                              state=np.array(store.state[0]), instruction="press the button from the top")
    policy.reset(EpisodeSpec("button-press-topdown", "A", observation.instruction, 0))
    timings = []
    for _ in range(steps + 2):
        started = time.perf_counter()
        policy.step(observation)
        timings.append(time.perf_counter() - started)
    return float(np.median(timings[2:]) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["gpt-scratch", "paligemma", "kosmos2", "flamingo",
                                                           "film-convnet"])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as directory:
        store = synthetic_store(Path(directory) / "store")
        print(f"{'backbone':<14} {'continuous':>12} {'parallel':>12} {'autoregressive':>15} {'parallel/cont':>14} "
              f"{'autoreg/cont':>13}")
        for backbone in args.backbones:
            continuous = step_latency_ms(store, backbone, "one-step-continuous", args.steps)
            parallel = step_latency_ms(store, backbone, "one-step-discrete", args.steps, decoding="parallel")
            autoregressive = step_latency_ms(store, backbone, "one-step-discrete", max(2, args.steps // 10),
                                             decoding="autoregressive")
            print(f"{backbone:<14} {continuous:>10.1f}ms {parallel:>10.1f}ms {autoregressive:>13.1f}ms "
                  f"{parallel / continuous:>13.2f}x {autoregressive / continuous:>12.1f}x")


if __name__ == "__main__":
    main()
