"""Writing Lightning checkpoints atomically, reading them safely, and choosing the one a run resumes from."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from robovlms.atomic_files import remove_leftovers, write_atomically, write_json_atomically
from robovlms.errors import MissingDependencyError, RobovlmsError

LAST_CHECKPOINT = "last.ckpt"
STEP_FILE = "step.json"  # in a DeepSpeed checkpoint directory
DEEPSPEED_TAG = "checkpoint"  # the tag Lightning saves DeepSpeed's checkpoints under


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


def resume_point(checkpoints: Path, repair: bool = True) -> tuple[Path | None, int]:
    """The checkpoint training continues from and its step. Every checkpoint that loads is a candidate and the one
    of the most steps wins; with `repair` (rank 0), when that is not last.ckpt (truncated, or older after a kill
    between Lightning's stepN.ckpt and last.ckpt) it is copied back to last.ckpt, and what a killed run left is
    removed first: its temporaries anywhere in the run directory, and checkpoints that are truncated or corrupt."""
    if repair:
        remove_leftovers(checkpoints.parent, recursive=True)
    found = []
    for path in sorted(checkpoints.glob("*.ckpt")):
        try:
            found.append((checkpoint_step(path), path.name == LAST_CHECKPOINT, path))
        except TruncatedCheckpointError as error:
            if repair:
                path.unlink(missing_ok=True)
            warnings.warn(f"{path} is truncated or corrupt ({error.reason}): "
                          f"{'removed' if repair else 'skipped'}, so training resumes from an earlier checkpoint",
                          stacklevel=3)
        except CheckpointError as error:
            warnings.warn(f"skipped for resuming: {error}", stacklevel=3)
    if not found:
        return None, 0
    step, is_last, newest = max(found)
    if is_last or not repair:
        return newest, step
    last = checkpoints / LAST_CHECKPOINT
    if newest.is_dir():  # DeepSpeed's: a directory per checkpoint
        shutil.rmtree(last, ignore_errors=True)
        write_atomically(last, lambda temporary: shutil.copytree(newest, temporary))
    else:
        write_atomically(last, lambda temporary: shutil.copyfile(newest, temporary))
    return last, step


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was written at: from the file, or for DeepSpeed's directory from the
    step.json `RunCheckpoints` writes beside its own files."""
    if path.is_dir():
        try:
            return int(json.loads((path / STEP_FILE).read_text())["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{path} is an incomplete DeepSpeed checkpoint (no readable {STEP_FILE}); delete it "
                                  f"(training resumes from an earlier checkpoint)") from None
    return int(read_checkpoint(path, mmap=True)["global_step"])


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's formulation weights, keyed as in the formulation's own state_dict, whatever wrote it: a file
    (one process, ddp, fsdp's full state), or DeepSpeed's directory of shards, which DeepSpeed's own reader
    consolidates. A file is mapped, not read: only the weights are paged in, never the optimiser's state (with
    Adam, twice the weights)."""
    if not path.is_dir():
        state = read_checkpoint(path, mmap=True)["state_dict"]
    else:
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError:
            raise MissingDependencyError(f"{path} is a DeepSpeed checkpoint; reading it needs DeepSpeed: "
                                         f"pip install robovlms[deepspeed]") from None
        state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DEEPSPEED_TAG)
        state = {key.removeprefix("_forward_module."): value for key, value in state.items()}
    return {key.removeprefix("formulation."): value for key, value in state.items()}


class RunCheckpoints(ModelCheckpoint):
    """Lightning's checkpoints: stepN.ckpt and last.ckpt every `every` steps, and last.ckpt once more when training
    ends at a step between them (Lightning's own ModelCheckpoint would leave the last steps unsaved). DeepSpeed
    writes each as a directory; a step.json in it says its step without unpickling DeepSpeed's files."""

    def __init__(self, directory: Path, every: int):
        super().__init__(dirpath=directory, filename="step{step}", save_last=True, every_n_train_steps=every,
                         save_top_k=-1, auto_insert_metric_name=False,
                         enable_version_counter=False)  # a resumed run rewrites stepN.ckpt, never -v1

    def on_train_end(self, trainer, pl_module) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_checkpoint(trainer, str(Path(self.dirpath) / LAST_CHECKPOINT))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero and Path(filepath).is_dir():
            write_json_atomically(Path(filepath) / STEP_FILE, {"global_step": trainer.global_step})
