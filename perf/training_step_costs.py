"""What a tiny VLM's training step costs on the CPU under the choices that could make a sweep cheaper, as ratios
against fp32 at batch 32 measured in one run (one thread): twice the batch, bf16 autocast, and the vision encoder
and word embeddings frozen (RoboVLMs' recipe; docs/pretraining.md, "How long it takes").

    python perf/training_step_costs.py [--backbone paligemma] [--steps 20]

A step is forward, backward and AdamW on policy-head (history 2, chunk 8), the layout of experiments/pretraining.yaml.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from training_and_policy import batches, synthetic_store

from robovlms.backbone import create_backbone
from robovlms.backbone.freezing import freeze
from robovlms.formulation import create_formulation


def step_seconds(store, backbone: str, steps: int, batch_size: int = 32, bf16: bool = False,
                 freeze_mode: str = "full") -> float:
    torch.manual_seed(0)
    model = create_formulation("policy-head", create_backbone(backbone), store.action_statistics,
                               store.state_statistics, history=2, chunk=8, use_state=True)
    freeze(model.backbone, freeze_mode)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = batches(store, 2, 8, steps + 3, batch_size)
    for index, batch in enumerate(data):
        if index == 3:  # the first steps allocate
            started = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16) if bf16 else nullcontext():
            loss, _ = model.loss(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="paligemma")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        store = synthetic_store(Path(work) / "store")
        base = step_seconds(store, args.backbone, args.steps)
        print(f"{args.backbone} policy-head, fp32, batch 32: {base * 1000:.0f} ms a step (the baseline)")
        for label, options in [("batch 64", {"batch_size": 64}), ("bf16 autocast", {"bf16": True}),
                               ("frozen-vision-and-embeddings", {"freeze_mode": "frozen-vision-and-embeddings"})]:
            seconds = step_seconds(store, args.backbone, args.steps, **options)
            print(f"  {label}: {seconds / base:.2f}x the baseline's step time")


if __name__ == "__main__":
    main()
