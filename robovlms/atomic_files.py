"""Atomic file writes: a reader (another worker, a crash's aftermath) sees the old file or the new one, never part.

The temporary name carries the process id, so workers writing the same file at once do not collide. A write that
fails (a full disk) removes its temporary; a writer killed mid-write leaves it, and `remove_leftovers` takes it
away when the work resumes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")  # .NAME.PID.tmp


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` fills a temporary file beside `path`, which then replaces `path` in one rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, payload: Any) -> None:
    def write(temporary: Path) -> None:
        with open(temporary, "w") as file:
            json.dump(payload, file, indent=2, default=str)
            file.flush()
            os.fsync(file.fileno())

    write_atomically(path, write)


def why_directory_cannot_be_made(directory: Path) -> str | None:
    """Why `directory` is not, and cannot be made as, a writable directory; None when it is or can be."""
    existing = next((parent for parent in (directory, *directory.parents) if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if existing is not None and not os.access(existing, os.W_OK):
        return f"{existing} is not writable"
    return None


def remove_leftovers(directory: Path, recursive: bool = False) -> list[Path]:
    """Remove the temporaries of killed writers (.NAME.PID.tmp whose process no longer runs on this machine) from
    `directory`; returns what was removed."""
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.rglob(".*.tmp") if recursive else directory.glob(".*.tmp"):
        match = TEMPORARY.match(path.name)
        if match and path.is_file() and not _running(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's
        return True
    return True
