"""A rollout policy from a trained run directory, on the device and in the dtype it runs in.

`CheckpointPolicy` and `load_policy` step one episode (the `Policy` of `robovlms.benchmark`): a `BatchedPolicy`
(robovlms/serving/batched_policy.py: history, chunk execution, per-episode noise) serving a single episode, so an
episode's actions are the same whether it runs alone here or batched with others behind a policy server.

Devices: `auto` (the first CUDA GPU when torch sees one, else the CPU), `cpu`, `cuda`, `cuda:N`. The policy runs in
the dtype its cell trained in: precision bf16-true holds every weight in bfloat16, as Lightning trained it; otherwise
the weights stay float32 (the backbone in `backbone.dtype`) and bf16-mixed or 16-mixed run the forward under autocast
in that dtype, as Lightning did in training.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from robovlms.errors import ConfigError
from robovlms.formulation import Formulation
from robovlms.serving.batched_policy import BatchedPolicy, EpisodePolicy

DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}


class CheckpointPolicy(EpisodePolicy):
    """A formulation's policy stepping one episode."""

    def __init__(self, formulation: Formulation, cameras: list[str], execution: str = "first",
                 ensemble_decay: float = 0.01, frame_stride: int = 1, autocast_dtype: torch.dtype | None = None):
        super().__init__(BatchedPolicy(formulation, cameras, execution, ensemble_decay, frame_stride, autocast_dtype))


def resolve_device(name: str = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a torch device this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise ConfigError(f"device {name!r} is none of {', '.join(DEVICES)}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: this torch ({torch.__version__}) sees no CUDA GPU here; use cpu or auto")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def autocast_dtype(config) -> torch.dtype | None:
    """The dtype a run's forward computed in under Lightning's precision (None: its weights' own); its weights
    themselves are rebuilt in the dtypes they trained in (robovlms/training/precision.py)."""
    from robovlms.training.precision import DTYPES

    backbone = DTYPES[config.backbone.dtype]
    return AUTOCAST_DTYPES.get(config.precision, None if backbone == torch.float32 else backbone)


def load_batched_policy(run_dir: str | Path, execution: str | None = None, checkpoint: str | None = None,
                        device: str = "auto") -> BatchedPolicy:
    """The batched policy of a trained run directory on `device`, in the dtype it trained in; `execution`
    overrides the run's own setting."""
    from robovlms.training import LAST_CHECKPOINT, load_formulation

    formulation, config = load_formulation(run_dir, checkpoint or LAST_CHECKPOINT, device=resolve_device(device))
    return BatchedPolicy(formulation, config.cameras, execution or config.execution, frame_stride=config.frame_stride,
                         autocast_dtype=autocast_dtype(config))


def load_policy(run_dir: str | Path, execution: str | None = None, checkpoint: str | None = None,
                device: str = "cpu") -> EpisodePolicy:
    """The single-episode policy of a trained run directory; `execution` overrides the run's own setting."""
    return EpisodePolicy(load_batched_policy(run_dir, execution, checkpoint, device))


def observation_layout(run_dir: str | Path, policy: BatchedPolicy) -> tuple[int, int | None, str]:
    """(the side of the images a run was trained on, the length of its proprio state or None, where the side was
    read): from the run's store when it is on this machine, else the backbone's own image size."""
    import json

    from robovlms.data.store import EpisodeStore
    from robovlms.errors import StoreError
    from robovlms.training import CONFIG_FILE, STATISTICS_FILE, load_config

    statistics = json.loads((Path(run_dir) / STATISTICS_FILE).read_text())["state"]
    state_dim = len(statistics["p01"]) if statistics else None
    store = load_config(Path(run_dir) / CONFIG_FILE).store
    try:
        return EpisodeStore(store).layout.image_size, state_dim, f"the store {store}"
    except (StoreError, OSError):
        return policy.formulation.backbone.image_size, state_dim, "the backbone (the run's store is not here)"


def policy_factory(run_dir: str | Path, execution: str | None = None, checkpoint: str | None = None):
    """A picklable zero-argument factory for `robovlms.rollout.evaluate` when each worker is to load its own copy
    on the CPU (`evaluation.policy_server: false`); by default one process serves them all."""
    return functools.partial(load_policy, str(run_dir), execution, checkpoint)


def policy_digest(run_dir: str | Path, checkpoint: str | None = None) -> str:
    """What identifies a trained run's policy wherever the run lies: a SHA-256 over its config (less the paths of
    its store and run directory), action statistics, backbone files and checkpoint."""
    import hashlib
    import json

    from robovlms.training import (
        BACKBONE_DIR,
        CHECKPOINT_DIR,
        CONFIG_FILE,
        LAST_CHECKPOINT,
        STATISTICS_FILE,
        load_config,
    )

    run_dir = Path(run_dir)
    config = load_config(run_dir / CONFIG_FILE).model_dump(mode="json", exclude={"store", "run_dir"})
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    backbone_files = sorted(path for path in (run_dir / BACKBONE_DIR).rglob("*") if path.is_file())
    checkpoint_file = run_dir / CHECKPOINT_DIR / (checkpoint or LAST_CHECKPOINT)
    for path in [run_dir / STATISTICS_FILE, *backbone_files, checkpoint_file]:
        digest.update(path.relative_to(run_dir).as_posix().encode())
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"
