"""Which GPUs each worker process of a machine gets: its own, so that the cells of two workers never share one.

A worker gets as many GPUs as its cells train on (`devices`; "auto": an equal share), through CUDA_VISIBLE_DEVICES,
so a cell's ranks use cuda:0..k-1 of the worker's own; MuJoCo renders its evaluation episodes on the first of them
(MUJOCO_EGL_DEVICE_ID). GPUs are numbered in PCI bus order, as nvidia-smi and EGL number them.
"""

from __future__ import annotations

import os

from robovlms.errors import ConfigError

WORKER_INDEX = "ROBOVLMS_WORKER"  # "i/N", set in each worker process a sweep starts


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES' entries when it is set, else every GPU the driver
    reports."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip() and gpu.strip() != "-1"]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def cell_devices(sweep, mode: str) -> list[int | str]:
    """The `devices` of every cell a sweep trains (a search's: its fixed training settings')."""
    from robovlms.sweep.cells import search_base, sweep_cells

    cells = sweep_cells(sweep, mode) if mode == "grid" else [search_base(sweep)]
    return [cell.training.get("devices", 1) for cell in cells if cell.kind == "trained"]


def gpus_per_worker(devices: list[int | str], workers: int, gpus: int) -> int:
    """What each worker needs: the most `devices` of its cells, or for "auto" an equal share of the machine's."""
    if "auto" in devices:
        return max(1, gpus // workers)
    return max([1, *devices])


def assign_gpus(devices: list[int | str], workers: int) -> list[list[str]] | None:
    """Disjoint GPUs for each of `workers` worker processes, or None on a machine without GPUs."""
    gpus = visible_gpus()
    if not gpus:
        return None
    each = gpus_per_worker(devices, workers, len(gpus))
    if each * workers > len(gpus):
        fit = len(gpus) // each
        raise ConfigError(f"{workers} workers whose cells train on {each} GPU(s) each need {each * workers} GPUs; "
                          f"this machine has {len(gpus)} ({', '.join(gpus)}): run at most {max(fit, 1)} worker(s) "
                          f"here" + ("" if fit else ", or fewer devices per cell"))
    return [gpus[index * each:(index + 1) * each] for index in range(workers)]


def worker_environment(gpus: list[str] | None, index: int, workers: int) -> dict[str, str]:
    """The variables that give a worker process its own GPUs."""
    environment = {WORKER_INDEX: f"{index}/{workers}"}
    if gpus is None:
        return environment
    environment.update(CUDA_VISIBLE_DEVICES=",".join(gpus), CUDA_DEVICE_ORDER="PCI_BUS_ID")
    if gpus[0].isdigit():  # an index, not a GPU or MIG UUID: EGL numbers devices the same way
        environment["MUJOCO_EGL_DEVICE_ID"] = gpus[0]
    return environment


def describe_worker_gpus() -> str:
    """What this worker process was given, for its log: "worker 1/2: GPUs 2,3 (EGL device 2)"."""
    worker = f"worker {os.environ[WORKER_INDEX]}" if WORKER_INDEX in os.environ else "this worker"
    gpus = visible_gpus()
    if not gpus:
        return f"{worker}: no GPU, trains on the CPU"
    egl = os.environ.get("MUJOCO_EGL_DEVICE_ID")
    return f"{worker}: GPUs {','.join(gpus)}" + (f" (EGL device {egl})" if egl else "")
