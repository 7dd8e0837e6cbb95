"""The report's pre-training sections: the pre-training cells, and the linear probe of each configuration's [LRN]
state for the target object's position (robovlms/pretraining/probe.py), random init beside pre-trained."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from robovlms.report.formatting import configuration_label, number_text, readable
from robovlms.report.main_effects import architecture
from robovlms.report.runs import PRETRAINING_AXIS, SweepRuns, complete_cells
from robovlms.report.sections import Section, Table


def pretraining_sections(runs: SweepRuns) -> list[Section]:
    return [section for section in (_pretraining_cells_section(runs), _probe_section(runs)) if section is not None]


def pretraining_level(axes: dict | None) -> str:
    """A cell's pre-training as the grid named it: a setting's name, or "none" (a random init)."""
    value = (axes or {}).get(PRETRAINING_AXIS, "none")
    return "none" if value is None else str(value)


def _pretraining_cells_section(runs: SweepRuns) -> Section | None:
    if not runs.pretraining:
        return None
    rows = [{"cell": result.cell_id, "backbone": result.backbone, "pretraining": pretraining_level(result.axes),
             "steps": result.config.get("max_steps"), "batch": result.config.get("batch_size"),
             "frames": json.dumps(result.config.get("frames", {}), sort_keys=True),
             "final train loss": result.final_train_loss, "train seconds": result.train_seconds,
             "cpu seconds": result.cpu_seconds, "directory": result.checkpoint} for result in runs.pretraining]
    data = pd.DataFrame(rows)
    shown = readable(data.drop(columns=["frames"]).assign(**{
        "final train loss": data["final train loss"].map(lambda value: number_text(value, 3)),
        "train seconds": data["train seconds"].map(number_text), "cpu seconds": data["cpu seconds"].map(number_text)}))
    return Section("Pre-training", [
        "Each pre-training cell: a backbone pre-trained with its own language-modelling loss on frames rendered from "
        "Meta-World tasks and scenes the sweep does not evaluate on, with captions, questions and answers and "
        "grounding written from the simulator's state (docs/pretraining.md). The cells whose `pretraining` axis "
        "names it start from the directory it wrote. train seconds: wall time of its training; cpu seconds: CPU "
        "time of its process and its rendering workers, frames included."], [Table("pretraining", data, shown)])


def probe_table(runs: SweepRuns) -> pd.DataFrame:
    """Per configuration and pre-training: seeds, the probe's R^2 and mean error (cm) at initialisation and after
    training (mean and standard deviation over seeds), and success with its episodes."""
    cells = complete_cells(runs)
    cells = cells[(cells["kind"] == "trained") & cells["probe"].notna()]
    if cells.empty:
        return pd.DataFrame()
    probes = pd.DataFrame(list(cells["probe"]), index=cells.index)
    settings = [setting for setting in runs.settings if not setting.startswith("backbone.")]
    frame = cells.assign(pretraining=[pretraining_level(axes) for axes in cells["axes"]],
                         configuration=[_architecture_label(row, cells, settings) for _, row in cells.iterrows()],
                         **probes)
    rows = []
    for (configuration, pretraining), group in frame.groupby(["configuration", "pretraining"], sort=False):
        row = {"configuration": configuration, "pretraining": pretraining, "seeds": len(group)}
        for stage in ("initial", "trained"):
            for metric in ("r2", "error_cm", "position_r2"):  # position: measured by probes since it was added
                values = group.get(f"{metric}_{stage}", pd.Series(np.nan, index=group.index)).to_numpy(dtype=float)
                values = values[~np.isnan(values)]  # a cell probed before a metric existed has none
                row[f"{metric}_{stage}"] = values.mean() if len(values) else np.nan
                row[f"{metric}_{stage}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
        for reference in ("r2_state_only", "position_r2_state_only"):
            row[reference] = group[reference].mean() if reference in group else np.nan
        row["mean_error_cm"] = group.mean_error_cm.mean()
        row["frames"] = int(group.frames.iloc[0])
        row["successes"], row["episodes"] = int(group.successes.sum()), int(group.episodes.sum())
        rows.append(row)
    return pd.DataFrame(rows)


def _architecture_label(row: pd.Series, cells: pd.DataFrame, settings: list[str]) -> str:
    """A configuration named by its architecture (the pre-training column says random or pre-trained)."""
    row = row.copy()
    row["backbone_label"] = architecture(cells, row.backbone)
    return configuration_label(row, settings)


def _probe_section(runs: SweepRuns) -> Section | None:
    table = probe_table(runs)
    if table.empty:
        return None

    def spread(row, column: str, digits: int) -> str:
        text = number_text(row[column], digits)
        deviation = row[f"{column}_std"]
        return text if pd.isna(deviation) else f"{text} ± {number_text(deviation, digits)}"

    shown = readable(pd.DataFrame({
        "configuration": table.configuration, "pre-training": table.pretraining, "seeds": table.seeds,
        "R² at initialisation": table.apply(spread, axis=1, column="r2_initial", digits=2),
        "R² trained": table.apply(spread, axis=1, column="r2_trained", digits=2),
        "error cm, initialisation": table.apply(spread, axis=1, column="error_cm_initial", digits=1),
        "error cm, trained": table.apply(spread, axis=1, column="error_cm_trained", digits=1),
        "position R² at initialisation": table.apply(spread, axis=1, column="position_r2_initial", digits=2),
        "position R² trained": table.apply(spread, axis=1, column="position_r2_trained", digits=2),
        "success": [f"{row.successes}/{row.episodes} ({row.successes / row.episodes:.0%})"
                    for row in table.itertuples()]}))
    frames, baseline = int(table.frames.iloc[0]), table.mean_error_cm.mean()
    return Section("What the [LRN] state encodes of the target's position (linear probe)", [
        f"A ridge regression from each configuration's [LRN] hidden state to the target object's offset from the "
        f"gripper (x, y, z), on {frames} frames of the evaluated tasks rendered in the split's validation scene: fit "
        f"on half the episodes, scored on the other half (robovlms/pretraining/probe.py). R² is averaged over x, y, "
        f"z (0: no better than the mean offset, 1: exact); error cm is the mean distance between predicted and true "
        f"offset (the mean offset alone is off by {baseline:.1f} cm). At initialisation: the backbone as loaded "
        f"(random, or pre-trained) with a random [LRN] embedding; trained: after the cell's training. Mean ± standard "
        f"deviation over seeds; success pools the seeds' evaluation episodes. Position R²: the same probe for the "
        f"target's world position." + ("" if table.r2_state_only.isna().all() else
        f" The proprio state alone (the hand's position and opening) gives R² "
        f"{number_text(table.r2_state_only.mean(), 2)} for the offset and "
        f"{number_text(table.position_r2_state_only.mean(), 2)} for the position: the hand moves towards the target, "
        f"so only what lies above these is read from the image and instruction.")],
        [Table("probe", table, shown)])
