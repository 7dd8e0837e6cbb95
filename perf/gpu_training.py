"""Training on a GPU through Lightning's settings: fp32 against bf16-mixed, and the DDP strategy, in one run.

    python perf/gpu_training.py [--backbone kosmos2] [--steps 200]

Needs a CUDA device. Reports seconds per step for precision 32 and bf16-mixed on the same batches, the final
losses of both (they should agree to within bf16's noise), and that `strategy: ddp` trains and resumes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from robovlms.data.store import Episode, EpisodeStoreWriter, FrameLayout
from robovlms.training import train


def synthetic_store(path: Path, episodes: int = 16, length: int = 40):
    rng = np.random.default_rng(0)
    layout = FrameLayout(cameras=("rgb_static",), image_size=64, state_dim=4, action_dim=4)
    with EpisodeStoreWriter(path, layout) as writer:
        for i in range(episodes):
            actions = rng.uniform(-1, 1, (length, 4)).astype(np.float32)
            actions[:, -1] = np.sign(actions[:, -1])
            writer.add(Episode(task="button-press-topdown", instruction="press the button", scene="A", seed=i,
                               images={"rgb_static": rng.integers(0, 256, (length, 64, 64, 3), dtype=np.uint8)},
                               state=rng.normal(size=(length, 4)).astype(np.float32), actions=actions))
        return writer.commit()


def timed_run(store, run_dir: Path, backbone: str, steps: int, **settings) -> tuple[float, float]:
    config = {"store": str(store.path), "run_dir": str(run_dir), "backbone": {"name": backbone},
              "formulation": {"name": "policy-head"}, "history": 4, "chunk": 4, "batch_size": 32,
              "max_steps": steps, "log_every": 10, "checkpoint_every": 50, "accelerator": "gpu", **settings}
    torch.cuda.synchronize()
    started = time.perf_counter()
    train(config)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    logs = pd.concat(pd.read_csv(f) for f in run_dir.glob("logs/version_*/metrics.csv"))
    return seconds / steps, float(logs["train/loss"].dropna().iloc[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="kosmos2")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        store = synthetic_store(root / "store")
        timed_run(store, root / "warmup", args.backbone, 10)
        fp32 = timed_run(store, root / "fp32", args.backbone, args.steps, precision="32")
        bf16 = timed_run(store, root / "bf16", args.backbone, args.steps, precision="bf16-mixed")
        print(f"{torch.cuda.get_device_name()}, {args.backbone} policy-head H=4 L=4 batch 32")
        print(f"precision 32: {fp32[0] * 1000:.1f} ms/step, final loss {fp32[1]:.4f}")
        print(f"bf16-mixed:   {bf16[0] * 1000:.1f} ms/step, final loss {bf16[1]:.4f} ({fp32[0] / bf16[0]:.2f}x)")
        timed_run(store, root / "ddp", args.backbone, args.steps // 2, strategy="ddp", devices=1)
        ddp = timed_run(store, root / "ddp", args.backbone, args.steps, strategy="ddp", devices=1)
        print(f"strategy ddp (1 device), trained then resumed to {args.steps} steps: final loss {ddp[1]:.4f}")


if __name__ == "__main__":
    main()
