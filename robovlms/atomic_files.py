"""Atomic file writes: a reader (another worker, a crash's aftermath) sees the old file or the new one, never part.

The temporary name carries the process id, so workers writing the same file at once do not collide.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` fills a temporary file beside `path`, which then replaces `path` in one rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def write_json_atomically(path: Path, payload: Any) -> None:
    def write(temporary: Path) -> None:
        with open(temporary, "w") as file:
            json.dump(payload, file, indent=2, default=str)
            file.flush()
            os.fsync(file.fileno())

    write_atomically(path, write)
