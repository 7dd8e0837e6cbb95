"""The dry run's memory table for the built-in backbones at their published sizes (KOSMOS-2, PaliGemma-3B,
IDEFICS-9B; no weights needed): per GPU, for 1 GPU, 8 GPUs and 16 GPUs (2 nodes of 8) with FSDP, full fine-tuning,
frozen vision and embeddings, and LoRA, with and without gradient checkpointing; and how the tiny models' estimates
compare with what a training step holds on the CPU (the agreement the test suite checks).

    python perf/memory_table.py [--formulation policy-head] [--history 8] [--batch 8] [--agreement]

Markdown on stdout, for docs/sweeps.md and docs/scaling.md.
"""

from __future__ import annotations

import argparse
import time

import torch

from robovlms.benchmarks.metaworld import MetaWorldBenchmark
from robovlms.sweep.cost import _unit_statistics, synthetic_batch
from robovlms.training import load_config
from robovlms.training.memory import GIB, estimate_memory, measure_memory, meta_formulation

PUBLISHED = {"kosmos2": "/models/kosmos-2", "paligemma": "/models/paligemma-3b-pt-224",
             "flamingo": "/models/idefics-9b"}
FREEZES = {"full": {}, "frozen-vision-and-embeddings": {}, "lora": {"lora_rank": 16}}
LAYOUTS = {"1 GPU": dict(devices=1, num_nodes=1, strategy="auto"),
           "8 GPUs, FSDP": dict(devices=8, num_nodes=1, strategy="fsdp"),
           "16 GPUs (2 x 8), FSDP": dict(devices=8, num_nodes=2, strategy="fsdp")}


def published_table(formulation: str, history: int, batch: int, chunk: int) -> str:
    benchmark = MetaWorldBenchmark(tasks="mt10", image_size=224, cameras=["rgb_static", "rgb_gripper"])
    lines = [f"{formulation}, history {history}, chunk {chunk}, batch {batch} per GPU, 2 views at 224 px, "
             f"bf16-mixed (fp32 master weights), AdamW; GiB per GPU, without / with gradient checkpointing",
             "",
             "| backbone | trains | parameters (trainable) | " + " | ".join(LAYOUTS) + " |",
             "|:--|:--|--:|" + "--:|" * len(LAYOUTS)]
    for name, path in PUBLISHED.items():
        for freeze, extra in FREEZES.items():
            cells = []
            for layout in LAYOUTS.values():
                config = load_config({"store": "-", "run_dir": "-", "history": history, "chunk": chunk,
                                      "batch_size": batch, "precision": "bf16-mixed", "accelerator": "gpu",
                                      "formulation": {"name": formulation},
                                      "backbone": {"name": name, "size": "pretrained", "path": path,
                                                   "freeze": freeze, **extra}, **layout})
                model, architecture = meta_formulation(config, benchmark.action_dim, benchmark.state_dim,
                                                       published=True)
                estimate = estimate_memory(config, model, synthetic_batch(benchmark, batch, history, chunk,
                                                                          device="meta"),
                                           "put the ring onto the peg and slide it all the way down")
                cells.append(f"{estimate.total() / GIB:.0f} / {estimate.total(True) / GIB:.0f}")
            label = architecture.source.split(" (")[0]
            lines.append(f"| {name} ({label}) | {freeze} | {estimate.parameters / 1e9:.2f}B "
                         f"({estimate.trainable / 1e6:,.0f}M) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def agreement_table() -> str:
    """Estimated over measured (parameters, gradients, AdamW state, kept tensors, batch) for every built-in tiny
    backbone and formulation, batch 6, history 3 (1 for the one-step formulations), chunk 4, one 64 px view."""
    benchmark = MetaWorldBenchmark(tasks=["button-press-topdown"], image_size=64, cameras=["rgb_static"])
    from robovlms.backbone import create_backbone
    from robovlms.formulation import create_formulation

    formulations = ["one-step-continuous", "one-step-discrete", "interleaved", "policy-head"]
    lines = ["| backbone | precision, freezing | " + " | ".join(formulations) + " |",
             "|:--|:--|" + "--:|" * len(formulations)]
    for name in ["gpt-scratch", "film-convnet", "kosmos2", "paligemma", "flamingo"]:
        for precision, freeze in [("32", "full"), ("bf16-mixed", "full"), ("32", "frozen-vision-and-embeddings"),
                                  ("32", "lora")]:
            ratios = []
            for formulation in formulations:
                history = 1 if formulation.startswith("one-step") else 3
                config = load_config({"store": "-", "run_dir": "-", "history": history, "chunk": 4,
                                      "batch_size": 6, "precision": precision,
                                      "backbone": {"name": name, "freeze": freeze},
                                      "formulation": {"name": formulation}})
                batch = synthetic_batch(benchmark, 6, history, 4)
                torch.manual_seed(0)
                model = create_formulation(formulation, create_backbone(name), _unit_statistics(benchmark.action_dim),
                                           _unit_statistics(benchmark.state_dim), history=history, chunk=4,
                                           use_state=True)
                model.backbone.freeze(freeze)
                measured = measure_memory(model, batch, torch.bfloat16 if precision == "bf16-mixed" else None)
                on_meta, _ = meta_formulation(config, benchmark.action_dim, benchmark.state_dim)
                estimate = estimate_memory(config, on_meta, batch, batch["instruction"][0])
                ratios.append(f"{estimate.total() / measured.total():.2f} "
                              f"({measured.total() / 2 ** 20:.0f} MiB)")
            lines.append(f"| {name} | {precision}, {freeze} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--formulation", default="policy-head")
    parser.add_argument("--history", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--agreement", action="store_true", help="also the tiny models' estimated / measured")
    arguments = parser.parse_args()
    started = time.perf_counter()
    print(published_table(arguments.formulation, arguments.history, arguments.batch, arguments.chunk))
    if arguments.agreement:
        print("\nestimated / measured total (measured MiB), tiny models on the CPU:\n")
        print(agreement_table())
    print(f"\n({time.perf_counter() - started:.0f} s)")
