"""The report's plots, built as matplotlib Figures without pyplot: no global backend, nothing shown on screen."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

TRAINED_COLOUR = "tab:blue"
BASELINE_COLOUR = "tab:gray"
LEGEND_LINE_INCHES = 0.15  # a line of a 7-point legend


def save_figure(figure: Figure, out: Path, stem: str) -> None:
    """Write `stem`.png and `stem`.svg; the SVG carries no date, so rewriting an unchanged plot changes no file."""
    figure.savefig(out / f"{stem}.png", dpi=110, bbox_inches="tight")
    figure.savefig(out / f"{stem}.svg", bbox_inches="tight", metadata={"Date": None})


def _error_bars(success: Sequence[float], low: Sequence[float], high: Sequence[float]) -> np.ndarray:
    success, low, high = (np.asarray(values, dtype=float) for values in (success, low, high))
    return np.nan_to_num(np.stack([success - low, high - success]))  # (2, N)


def success_figure(labels: Sequence[str], success: Sequence[float], low: Sequence[float], high: Sequence[float],
                   is_baseline: Sequence[bool]) -> Figure:
    """One horizontal bar per row of the success table, with its 95% Wilson interval; baselines in grey."""
    figure = Figure(figsize=(8, 1.2 + 0.4 * len(labels)))
    axes = figure.subplots()
    rows = np.arange(len(labels))
    colours = [BASELINE_COLOUR if baseline else TRAINED_COLOUR for baseline in is_baseline]
    axes.barh(rows, np.nan_to_num(np.asarray(success, dtype=float)), color=colours,
              xerr=_error_bars(success, low, high), capsize=3)
    axes.set_yticks(rows, labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("success rate (95% Wilson interval)")
    axes.grid(axis="x", alpha=0.3)
    return figure


def data_efficiency_figure(series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float],
                                                   Sequence[float]]]) -> Figure:
    """Success against the fraction of training data: one line per configuration, {label: (fraction, success,
    low, high)}."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for label, (fraction, success, low, high) in series.items():
        axes.errorbar(fraction, success, yerr=_error_bars(success, low, high), marker="o", capsize=3, label=label)
    axes.set_xlabel("fraction of training demonstrations")
    axes.set_ylabel("success rate (95% Wilson interval)")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return figure


def latency_figure(labels: Sequence[str], latency_ms: Sequence[float], success: Sequence[float],
                   low: Sequence[float], high: Sequence[float]) -> Figure:
    """Success against policy step latency: each point numbered, the numbers named in a legend beside the plot
    (labels written at the points overlap when configurations cost alike)."""
    figure = Figure(figsize=(9, 4.5))
    axes = figure.subplots()
    axes.errorbar(latency_ms, success, yerr=_error_bars(success, low, high), fmt="o", capsize=3, zorder=1)
    for number, (label, x, y) in enumerate(zip(labels, latency_ms, success), start=1):
        axes.annotate(str(number), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, weight="bold")
        axes.plot([], [], " ", label=f"{number}  {label}")
    axes.set_xscale("log")
    # plain milliseconds (20, 30, 50), not 2x10^1; minor ticks labelled where few decades leave room for them
    axes.xaxis.set_major_formatter(LogFormatter())
    axes.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    axes.set_xlabel("policy step latency (ms, log scale)")
    axes.set_ylabel("success rate (95% Wilson interval)")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), handlelength=0, frameon=False)
    return figure


def training_curves_figure(panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]]) -> Figure:
    """Training loss against optimiser step: one panel per group (formulation), one line per trained cell,
    {panel: {label: (step, loss)}}."""
    # each panel as tall as its legend (one line per cell, beside it), each "step" clear of the next title
    heights = [max(3.2, 0.6 + LEGEND_LINE_INCHES * len(curves)) for curves in panels.values()]
    figure = Figure(figsize=(8, sum(heights)), layout="constrained")
    for axes, (title, curves) in zip(figure.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0],
                                     panels.items()):
        for label, (step, loss) in curves.items():
            axes.plot(step, loss, label=label, linewidth=1)
        axes.set_title(title, fontsize=9, loc="left")
        axes.set_xlabel("step")
        axes.set_ylabel("train/loss")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return figure


def main_effects_figure(effects: dict[str, tuple[Sequence[str], Sequence[float], Sequence[float],
                                                 Sequence[float]]]) -> Figure:
    """One panel per design axis: success of each level pooled over the other axes, {axis: (levels, success, low,
    high)}."""
    figure = Figure(figsize=(8, 1.0 + sum(0.8 + 0.35 * len(levels) for levels, *_ in effects.values())))
    panels = figure.subplots(len(effects), 1, squeeze=False, height_ratios=[len(levels) for levels, *_ in
                                                                            effects.values()])[:, 0]
    for axes, (axis, (levels, success, low, high)) in zip(panels, effects.items()):
        rows = np.arange(len(levels))
        axes.barh(rows, np.nan_to_num(np.asarray(success, dtype=float)), color=TRAINED_COLOUR,
                  xerr=_error_bars(success, low, high), capsize=3)
        axes.set_yticks(rows, [str(level) for level in levels], fontsize=8)
        axes.invert_yaxis()
        axes.set_xlim(0, 1)
        axes.set_title(axis, fontsize=9, loc="left")
        axes.grid(axis="x", alpha=0.3)
    panels[-1].set_xlabel("success rate, pooled over the other axes (95% Wilson interval)")
    figure.tight_layout()
    return figure
