"""Reading Lightning checkpoints safely, and choosing the one a run resumes from."""

from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from robovlms.atomic_files import write_atomically
from robovlms.errors import RobovlmsError

LAST_CHECKPOINT = "last.ckpt"


class CheckpointError(RobovlmsError):
    """A file of a run directory's training state (a checkpoint, training_time.json) that is truncated, corrupt,
    or not written by robovlms."""


def read_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint written by `train`, loaded as tensors and plain values only."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # torch's text would suggest unsafe loading: never pass it on
        raise CheckpointError(f"{path} is not a robovlms checkpoint: it holds objects other than tensors and plain "
                              f"values, so it was not loaded; delete it (train again to replace it)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise CheckpointError(f"{path} is truncated or corrupt ({reason}); delete it (training resumes from an "
                              f"earlier checkpoint)") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "global_step"} <= checkpoint.keys():
        raise CheckpointError(f"{path} is not a robovlms checkpoint (no state_dict and global_step); delete it "
                              f"(train again to replace it)")
    return checkpoint


def resume_point(checkpoints: Path) -> tuple[Path | None, int]:
    """The checkpoint training continues from and its step. Every checkpoint that loads is a candidate and the one
    of the most steps wins; when that is not last.ckpt (truncated, or older after a kill between Lightning's
    stepN.ckpt and last.ckpt) it is copied back to last.ckpt."""
    found = []
    for path in sorted(checkpoints.glob("*.ckpt")):
        try:
            found.append((int(read_checkpoint(path, mmap=True)["global_step"]), path.name == LAST_CHECKPOINT, path))
        except CheckpointError as error:
            warnings.warn(f"skipped for resuming: {error}", stacklevel=3)
    if not found:
        return None, 0
    step, is_last, newest = max(found)
    last = checkpoints / LAST_CHECKPOINT
    if not is_last:
        write_atomically(last, lambda temporary: shutil.copyfile(newest, temporary))
    return last, step
