"""Tables for reading: rates as percentages with their intervals, readable headers, blanks for missing values."""

from __future__ import annotations

import pandas as pd

from robovlms.report.runs import ACTION_OBJECTIVE, REPEAT_RUN

HEADERS = {"backbone_label": "backbone", "data_fraction": "data fraction", ACTION_OBJECTIVE: "action objective",
           REPEAT_RUN: "run (repeated seeds)"}


def shown_configuration(configuration: list[str]) -> dict[str, str]:
    return {column: column for column in configuration}


def configuration_label(row: pd.Series, settings: list[str] = ()) -> str:
    """A configuration in one line: backbone · formulation · H=history · L=chunk · data fraction, then its other
    settings (learning_rate=0.001) and, for a repeated seed, its run."""
    parts = [row.backbone_label, row.formulation, row.history and f"H={row.history}",
             row.chunk and f"L={row.chunk}", row.get("data_fraction") and f"data {row.data_fraction}",
             *(row.get(setting) and (f"run {row[setting]}" if setting == REPEAT_RUN else
                                     row[setting] if setting == ACTION_OBJECTIVE else f"{setting}={row[setting]}")
               for setting in settings)]
    return " · ".join(part for part in parts if part)


def percent_text(value: float) -> str:
    return "" if pd.isna(value) else f"{value:.0%}"


def rate_text(row: pd.Series) -> str:
    return f"{percent_text(row.success)} [{percent_text(row.wilson_low)}, {percent_text(row.wilson_high)}]"


def shown_table(frame: pd.DataFrame, columns: dict[str, object]) -> pd.DataFrame:
    """A table for reading: the given columns (a name, or a function of the row) under readable headers."""
    return readable(pd.DataFrame({HEADERS.get(name, name): frame.apply(value, axis=1) if callable(value) else
                                   frame[value] for name, value in columns.items()}, index=frame.index))


def readable(frame: pd.DataFrame) -> pd.DataFrame:
    """Missing values shown as blanks."""
    return frame.astype(object).where(frame.notna(), "")


def wide_table(table: pd.DataFrame, by: str, cell_text, configuration: list[str]) -> pd.DataFrame:
    """One row per configuration, one column per value of `by`."""
    text = table.assign(text=table.apply(cell_text, axis=1))
    keys = [key for key in configuration if key in table and key != by]
    order = list(dict.fromkeys(text[keys].itertuples(index=False, name=None)))
    wide = text.set_index([*keys, by])["text"].unstack(by).reindex(order)
    wide.columns.name = None
    return wide.reset_index().rename(columns=HEADERS).fillna("")


def seed_text(row: pd.Series) -> str:
    return "" if pd.isna(row.seed_mean) else f"{row.seed_mean:.0%} ± {row.seed_std:.0%}"


def number_text(value: float, digits: int = 0) -> str:
    return "" if pd.isna(value) else f"{value:,.{digits}f}"
