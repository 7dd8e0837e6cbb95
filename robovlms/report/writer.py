"""Writing a report: index.md, and index.html with its plots embedded so the file alone renders."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from robovlms.atomic_files import why_directory_cannot_be_made
from robovlms.errors import ReportError
from robovlms.report.runs import read_sweep_runs
from robovlms.report.sections import Section, build_sections


def write_report(run_dirs: Iterable[str | Path], out: str | Path, real_world: Path | None = None) -> Path:
    """Read sweep run directories and write the report to `out`; returns the path of index.html. `real_world`: a
    file of real-world success rates (configuration -> task -> rate), for the run's sim-to-real agreement."""
    run_dirs = [Path(path) for path in run_dirs]
    out = Path(out)
    reason = why_directory_cannot_be_made(out)  # before any run is read
    if reason is not None:
        raise ReportError(f"cannot write the report to {out}: {reason}")
    runs = read_sweep_runs(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    sections = build_sections(runs, out, real_world)
    for section in sections:
        for table in section.tables:
            table.data.to_csv(out / f"{table.name}.csv", index=False)
    (out / "cells.json").write_text(json.dumps([asdict(result) for result in runs.results], indent=2, default=str))
    complete = int((runs.cells.status == "complete").sum())
    summary = (f"{len(runs.cells)} committed cell(s) in {', '.join(str(path) for path in run_dirs)}: {complete} "
               f"complete, {len(runs.cells) - complete} failed, {len(runs.unfinished)} unfinished. Every rate is over "
               "the evaluation episodes counted in its row; a success rate's interval is a 95% Wilson score interval, "
               "a difference's interval a 95% t interval whose verdict is Holm-adjusted over its table. Backbones "
               "trained from scratch are labelled \"random init\".")
    title = f"Sweep report: {runs.benchmark or 'no results'}" + (
        f", split {runs.split}, {runs.evaluation_split} episodes" if runs.split else "")
    (out / "index.md").write_text(_markdown(title, summary, sections))
    (out / "index.html").write_text(_html(title, summary, sections, out))
    return out / "index.html"


def _markdown(title: str, summary: str, sections: list[Section]) -> str:
    blocks = [f"# {title}", summary]
    for section in sections:
        blocks += [f"## {section.title}", *section.notes]
        for table in section.tables:
            if table.shown is not None:
                if table.caption:
                    blocks.append(f"*{table.caption}*")
                blocks.append(table.shown.to_markdown(index=False, disable_numparse=True))
            blocks.append(f"CSV: [{table.name}.csv]({table.name}.csv)")
        blocks += [f"![{stem}]({stem}.png) ([SVG]({stem}.svg))" for stem in section.figures]
        blocks += [f"<details><summary>{summary_text}</summary>\n\n```json\n{text}\n```\n\n</details>"
                   for summary_text, text in section.details]
    return "\n\n".join(blocks) + "\n"


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; white-space: nowrap; }
td:last-child { white-space: normal; min-width: 24em; }  /* the long free text: errors, axes */
.table-scroll { overflow-x: auto; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
pre { background: #f7f7f7; padding: 0.5em; font-size: 0.8em; overflow-x: auto; }
.note { color: #444; }
.caption { font-style: italic; margin-bottom: 0; }
"""


IMAGES_LOADED_SCRIPT = """
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((image) => image.complete && image.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = loaded + "/" + images.length;
});
"""


def _html(title: str, summary: str, sections: list[Section], out: Path) -> str:
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(summary)}</p>", "<ul>"]
    body += [f'<li><a href="#section-{index}">{html.escape(section.title)}</a></li>'
             for index, section in enumerate(sections)]
    body.append("</ul>")
    for index, section in enumerate(sections):
        body.append(f'<h2 id="section-{index}">{html.escape(section.title)}</h2>')
        body += [f'<p class="note">{html.escape(note)}</p>' for note in section.notes]
        for table in section.tables:
            if table.shown is not None:
                if table.caption:
                    body.append(f'<p class="caption">{html.escape(table.caption)}</p>')
                body.append(f'<div class="table-scroll">{table.shown.to_html(index=False, border=0)}</div>')
            body.append(f'<p class="note">CSV: <a href="{table.name}.csv">{table.name}.csv</a></p>')
        for stem in section.figures:
            image = base64.b64encode((out / f"{stem}.png").read_bytes()).decode()
            body.append(f'<img alt="{stem}" src="data:image/png;base64,{image}">')
        body += [f"<details><summary>{html.escape(summary_text)}</summary><pre>{html.escape(text)}</pre></details>"
                 for summary_text, text in section.details]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{HTML_STYLE}</style><script>{IMAGES_LOADED_SCRIPT}</script></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
