"""Training at scale, checked in one run where it runs: what the CPU test suite cannot check, as ratios.

    python perf/gpu_training.py [--backbone kosmos2] [--steps 200] [--batch-size 32]

On a machine with CUDA GPUs, through `robovlms.training.train` (the same path as a sweep cell), each on the same
batches of a synthetic store, timed between the first and the last validation (process start and setup excluded):

    precision        32, bf16-mixed and bf16-true (backbone.dtype bfloat16): ms per step, final loss and the most
                     GPU memory rank 0 held, against 32
    checkpointing    bf16-mixed with and without gradient_checkpointing: memory and time, against without
    strategies       fsdp, and deepspeed_stage_2 / _3 if DeepSpeed is installed, on min(2, GPUs) GPUs: stopped
                     half-way, resumed, rebuilt with load_formulation; ms per step and memory
    ddp              on every GPU (2 or more): samples per second against one GPU, and a run stopped half-way and
                     resumed, which must end with the uninterrupted run's weights

Without CUDA it runs the parts a CPU can (precision, checkpointing as saved-tensor bytes, ddp on 2 CPU processes
over gloo, one thread per process) at a small size, says which parts it skipped and why, and exits with 0;
`--require-gpu` makes a missing GPU an error instead. Put the numbers of a GPU run in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from robovlms.data.store import Episode, EpisodeStoreWriter, FrameLayout
from robovlms.training import load_formulation, train


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


class Bench:
    def __init__(self, root: Path, backbone: str, steps: int, batch_size: int, cuda: bool):
        self.root, self.steps, self.cuda = root, steps, cuda
        self.store = synthetic_store(root / "store")
        options = {} if cuda else {"hidden_size": 64, "layers": 2}
        self.base = {"store": str(self.store.path), "backbone": {"name": backbone, "options": options},
                     "formulation": {"name": "policy-head"}, "history": 4, "chunk": 4, "batch_size": batch_size,
                     "log_every": 1, "checkpoint_every": max(1, steps // 2), "accelerator": "gpu" if cuda else "cpu",
                     "validation_fraction": 0.1, "validation_batches": 1}

    def run(self, name: str, interrupt_at: int | None = None, **settings) -> dict:
        """Train (or resume) run `name` to `self.steps`: ms per step between its first and last validation (setup
        and process start excluded), its final loss and rank 0's peak memory. With `interrupt_at`, training stops
        after the first validation at or past that step, as a kill would stop it: with the same `max_steps` (the
        learning-rate schedule's length), so that a resumed run can be compared with an uninterrupted one."""
        run_dir = self.root / name
        validations = []

        def validated(step, metrics):
            validations.append((time.perf_counter(), step))
            if interrupt_at is not None and step >= interrupt_at:
                raise Interrupted(step)

        backbone = {**self.base["backbone"], **settings.pop("backbone", {})}
        try:
            train({**self.base, "run_dir": str(run_dir), "max_steps": self.steps, "backbone": backbone,
                   "validate_every": max(1, self.steps // 5), **settings}, on_validation=validated)
        except Interrupted as interrupted:
            return {"interrupted_at": interrupted.args[0]}
        if len(validations) < 2:
            raise SystemExit(f"{name}: {len(validations)} validation(s) to time steps between; use more --steps")
        (first, first_step), (last, last_step) = validations[0], validations[-1]
        clock = json.loads((run_dir / "training_time.json").read_text())
        logs = pd.concat(pd.read_csv(f) for f in run_dir.glob("logs/version_*/metrics.csv"))
        return {"ms": (last - first) * 1000 / (last_step - first_step),
                "loss": float(logs["train/loss"].dropna().iloc[-1]), "memory": clock.get("gpu_memory_bytes"),
                "run_dir": run_dir}


class Interrupted(Exception):
    """Raised by a validation hook to stop a run part-way; its argument is the step it stopped at."""


def gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def ratio(value, baseline) -> str:
    return "-" if value is None or not baseline else f"{value / baseline:.2f}x"


def report(label: str, result: dict, baseline: dict | None = None) -> None:
    versus = f" ({ratio(result['ms'], baseline['ms'])} time, {ratio(result['memory'], baseline['memory'])} " \
             f"memory)" if baseline else ""
    print(f"  {label:<28} {result['ms']:8.1f} ms/step  loss {result['loss']:.4f}  memory {gib(result['memory'])}"
          + versus, flush=True)


def precision(bench: Bench) -> None:
    print("precision (against 32):")
    full = bench.run("fp32", precision="32")
    report("32", full)
    report("bf16-mixed", bench.run("bf16_mixed", precision="bf16-mixed"), full)
    report("bf16-true", bench.run("bf16_true", precision="bf16-true", backbone={"dtype": "bfloat16"}), full)


def checkpointing(bench: Bench) -> None:
    print("gradient checkpointing (bf16-mixed, against without):")
    if bench.cuda:
        plain = bench.run("plain", precision="bf16-mixed")
        report("without", plain)
        report("gradient_checkpointing", bench.run("checkpointed", precision="bf16-mixed",
                                                   gradient_checkpointing=True), plain)
        return
    plain, checkpointed = saved_tensor_bytes(bench, False), saved_tensor_bytes(bench, True)
    print(f"  saved for backward: {gib(plain)} without, {gib(checkpointed)} with ({ratio(checkpointed, plain)}); "
          f"GPU memory and time need CUDA")


def saved_tensor_bytes(bench: Bench, checkpointed: bool) -> int:
    """The bytes autograd keeps for backward in one training step on the CPU (each storage once)."""
    from robovlms.backbone import create_backbone
    from robovlms.data.windows import WindowDataset
    from robovlms.formulation import create_formulation

    torch.manual_seed(0)
    backbone = create_backbone(bench.base["backbone"]["name"], **bench.base["backbone"]["options"])
    if checkpointed:
        backbone.enable_gradient_checkpointing()
    formulation = create_formulation("policy-head", backbone, bench.store.action_statistics,
                                     bench.store.state_statistics, history=4, chunk=4, use_state=True).train()
    batch = WindowDataset(bench.store, 4, 4).__getitems__(list(range(bench.base["batch_size"])))
    saved = {}

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss, _ = formulation.loss(batch)
    loss.backward()
    return sum(saved.values())


def strategies(bench: Bench) -> None:
    gpus = min(2, torch.cuda.device_count())
    print(f"sharding strategies on {gpus} GPU(s), bf16-mixed (against ddp):")
    baseline = bench.run("ddp_reference", precision="bf16-mixed", devices=gpus, strategy="ddp")
    report("ddp", baseline)
    names = ["fsdp"] + (["deepspeed_stage_2", "deepspeed_stage_3"] if importlib.util.find_spec("deepspeed") else [])
    for strategy in names:
        settings = {"precision": "bf16-mixed", "devices": gpus, "strategy": strategy}
        stopped = bench.run(strategy, interrupt_at=bench.steps // 2, **settings)["interrupted_at"]
        result = bench.run(strategy, **settings)  # resumed
        formulation, _ = load_formulation(result["run_dir"])
        finite = all(torch.isfinite(p).all() for p in formulation.parameters())
        report(f"{strategy} (resumed at {stopped})", result, baseline)
        print(f"    rebuilt by load_formulation from its checkpoint: {'finite weights' if finite else 'NOT FINITE'}")
    if len(names) == 1:
        print("  deepspeed_stage_2/3: skipped, DeepSpeed is not installed (pip install robovlms[deepspeed])")


def ddp(bench: Bench, processes: int) -> None:
    device, devices = ("GPU", "GPUs") if bench.cuda else ("CPU process", "CPU processes")
    print(f"ddp on {processes} {devices} (against 1; global batch {processes} x {bench.base['batch_size']}):")
    precision = "bf16-mixed" if bench.cuda else "32"
    one = bench.run("ddp_1", precision=precision)
    report(f"1 {device}", one)
    straight = bench.run("ddp_n", precision=precision, devices=processes, strategy="ddp")
    speedup = one["ms"] * processes / straight["ms"]
    report(f"{processes} {devices}", straight, one)
    print(f"    samples per second: {speedup:.2f}x one {device}'s")
    stopped = bench.run("ddp_resumed", interrupt_at=bench.steps // 2, precision=precision, devices=processes,
                        strategy="ddp")["interrupted_at"]
    resumed = bench.run("ddp_resumed", precision=precision, devices=processes, strategy="ddp")
    a = torch.load(straight["run_dir"] / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(resumed["run_dir"] / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    same = all(torch.equal(a[key], b[key]) for key in a)
    verdict = "the same weights as" if same else "DIFFERENT weights from"
    print(f"    stopped at step {stopped} and resumed: {verdict} the uninterrupted run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="kosmos2")
    parser.add_argument("--steps", type=int, default=None, help="default: 200 on a GPU, 10 on the CPU (at least 10)")
    parser.add_argument("--batch-size", type=int, default=None, help="per device; default: 32 on a GPU, 4 on the CPU")
    parser.add_argument("--require-gpu", action="store_true", help="fail without CUDA instead of running CPU parts")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and args.require_gpu:
        sys.exit("perf/gpu_training.py --require-gpu: this machine has no CUDA device (torch.cuda.is_available() "
                 "is False); run it on a GPU machine, or without --require-gpu for the CPU parts")
    if not cuda:  # one thread per process, as Lightning gives each DDP rank (cores // ranks): a fair baseline
        torch.set_num_threads(1)
    steps, batch_size = max(10, args.steps or (200 if cuda else 10)), args.batch_size or (32 if cuda else 4)
    where = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if cuda
             else "CPU only: the parts a CPU can run, at a small size")
    print(f"{where}; {args.backbone} policy-head H=4 L=4, batch {batch_size} per device, {steps} steps", flush=True)
    with tempfile.TemporaryDirectory() as directory:
        bench = Bench(Path(directory), args.backbone, steps, batch_size, cuda)
        started = time.perf_counter()
        precision(bench)
        checkpointing(bench)
        if cuda:
            strategies(bench)
        else:
            print("sharding strategies: skipped, fsdp and deepspeed train on CUDA GPUs only")
        processes = torch.cuda.device_count() if cuda else 2
        if processes >= 2:
            ddp(bench, processes)
        else:
            print("ddp: skipped, this machine has one GPU")
        print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
