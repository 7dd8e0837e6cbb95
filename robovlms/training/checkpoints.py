"""Writing Lightning checkpoints atomically, reading them safely, and choosing the one a run resumes from."""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from robovlms.atomic_files import remove_leftovers, write_atomically
from robovlms.errors import RobovlmsError

LAST_CHECKPOINT = "last.ckpt"


class CheckpointError(RobovlmsError):
    """A file of a run directory's training state (a checkpoint, training_time.json) that is truncated, corrupt,
    or not written by robovlms."""


class TruncatedCheckpointError(CheckpointError):
    """A checkpoint file that does not load as a whole: cut short, or its bytes damaged."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path} is truncated or corrupt ({reason}); delete it (training resumes from an earlier "
                         f"checkpoint)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files, each written to a temporary file beside it, flushed to the disk and renamed into
    place: a full disk or a kill leaves the previous checkpoint whole (Lightning's own writer stages the file in
    $TMPDIR and moves it, which is a copy, not a rename, when the run directory is on another filesystem). For
    single-file checkpoints; strategies that save a directory per checkpoint (FSDP sharded, DeepSpeed) write their
    own."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(temporary: Path) -> None:
            with open(temporary, "wb") as file:
                kept = _WriteErrorKeepingFile(file)
                try:
                    torch.save(checkpoint, kept)
                except RuntimeError:
                    if kept.error is not None:  # torch's writer reports it as "unexpected pos", without the errno
                        raise kept.error from None
                    raise
                file.flush()
                os.fsync(file.fileno())

        write_atomically(path, write)


class _WriteErrorKeepingFile:
    """A binary file for torch.save that keeps the OSError of a failed write (No space left on device, say)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as error:
            self.error = error
            raise


def read_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint written by `train`, loaded as tensors and plain values only."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # torch's text would suggest unsafe loading: never pass it on
        raise CheckpointError(f"{path} is not a robovlms checkpoint: it holds objects other than tensors and plain "
                              f"values, so it was not loaded; delete it (train again to replace it)") from None
    except (RuntimeError, EOFError, ValueError) as error:
        raise TruncatedCheckpointError(path, " ".join(str(error).split())[:200]) from None
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read: {error}") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "global_step"} <= checkpoint.keys():
        raise CheckpointError(f"{path} is not a robovlms checkpoint (no state_dict and global_step); delete it "
                              f"(train again to replace it)")
    return checkpoint


def resume_point(checkpoints: Path) -> tuple[Path | None, int]:
    """The checkpoint training continues from and its step. Every checkpoint that loads is a candidate and the one
    of the most steps wins; when that is not last.ckpt (truncated, or older after a kill between Lightning's
    stepN.ckpt and last.ckpt) it is copied back to last.ckpt. What a killed run left is removed first: its
    temporaries anywhere in the run directory, and checkpoints that are truncated or corrupt."""
    remove_leftovers(checkpoints.parent, recursive=True)
    found = []
    for path in sorted(checkpoints.glob("*.ckpt")):
        try:
            found.append((int(read_checkpoint(path, mmap=True)["global_step"]), path.name == LAST_CHECKPOINT, path))
        except TruncatedCheckpointError as error:
            path.unlink(missing_ok=True)
            warnings.warn(f"{path} is truncated or corrupt ({error.reason}): removed, so training resumes from an "
                          f"earlier checkpoint", stacklevel=3)
        except CheckpointError as error:
            warnings.warn(f"skipped for resuming: {error}", stacklevel=3)
    if not found:
        return None, 0
    step, is_last, newest = max(found)
    last = checkpoints / LAST_CHECKPOINT
    if not is_last:
        write_atomically(last, lambda temporary: shutil.copyfile(newest, temporary))
    return last, step
