"""Comparison reports of sweeps, read from sweep run directories without re-running anything.

`write_report(run_dirs, out)` writes to `out`:
    index.md, index.html    the report; the HTML embeds its plots, so the file alone renders
    <table>.csv             every table, unformatted (rates as fractions, interval bounds in their own columns)
    <plot>.png, <plot>.svg  the plots
    cells.json              every committed cell's CellResult: axes, resolved config, costs, versions

Modules, one concern each:
    runs.py         reading run directories into SweepRuns
    statistics.py   Wilson intervals of success rates
    comparisons.py  paired differences in success and their family-wise (Holm) verdicts
    main_effects.py which cells and episodes are compared: main effects and against the baselines
    tables.py       the tables, as data frames
    formatting.py   the tables for reading
    plots.py        the figures
    sections.py     the report's sections, assembled from tables and plots
    writer.py       index.md and index.html
"""

from robovlms.report.runs import SweepRuns, read_sweep_runs
from robovlms.report.statistics import wilson_interval
from robovlms.report.writer import write_report

__all__ = ["SweepRuns", "read_sweep_runs", "wilson_interval", "write_report"]
