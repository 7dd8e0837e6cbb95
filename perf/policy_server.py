"""Evaluation with one policy serving every simulator worker, against every worker loading its own copy: ratios
measured in one run.

    python perf/policy_server.py [--episodes 12] [--workers 4] [--rounds 2]     # CPU: memory and episodes/s
    python perf/policy_server.py --hidden 1024 --layers 12 --episodes 4 --max-steps 10 --rounds 1   # a larger model
    python perf/policy_server.py --gpu                                         # GPU: a batched step of 8

CPU part: Meta-World rollouts of a random-init gpt-scratch policy (hidden 512, 8 layers: ~27M parameters, 0.1 GB
in fp32; the weights stand for a real VLM's) by 4 simulator workers, either served by the evaluating process
(`evaluation.policy_server: true`, the default) or each loading the model (`false`), each evaluation in a fresh
Python process. Memory: the peak over the evaluation of the total RSS (every page a process maps counted in it, shared
or not: an upper bound) and of the total PSS (proportional set size: each shared page split between the processes
that map it, so torch's libraries count once) of the evaluating process and every process under it, against the peak
RSS of the largest worker that loads the model (goal: at most 1.3x, against about 4x). Episodes per second: wall
time of each whole evaluation, worker start-up (and, for the copies, model loading) included (goal: no slower). The
two alternate for `--rounds`, on whatever load the machine has. Measured: docs/evaluation.md.

GPU part (`--gpu`, on a machine with one): steps per second of one BatchedPolicy step of 8 episodes against 8
steps of one episode, and how far the batched actions are from the single ones there (on CUDA, cuBLAS chooses its
kernels by shape, so they may differ in the last bits; on the CPU they are bitwise equal, tests/test_batched_policy.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

import numpy as np
import psutil

from robovlms.benchmark import Observation
from robovlms.rollout import run_episodes
from robovlms.serving.evaluation_server import PolicyServer

# torch and the policy are imported where they are used: a spawned worker imports this file again, and a served
# worker must not pay for torch
TASKS = ["button-press-topdown", "door-open"]


def model(hidden: int, layers: int) -> dict:
    return {"hidden_size": hidden, "layers": layers, "heads": 8}


def trained_run(directory: Path, hidden: int, layers: int) -> Path:
    """A run directory of the perf model, trained one step on scripted demonstrations (its weights are random:
    what is measured is their size and their cost, not their success)."""
    from robovlms.benchmarks.metaworld import MetaWorldBenchmark
    from robovlms.data.demonstrations import generate_demonstrations
    from robovlms.training import train

    benchmark = MetaWorldBenchmark(tasks=TASKS, image_size=64, cameras=("rgb_static",))
    store = generate_demonstrations(benchmark, "ABC->D", 1, directory / "store", scenes="A", workers=1,
                                    progress=False)
    return train({"store": str(store.path), "run_dir": str(directory / "run"), "formulation": {"name": "policy-head"},
                  "backbone": {"name": "gpt-scratch", "options": model(hidden, layers)}, "history": 2, "chunk": 4,
                  "execution": "first", "max_steps": 1, "batch_size": 2, "checkpoint_every": 1})


class MemorySampler:
    """Peaks over time, sampled every `every` seconds, of the total PSS and RSS of this process and every process
    under it, of this process's own, and of the largest other process's."""

    def __init__(self, every: float = 0.25):
        self.every = every
        self.peak = {"pss": 0, "rss": 0, "this_pss": 0, "this_rss": 0, "other_pss": 0, "other_rss": 0, "others": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            sizes = []
            for process in [me, *me.children(recursive=True)]:
                try:
                    memory = process.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                sizes.append((memory.pss, memory.rss, process.pid == me.pid))
            now = {"pss": sum(pss for pss, _, _ in sizes), "rss": sum(rss for _, rss, _ in sizes),
                   "this_pss": max((pss for pss, _, this in sizes if this), default=0),
                   "this_rss": max((rss for _, rss, this in sizes if this), default=0),
                   "other_pss": max((pss for pss, _, this in sizes if not this), default=0),
                   "other_rss": max((rss for _, rss, this in sizes if not this), default=0),
                   "others": sum(not this for _, _, this in sizes)}
            self.peak = {key: max(self.peak[key], now[key]) for key in now}
            self._stop.wait(self.every)


def evaluate_once(run_dir: Path, episodes: int, workers: int, max_steps: int, served: bool) -> dict:
    """One evaluation, measured from within this process (a fresh one: see `cpu_part`)."""
    from robovlms.benchmarks.metaworld import MetaWorldBenchmark
    from robovlms.policy import load_batched_policy, policy_factory

    benchmark = MetaWorldBenchmark(tasks=TASKS, image_size=64, cameras=("rgb_static",), max_steps=max_steps)
    specs = benchmark.evaluation_episodes("ABC->D", episodes // len(TASKS))
    with MemorySampler() as memory:
        started = time.perf_counter()
        if served:
            with PolicyServer(load_batched_policy(run_dir, device="cpu")) as server:
                records = [r for _, r, _ in run_episodes(benchmark, server.client_factory(), specs, workers=workers,
                                                         progress=False)]
            batch = server.steps / max(server.batches, 1)
        else:
            records = [r for _, r, _ in run_episodes(benchmark, policy_factory(run_dir), specs, workers=workers,
                                                     progress=False)]
            batch = 1.0
        seconds = time.perf_counter() - started
    peak = memory.peak
    return {"seconds": seconds, "episodes": len(records), "steps": sum(r.steps for r in records),
            "peak_pss": peak["pss"], "peak_rss": peak["rss"], "this_pss": peak["this_pss"],
            "this_rss": peak["this_rss"], "largest_other_pss": peak["other_pss"],
            "largest_other_rss": peak["other_rss"], "others": peak["others"], "mean_batch": batch}


def measured(run_dir: Path, episodes: int, workers: int, max_steps: int, served: bool) -> dict:
    """`evaluate_once` in a fresh Python process, so that neither configuration carries what another left."""
    command = [sys.executable, __file__, "--measure", "served" if served else "copies", "--run-dir", str(run_dir),
               "--episodes", str(episodes), "--workers", str(workers), "--max-steps", str(max_steps)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_part(episodes: int, workers: int, rounds: int, max_steps: int, hidden: int, layers: int) -> None:
    from robovlms.policy import load_batched_policy

    gib = 2 ** 30
    with tempfile.TemporaryDirectory() as directory:
        run_dir = trained_run(Path(directory), hidden, layers)
        parameters = sum(p.numel() for p in load_batched_policy(run_dir, device="cpu").formulation.parameters())
        print(f"{episodes} Meta-World episodes of at most {max_steps} steps, policy-head on gpt-scratch "
              f"{model(hidden, layers)} "
              f"({parameters / 1e6:.1f}M parameters, random init), {workers} simulator workers, "
              f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        for round_ in range(1, rounds + 1):
            copies = measured(run_dir, episodes, workers, max_steps, served=False)
            served = measured(run_dir, episodes, workers, max_steps, served=True)
            one_worker = copies["largest_other_rss"]  # a worker that loads the model: all it maps, shared or not
            print(f"round {round_} (one worker that loads the model: RSS {one_worker / gib:.2f} GiB, PSS "
                  f"{copies['largest_other_pss'] / gib:.2f} GiB):")
            for label, result in (("each worker loads the model", copies), ("one process serves them", served)):
                print(f"  {label:28s} {result['episodes'] / result['seconds']:.3f} episodes/s "
                      f"({result['seconds']:.0f} s, {result['steps']} steps); peak total RSS "
                      f"{result['peak_rss'] / gib:.2f} GiB = {result['peak_rss'] / one_worker:.2f}x one worker's, "
                      f"PSS {result['peak_pss'] / gib:.2f} GiB = {result['peak_pss'] / one_worker:.2f}x; the "
                      f"evaluating process {result['this_rss'] / gib:.2f} GiB RSS, the largest of {result['others']} "
                      f"others {result['largest_other_rss'] / gib:.2f} GiB; mean batch {result['mean_batch']:.2f}")
            print(f"  served against copies: total RSS {served['peak_rss'] / copies['peak_rss']:.2f}x, PSS "
                  f"{served['peak_pss'] / copies['peak_pss']:.2f}x, episodes/s "
                  f"{(served['episodes'] / served['seconds']) / (copies['episodes'] / copies['seconds']):.2f}x "
                  f"(load {os.getloadavg()[0]:.1f})")


def step_seconds(policy, frames: list[Observation], together: bool, steps: int = 30
                 ) -> tuple[float, list[np.ndarray]]:
    """The median time of stepping one episode per frame, in one batch or one episode after another, and the last
    actions."""
    episodes = [policy.new_episode("open the door", seed=i) for i in range(len(frames))]
    times, actions = [], []
    for step in range(steps + 3):
        started = time.perf_counter()
        if together:
            actions = policy.step(list(zip(episodes, frames)))
        else:
            actions = [policy.step([(episode, frame)])[0] for episode, frame in zip(episodes, frames)]
        if step >= 3:  # after warm-up
            times.append(time.perf_counter() - started)
    return float(np.median(times)), actions


def gpu_part(batch: int = 8) -> None:
    import torch

    from robovlms.backbone import create_backbone
    from robovlms.data.store import Statistics
    from robovlms.formulation import create_formulation
    from robovlms.serving.batched_policy import BatchedPolicy

    if not torch.cuda.is_available():
        print("no CUDA GPU here: run `python perf/policy_server.py --gpu` on a machine with one")
        return
    unit = Statistics(p01=[-1.0] * 4, p99=[1.0] * 4, mean=[0.0] * 4, std=[1.0] * 4, min=[-1.0] * 4, max=[1.0] * 4)
    torch.manual_seed(0)
    for name, backbone, options in (("gpt-scratch", "gpt-scratch", {**model(512, 8), "image_size": 224}),
                                    ("paligemma (hidden 1024, 8 layers)", "paligemma",
                                     {"hidden_size": 1024, "layers": 8, "heads": 8, "image_size": 224,
                                      "patch_size": 14})):
        formulation = create_formulation("policy-head", create_backbone(backbone, **options), unit, unit,
                                         history=2, chunk=4, use_state=True,
                                         objective="flow-matching").to("cuda").eval()
        policy = BatchedPolicy(formulation, ["rgb_static"])
        rng = np.random.default_rng(0)
        frames = [Observation(images={"rgb_static": rng.integers(0, 256, (224, 224, 3), np.uint8)},
                              state=rng.standard_normal(4).astype(np.float32), instruction="open the door")
                  for _ in range(batch)]

        single, single_actions = step_seconds(policy, frames, together=False)
        batched, batched_actions = step_seconds(policy, frames, together=True)
        difference = max(np.abs(a - b).max() for a, b in zip(single_actions, batched_actions))
        print(f"{name} on {torch.cuda.get_device_name()}: a batched step of {batch} {batched * 1e3:.1f} ms, "
              f"{batch} single steps {single * 1e3:.1f} ms: {single / batched:.2f}x the steps per second; batched "
              f"and single actions differ by up to {difference:.3g}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512, help="the policy's gpt-scratch width")
    parser.add_argument("--layers", type=int, default=8, help="and depth")
    parser.add_argument("--gpu", action="store_true", help="the GPU part only")
    parser.add_argument("--measure", choices=["served", "copies"], help=argparse.SUPPRESS)  # one evaluation
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.measure:
        print(json.dumps(evaluate_once(arguments.run_dir, arguments.episodes, arguments.workers, arguments.max_steps,
                                       arguments.measure == "served")))
    elif arguments.gpu:
        gpu_part()
    else:
        cpu_part(arguments.episodes, arguments.workers, arguments.rounds, arguments.max_steps, arguments.hidden,
                 arguments.layers)
