"""Episode records on disk: one row per evaluation episode (EpisodeRecord fields), as Parquet and CSV."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from robovlms.atomic_files import write_atomically
from robovlms.benchmark import EpisodeRecord


def records_frame(records: Sequence[EpisodeRecord]) -> pd.DataFrame:
    """One row per episode; `extra` (benchmark-specific, free-form) is kept as a JSON string."""
    rows = [asdict(record) for record in records]
    for row in rows:
        row["extra"] = json.dumps(row["extra"], sort_keys=True)
    return pd.DataFrame(rows)


def records_from_frame(frame: pd.DataFrame) -> list[EpisodeRecord]:
    rows = frame.to_dict("records")
    for row in rows:
        row["extra"] = json.loads(row["extra"])
        if pd.isna(row.get("subtasks_completed")):
            row["subtasks_completed"] = None
        else:
            row["subtasks_completed"] = int(row["subtasks_completed"])
    return [EpisodeRecord(**row) for row in rows]


def write_table(frame: pd.DataFrame, directory: Path, stem: str) -> None:
    """`stem`.parquet and `stem`.csv, each written atomically."""
    write_atomically(directory / f"{stem}.parquet", lambda temporary: frame.to_parquet(temporary, index=False))
    write_atomically(directory / f"{stem}.csv", lambda temporary: frame.to_csv(temporary, index=False))
