"""The rollout step latency of the generative action objectives against regression on the same backbone, as ratios
measured in one run (one thread, one-step-continuous, chunk 8, 7-D actions, 10 denoising steps).

    python perf/action_objectives.py [--backbones gpt-scratch paligemma kosmos2 flamingo film-convnet] [--steps 30]

A step is one backbone pass (the condition) and, for flow-matching and diffusion, 10 passes of the action expert
on that cached condition. Target: a flow-matching step at 10 steps costs at most 2x a regression step. The three
policies take their steps in turn, so a change in the machine's load reaches them alike; ratios are given of the
median steps and of the fastest ones (on a loaded machine the scheduler preempts a long step more often than a short
one, which inflates the medians' ratios, not the fastest steps').
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from discrete_decoding import synthetic_store

from robovlms.backbone import create_backbone
from robovlms.benchmark import EpisodeSpec, Observation
from robovlms.formulation import create_formulation
from robovlms.policy import CheckpointPolicy

CHUNK = 8
OBJECTIVES = {"regression": {"objective": "regression"},
              "flow-matching": {"objective": "flow-matching", "denoising_steps": 10},
              "diffusion": {"objective": "diffusion", "denoising_steps": 10}}


def rollout_policy(store, backbone: str, options: dict) -> CheckpointPolicy:
    torch.manual_seed(0)
    formulation = create_formulation("one-step-continuous", create_backbone(backbone), store.action_statistics,
                                     store.state_statistics, chunk=CHUNK, use_state=True, **options).eval()
    policy = CheckpointPolicy(formulation, ["rgb_gripper"], execution="first")
    policy.reset(EpisodeSpec("button-press-topdown", "A", "press the button from the top", 0))
    return policy


def step_latencies_ms(store, backbone: str, steps: int) -> dict[str, np.ndarray]:
    """The step latencies of each objective, their steps interleaved."""
    policies = {name: rollout_policy(store, backbone, options) for name, options in OBJECTIVES.items()}
    observation = Observation(images={"rgb_gripper": np.array(store.images["rgb_gripper"][0])},
                              state=np.array(store.state[0]), instruction="press the button from the top")
    timings = {name: [] for name in policies}
    for _ in range(steps + 2):
        for name, policy in policies.items():
            started = time.perf_counter()
            policy.step(observation)
            timings[name].append(time.perf_counter() - started)
    return {name: np.array(values[2:]) * 1000 for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["gpt-scratch", "paligemma", "kosmos2", "flamingo",
                                                           "film-convnet"])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as directory:
        store = synthetic_store(Path(directory) / "store")
        print(f"{'backbone':<14} {'regression':>11} {'flow (10)':>10} {'diffusion (10)':>15}   ratios to regression: "
              f"median steps, fastest steps (target flow <= 2x)")
        for backbone in args.backbones:
            latency = step_latencies_ms(store, backbone, args.steps)
            median = {name: float(np.median(values)) for name, values in latency.items()}
            fastest = {name: float(values.min()) for name, values in latency.items()}
            print(f"{backbone:<14} {median['regression']:>9.2f}ms {median['flow-matching']:>8.2f}ms "
                  f"{median['diffusion']:>13.2f}ms   flow {median['flow-matching'] / median['regression']:.2f}x, "
                  f"{fastest['flow-matching'] / fastest['regression']:.2f}x; diffusion "
                  f"{median['diffusion'] / median['regression']:.2f}x, "
                  f"{fastest['diffusion'] / fastest['regression']:.2f}x")


if __name__ == "__main__":
    main()
