"""The `robovlms` command line."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from robovlms.errors import RobovlmsError, UnknownNameError

app = typer.Typer(help="robovlms: build, train, sweep and compare vision-language-action robot policies.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Episode stores: generate demonstrations, inspect.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()

BASELINE_POLICIES = ("expert", "zero", "mean", "replay")


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@data_app.command("generate")
def data_generate(
    out: Annotated[Path, typer.Argument(help="Directory of the episode store to write.")],
    benchmark: Annotated[str, typer.Option(help="Benchmark with scripted experts.")] = "metaworld",
    tasks: Annotated[str, typer.Option(help="Task set (demo, mt10, mt50) or comma-separated task names.")] = "demo",
    split: Annotated[str, typer.Option(help="Scene split; demonstrations come from its training scenes.")] = "ABC->D",
    scenes: Annotated[str | None, typer.Option(help="Training scenes to use instead of the split's, e.g. AB.")] = None,
    episodes: Annotated[int, typer.Option(help="Successful demonstrations per task and scene.")] = 20,
    image_size: Annotated[int, typer.Option(help="Square image size, 64 to 224.")] = 64,
    cameras: Annotated[str, typer.Option(help="Comma-separated cameras.")] = "rgb_static,rgb_gripper",
    max_steps: Annotated[int, typer.Option(help="Step limit of an episode.")] = 200,
    workers: Annotated[int, typer.Option(help="Simulator processes.")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store (only once the new one is complete).")] = False,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted run, keeping the episodes it already wrote.")] = False,
) -> None:
    """Run the benchmark's scripted experts and write their successful episodes to an episode store."""
    from robovlms.benchmark import create_benchmark
    from robovlms.demonstrations import generate_demonstrations

    task_list = tasks if "," not in tasks else _split_list(tasks)
    bench = create_benchmark(benchmark, tasks=task_list, image_size=image_size, cameras=_split_list(cameras),
                             max_steps=max_steps)
    store = generate_demonstrations(bench, split, episodes, out, scenes=scenes, workers=workers,
                                    overwrite=overwrite, resume=resume)
    _print_store(store)


@data_app.command("info")
def data_info(store: Annotated[Path, typer.Argument(help="Episode store directory.")]) -> None:
    """Summarise an episode store: episodes per task and scene, layout, action statistics."""
    from robovlms.store import EpisodeStore

    _print_store(EpisodeStore(store))


def _print_store(store) -> None:
    counts = store.episodes.groupby(["task", "scene"]).size().unstack(fill_value=0)
    table = Table(title=f"{store.path}: {len(store)} episodes, {store.frames} frames")
    table.add_column("task")
    for scene in counts.columns:
        table.add_column(f"scene {scene}", justify="right")
    for task, row in counts.iterrows():
        table.add_row(task, *(str(v) for v in row))
    console.print(table)
    stats = store.action_statistics
    console.print(f"layout: {store.layout}")
    console.print("actions p01: " + " ".join(f"{v:+.3f}" for v in stats.p01))
    console.print("actions p99: " + " ".join(f"{v:+.3f}" for v in stats.p99))


def baseline_policy_factory(policy: str, benchmark, store: Path | None, seed: int):
    from robovlms.baselines import MeanActionPolicy, ReplayPolicy, ZeroPolicy

    if policy == "expert":
        return benchmark.scripted_expert()
    if policy == "zero":
        return functools.partial(ZeroPolicy, benchmark.action_dim)
    if policy not in BASELINE_POLICIES:
        raise UnknownNameError("policy", policy, BASELINE_POLICIES)
    if store is None:
        raise typer.BadParameter(f"the {policy} baseline needs --store (its training demonstrations)")
    return functools.partial(MeanActionPolicy, str(store)) if policy == "mean" else functools.partial(
        ReplayPolicy, str(store), seed)


@app.command("evaluate")
def evaluate_command(
    policy: Annotated[str, typer.Option(help=f"Policy to roll out: {', '.join(BASELINE_POLICIES)}.")],
    store: Annotated[Path | None, typer.Option(help="Training store: benchmark settings and baseline data.")] = None,
    benchmark: Annotated[str, typer.Option(help="Benchmark, when no store is given.")] = "metaworld",
    tasks: Annotated[str | None, typer.Option(help="Tasks to evaluate (default: the store's).")] = None,
    split: Annotated[str, typer.Option(help="Scene split; evaluation uses its held-out scenes.")] = "ABC->D",
    episodes: Annotated[int, typer.Option(help="Evaluation episodes per task.")] = 10,
    workers: Annotated[int, typer.Option(help="Simulator processes.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the replay baseline's choice of demonstration.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Directory for records.parquet/.csv and videos.")] = None,
    videos: Annotated[int, typer.Option(help="Episodes per task to save as MP4 (needs --out).")] = 0,
) -> None:
    """Roll out a baseline or the scripted expert on a split's evaluation episodes and print per-task success."""
    from robovlms.benchmark import create_benchmark
    from robovlms.rollout import evaluate, records_frame
    from robovlms.store import EpisodeStore

    options = {}
    if store is not None:
        meta = EpisodeStore(store).metadata
        benchmark, options = meta["benchmark"], dict(meta["benchmark_options"])
    if tasks is not None:
        options["tasks"] = tasks if "," not in tasks else _split_list(tasks)
    bench = create_benchmark(benchmark, **options)
    factory = baseline_policy_factory(policy, bench, store, seed)
    specs = bench.evaluation_episodes(split, episodes)
    records = evaluate(bench, factory, specs, workers=workers,
                       video_dir=(out / "videos") if out and videos else None, videos_per_task=videos)
    frame = records_frame(records)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(out / "records.parquet", index=False)
        frame.to_csv(out / "records.csv", index=False)
    table = Table(title=f"{policy} on {bench.name} {split}: {len(records)} episodes")
    for column in ("task", "successes", "rate", "mean steps"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, group in frame.groupby("task"):
        table.add_row(task, f"{group.success.sum()}/{len(group)}", f"{group.success.mean():.0%}",
                      f"{group.steps.mean():.0f}")
    table.add_row("all", f"{frame.success.sum()}/{len(frame)}", f"{frame.success.mean():.0%}", f"{frame.steps.mean():.0f}")
    console.print(table)
    console.print_json(json.dumps(bench.score(records)))


@app.command("train")
def train_command(
    config: Annotated[Path, typer.Argument(help="Training config YAML (see docs/formulations.md).")],
    progress: Annotated[bool, typer.Option(help="Show Lightning's progress bar.")] = True,
) -> None:
    """Train one configuration on an episode store; resumes from the run directory's last checkpoint."""
    from robovlms.training import train

    run_dir = train(config, progress=progress)
    console.print(f"trained: {run_dir} (checkpoints in {run_dir / 'checkpoints'})")


@app.command("backbones")
def backbones_command() -> None:
    """List the registered backbones (built-in and from plugins) with their tiny sizes' parameter counts."""
    from robovlms.backbone import backbones_table

    console.print(backbones_table())


@app.command("benchmarks")
def benchmarks_command() -> None:
    """List the registered benchmarks."""
    from robovlms.benchmark import BENCHMARKS

    for name in BENCHMARKS.names():
        console.print(name)


def main() -> None:
    try:
        app()
    except RobovlmsError as error:
        console.print(f"[red]error:[/red] {error}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
