"""The `robovlms` command line.

Kept quick to start: this module imports only typer, rich and robovlms' light modules (errors, registries, baseline
names); each command imports what it needs in its own body, so `robovlms --help` and the plugin listings import
no model library.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from robovlms.baselines import BASELINES
from robovlms.errors import RobovlmsError
from robovlms.registry import BACKBONES, BENCHMARKS, FORMULATIONS, Registry

app = typer.Typer(help="robovlms: build, train, sweep and compare vision-language-action robot policies.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Episode stores: generate demonstrations, import datasets, inspect.", no_args_is_help=True)
app.add_typer(data_app, name="data")
PIPED_WIDTH = 10_000  # columns when output is not a terminal: wide enough that no table cell is cut or wrapped


def _console() -> Console:
    """Rich's console. Piped or redirected output would be cut to rich's default 80 columns, breaking entry
    points, paths and ids that scripts grep for: it is as wide as its lines instead, unless COLUMNS says otherwise."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPED_WIDTH
    return console


console = _console()
show_traceback = False  # set by --traceback or ROBOVLMS_DEBUG=1

POLICIES = ("expert", *BASELINES)
MAX_EPISODES = 100_000  # per task: beyond it a number is a typo, whose episode list alone would fill the memory
MAX_WORKERS = 1024


def _check_range(option: str, value: int, low: int, high: int) -> None:
    from robovlms.errors import ConfigError

    if not low <= value <= high:
        raise ConfigError(f"{option} must be between {low} and {high}; got {value}")


@app.callback()
def global_options(
    traceback: Annotated[bool, typer.Option("--traceback", envvar="ROBOVLMS_DEBUG",
                                            help="Show the traceback behind an error, not only its one-line message "
                                                 "(also ROBOVLMS_DEBUG=1).")] = False,
) -> None:
    global show_traceback
    show_traceback = traceback


def _tasks(values: list[str]) -> str | list[str]:
    """Values of a repeatable --tasks, each a task set, a task or comma-separated tasks: the one value as given, or
    every task named, in order."""
    tasks = [task for value in values for task in _split_list(value)]
    return tasks[0] if len(tasks) == 1 else tasks


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@data_app.command("generate")
def data_generate(
    out: Annotated[Path, typer.Argument(help="Directory of the episode store to write.")],
    benchmark: Annotated[str, typer.Option(help="Benchmark with scripted experts.")] = "metaworld",
    tasks: Annotated[list[str], typer.Option(help="Task set (demo, mt10, mt50) or comma-separated task names; "
                                                  "repeatable.")] = ["demo"],  # noqa: B006 (typer reads it)
    split: Annotated[str, typer.Option(help="Scene split; demonstrations come from its training scenes.")] = "ABC->D",
    scenes: Annotated[str | None, typer.Option(help="Training scenes to use instead of the split's, e.g. AB.")] = None,
    episodes: Annotated[int, typer.Option(help="Successful demonstrations per task and scene.")] = 20,
    image_size: Annotated[int, typer.Option(help="Square image size, 64 to 224.")] = 64,
    cameras: Annotated[str, typer.Option(help="Comma-separated cameras.")] = "rgb_static,rgb_gripper",
    max_steps: Annotated[int, typer.Option(help="Step limit of an episode.")] = 200,
    workers: Annotated[int, typer.Option(help="Simulator processes.")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store (only once the new one is complete).")] = False,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted run, keeping the episodes it already wrote.")] = False,
    allow_short: Annotated[bool, typer.Option(help="Commit the store even if the expert fell short of --episodes "
                                                   "for some task and scene (recorded in its metadata).")] = False,
) -> None:
    """Run the benchmark's scripted experts and write their successful episodes to an episode store."""
    _check_range("--episodes", episodes, 1, MAX_EPISODES)
    _check_range("--workers", workers, 1, MAX_WORKERS)
    from robovlms.benchmark import create_benchmark
    from robovlms.data.demonstrations import generate_demonstrations

    bench = create_benchmark(benchmark, tasks=_tasks(tasks), image_size=image_size, cameras=_split_list(cameras),
                             max_steps=max_steps)
    store = generate_demonstrations(bench, split, episodes, out, scenes=scenes, workers=workers,
                                    overwrite=overwrite, resume=resume, allow_short=allow_short)
    _print_store(store)


@data_app.command("import-calvin")
def data_import_calvin(
    split: Annotated[Path, typer.Argument(help="A CALVIN dataset folder such as .../task_ABC_D.")],
    out: Annotated[Path, typer.Argument(help="Directory of the episode store to write.")],
    folder: Annotated[str, typer.Option(help="Which part of the split: training or validation.")] = "training",
    image_size: Annotated[int, typer.Option(help="Square size every camera is resized to.")] = 200,
    cameras: Annotated[str, typer.Option(help="Comma-separated cameras.")] = "rgb_static,rgb_gripper",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store (only once the new one is complete).")] = False,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted import, keeping the windows already written.")] = False,
) -> None:
    """Import the language-annotated windows of a CALVIN split into an episode store, one window per episode."""
    from robovlms.data.calvin_import import import_calvin

    _print_store(import_calvin(split, out, folder=folder, image_size=image_size, cameras=_split_list(cameras),
                               overwrite=overwrite, resume=resume))


@data_app.command("import-lerobot")
def data_import_lerobot(
    dataset: Annotated[Path, typer.Argument(help="A local LeRobot dataset folder (codebase v2.0, v2.1 or v3.0).")],
    out: Annotated[Path, typer.Argument(help="Directory of the episode store to write.")],
    spec: Annotated[str, typer.Option(help="How its features become the store's: bridge, fractal or a YAML file.")],
    image_size: Annotated[int, typer.Option(help="Square size every camera is resized to.")] = 224,
    episodes: Annotated[int | None, typer.Option(help="Import only the first K episodes.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store (only once the new one is complete).")] = False,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted import, keeping the episodes already written.")] = False,
) -> None:
    """Import the episodes of a LeRobot dataset into an episode store, mapping its features as a spec says."""
    if episodes is not None:
        _check_range("--episodes", episodes, 1, 100_000_000)
    from robovlms.data.lerobot_import import import_lerobot

    _print_store(import_lerobot(dataset, out, spec=spec, image_size=image_size, episodes=episodes,
                                overwrite=overwrite, resume=resume))


@data_app.command("info")
def data_info(store: Annotated[Path, typer.Argument(help="Episode store directory.")]) -> None:
    """Summarise an episode store: episodes per task and scene, layout, action statistics."""
    from robovlms.data.store import EpisodeStore

    _print_store(EpisodeStore(store))


@data_app.command("verify")
def data_verify(store: Annotated[Path, typer.Argument(help="Episode store directory.")]) -> None:
    """Read every file of an episode store against the checksums recorded when it was written."""
    from robovlms.data.store import verify_store

    checked = verify_store(store, progress=True)
    if checked:
        console.print(f"{store}: intact ({', '.join(checked)} match their checksums)")
    else:
        console.print(f"{store} has no checksums (written before robovlms recorded them): its sizes and episode "
                      f"bounds are consistent, its contents cannot be checked; regenerate or re-import it to add them")


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


@app.command("evaluate")
def evaluate_command(
    policy: Annotated[str | None, typer.Option(help=f"Policy to roll out: {', '.join(POLICIES)}.")] = None,
    run: Annotated[Path | None, typer.Option(help="A trained run directory: roll out its last checkpoint.")] = None,
    store: Annotated[Path | None, typer.Option(help="Training store: benchmark settings and baseline data.")] = None,
    benchmark: Annotated[str, typer.Option(help="Benchmark, when no store is given.")] = "metaworld",
    tasks: Annotated[list[str] | None, typer.Option(help="Tasks to evaluate, comma-separated or repeated "
                                                         "(default: the store's).")] = None,
    split: Annotated[str, typer.Option(help="Which episodes: validation (for choosing settings) or test (for "
                                            "reporting results).")] = "test",
    benchmark_split: Annotated[str | None, typer.Option(help="The benchmark's split: Meta-World, CALVIN scenes such "
                                                             "as ABC->D; SimplerEnv visual_matching or "
                                                             "variant_aggregation. Default: the store's, else the "
                                                             "benchmark's first.")] = None,
    episodes: Annotated[int, typer.Option(help="Evaluation episodes per task (CALVIN: chains).")] = 10,
    shard: Annotated[str | None, typer.Option(help="K/N: only the K-th of N disjoint parts, for N machines.")] = None,
    workers: Annotated[int, typer.Option(help="Simulator processes.")] = 2,
    device: Annotated[str, typer.Option(help="Where a trained run's policy runs: auto, cpu, cuda or cuda:N; this "
                                             "process holds it and serves every simulator worker.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the replay baseline's choice of demonstration.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Directory for records.parquet/.csv and videos.")] = None,
    videos: Annotated[int, typer.Option(help="Episodes per task to save as MP4 (needs --out).")] = 0,
) -> None:
    """Roll out a trained run, a baseline or the scripted expert on a split's validation or test episodes and print
    the benchmark's scores. With --shard K/N each machine runs one part; `robovlms merge-evaluation` joins them."""
    from robovlms.baselines import baseline_factory
    from robovlms.benchmark import EVALUATION_SPLITS, create_benchmark
    from robovlms.errors import ConfigError, UnknownNameError
    from robovlms.rollout import evaluate, parse_shard, shard_specs, write_shard
    from robovlms.data.store import EpisodeStore

    _check_range("--episodes", episodes, 1, MAX_EPISODES)
    _check_range("--workers", workers, 1, MAX_WORKERS)
    _check_range("--videos", videos, 0, MAX_EPISODES)
    if videos and out is None:
        raise ConfigError("--videos needs --out, the directory the videos are written to (under videos/)")
    if (policy is None) == (run is None):
        raise ConfigError("give either --policy (a baseline or expert) or --run (a trained run directory)")
    if policy is not None and policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; valid choices: {', '.join(POLICIES)}")
    if run is not None:
        from robovlms.training import CONFIG_FILE, load_config

        store = store or Path(load_config(run / CONFIG_FILE).store)
    options = {}
    training_store = EpisodeStore(store, verify=True) if store is not None else None
    if training_store is not None:
        # a store made for no benchmark in particular (an imported dataset) is evaluated on --benchmark
        benchmark = training_store.metadata.get("benchmark", benchmark)
        options = dict(training_store.metadata.get("benchmark_options", {}))
    if tasks:
        options["tasks"] = _tasks(tasks)
    bench = create_benchmark(benchmark, **options)
    if training_store is not None:
        layout = training_store.layout
        bench.check_frames(layout.cameras, layout.image_size, layout.action_dim, f"the store {store}")
    if split not in EVALUATION_SPLITS:
        if split in bench.splits():
            raise ConfigError(f"--split takes validation or test (which episodes of the split); {split!r} is a split "
                              f"of {bench.name}: give it as --benchmark-split '{split}'")
        raise UnknownNameError("evaluation split (--split)", split, EVALUATION_SPLITS)
    stored_split = training_store.metadata.get("split") if training_store is not None else None
    benchmark_split = benchmark_split or (stored_split if stored_split in bench.splits() else bench.splits()[0])
    if benchmark_split not in bench.splits():
        raise UnknownNameError(f"{bench.name} split (--benchmark-split)", benchmark_split, bench.splits())
    specs = bench.split_episodes(benchmark_split, split, episodes)
    bench.check_available()
    if run is not None:
        from robovlms.policy import load_batched_policy, policy_digest

        factory = load_batched_policy(run, device=device)
    elif policy == "expert":
        factory = bench.scripted_expert()
    else:
        factory = baseline_factory(policy, bench, store, seed)
    part = parse_shard(shard) if shard else (1, 1)
    total = len(specs)
    specs = shard_specs(specs, *part)
    records = evaluate(bench, factory, specs, workers=workers,
                       video_dir=(out / "videos") if out and videos else None, videos_per_task=videos)
    if out is not None:
        write_shard(out, records, {"benchmark": bench.name, "benchmark_options": bench.options(),
                                   "split": benchmark_split, "evaluation_split": split, "episodes": total,
                                   "policy": policy_digest(run) if run else policy,
                                   "policy_paths": [str(run.resolve())] if run else [], "shard": list(part)})
    _print_scores(f"{run or policy} on {bench.name} {benchmark_split}, {split} episodes"
                  + (f", shard {part[0]}/{part[1]}" if shard else ""), bench, records)


@app.command("serve")
def serve_command(
    run_dir: Annotated[Path, typer.Argument(help="A trained run directory (robovlms train's run_dir).")],
    port: Annotated[int, typer.Option(help="TCP port (0: any free one, printed).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 for this machine only.")] = "0.0.0.0",
    device: Annotated[str, typer.Option(help="Where the policy runs: auto, cpu, cuda or cuda:N.")] = "auto",
    execution: Annotated[str | None, typer.Option(help="first, ensemble or chunk (default: the run's).")] = None,
    checkpoint: Annotated[str | None, typer.Option(help="A checkpoint file of the run (default: last.ckpt).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Side the images are resized to (default: the run's store's "
                                                        "when it is here, else the backbone's).")] = None,
    max_message_mb: Annotated[float, typer.Option(help="Largest observation message accepted, in MiB.")] = 32,
) -> None:
    """Serve a trained run's policy to robots over a websocket, one connection per robot: msgpack observations
    (images, state, instruction) in, action chunks out; openpi's conventions (docs/evaluation.md)."""
    from robovlms.policy import load_batched_policy, observation_layout, policy_digest
    from robovlms.serving.websocket_server import WebsocketPolicyServer

    if max_message_mb <= 0:
        raise RobovlmsError(f"--max-message-mb must be positive, got {max_message_mb}")
    policy = load_batched_policy(run_dir, execution, checkpoint, device)
    store_image_size, state_dim, where = observation_layout(run_dir, policy)
    server = WebsocketPolicyServer(policy, image_size or store_image_size, state_dim, host, port,
                                   int(max_message_mb * 2 ** 20),
                                   metadata={"policy": policy_digest(run_dir, checkpoint), "run_dir": str(run_dir)})
    threading.Thread(target=_announce, args=(server, run_dir, policy, where if image_size is None else "--image-size"),
                     daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped")


def _announce(server, run_dir: Path, policy, image_size_from: str) -> None:
    server.wait_until_serving()
    dtype = next(policy.formulation.parameters()).dtype
    console.print(f"serving {run_dir} on ws://{server.host}:{server.port} ({policy.device}, {dtype}, execution "
                  f"{policy.execution}; images resized to {server.image_size} px, from {image_size_from}); "
                  f"Ctrl-C stops", highlight=False, soft_wrap=True)


@app.command("merge-evaluation")
def merge_evaluation_command(
    shards: Annotated[list[Path], typer.Argument(help="The --out directories of every shard of one evaluation.")],
    out: Annotated[Path, typer.Option(help="Directory for the merged records.parquet/.csv.")],
) -> None:
    """Join the shards of one evaluation (checked complete and disjoint) and print its scores, exactly as one
    machine running every episode would."""
    from robovlms.benchmark import create_benchmark
    from robovlms.records import records_from_frame
    from robovlms.rollout import merge_shards, write_shard

    evaluation, frame = merge_shards(shards)
    bench = create_benchmark(evaluation["benchmark"], **evaluation["benchmark_options"])
    records = records_from_frame(frame)
    write_shard(out, records, {**evaluation, "shard": [1, 1]})
    policy = ", ".join(evaluation["policy_paths"]) or evaluation["policy"]
    _print_scores(f"{policy} on {bench.name} {evaluation['split']}, "
                  f"{evaluation.get('evaluation_split', 'test')} episodes", bench, records)


def _print_scores(title: str, bench, records) -> None:
    from robovlms.records import records_frame

    frame = records_frame(records)
    console.print(f"{title}: {len(records)} episodes", highlight=False)  # in full: a table title is cut to its width
    table = Table()
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


@app.command("pretrain")
def pretrain_command(
    settings: Annotated[Path | None, typer.Argument(help="Pre-training settings YAML (docs/pretraining.md); "
                                                         "the options below override it.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone to pre-train (default kosmos2).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimiser steps (default 2000).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the initial weights and of the batches.")] = None,
    root: Annotated[Path, typer.Option(help="Where pre-trained backbones and their frames are kept, one "
                                            "directory per settings' content.")] = Path("data/pretrained"),
    workers: Annotated[int, typer.Option(help="Processes rendering the frames.")] = 2,
    examples: Annotated[Path | None, typer.Option(help="Only write a figure of example views and their texts "
                                                       "(PNG) to this file, and pre-train nothing.")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Pre-train a backbone with its own language-modelling loss on frames and texts made from Meta-World's
    simulator; a second run with the same settings finds it done, an interrupted one resumes."""
    from robovlms.pretraining import load_pretraining_config, pretrain, pretrained_path, pretraining_record

    raw = load_pretraining_config(settings).model_dump(mode="json") if settings else {}
    if backbone is not None:
        raw["backbone"] = {"name": backbone}
    overrides = {"max_steps": steps, "seed": seed}
    config = load_pretraining_config({**raw, **{key: value for key, value in overrides.items() if value is not None}})
    if examples is not None:
        from robovlms.pretraining.examples import examples_figure

        examples_figure(config, root, examples, workers=workers, progress=progress)
        console.print(f"examples: {examples}")
        return
    found = pretraining_record(pretrained_path(config, root)) is not None
    out = pretrain(config, root, workers=workers, progress=progress)
    record = pretraining_record(out)
    done = ("found done with these settings" if found else
            f"pre-trained in {record['seconds'] / 60:.1f} min, {record['cpu_seconds'] / 60:.1f} CPU min")
    console.print(f"{record['backbone'].split(' (')[0]}: {out} ({done}; {record['steps']} steps, final loss "
                  f"{record['final_train_loss']:.3f})")
    console.print(f"train from it with  backbone: {{name: {config.backbone.name}, size: pretrained, path: {out}}}",
                  highlight=False)


def _progress_printer(run_dir: Path, retried: set[str]):
    """How a sweep shows progress: on a terminal, a rich bar over its cells (done, running, waiting, failed) or a
    search's trials (also pruned); otherwise (`make demo > log`) one line per cell as it is committed."""
    if not console.is_terminal:
        return (lambda: None), _line_per_cell(run_dir, retried)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console)
    task = bar.add_task("cells", total=None)

    def update(status) -> None:
        bar.start()  # on the first report, once the sweep file is validated and its cells queued
        pruned = f", {status.pruned} pruned" if status.unit == "trials" else ""
        bar.update(task, total=status.cells, completed=status.done + status.failed + status.pruned,
                   description=f"{status.unit}: {status.done} done{pruned}, {status.running} running, "
                               f"{status.waiting} waiting, {status.failed} failed")

    return bar.stop, update


def _line_per_cell(run_dir: Path, retried: set[str]):
    from robovlms.results import read_cell_results

    printed = {result.cell_id: result.trial for result in read_cell_results(run_dir)}  # cell -> its printed trial
    committed_before = len(printed.keys() - retried)
    header_printed = False
    last_counts = None
    started = time.monotonic()

    def update(status) -> None:
        nonlocal header_printed, last_counts
        if not header_printed:
            header_printed = True
            print(f"{status.cells} {status.unit}: {committed_before} committed before, "
                  f"{status.cells - committed_before} to run", flush=True)
        counts = (status.done, status.failed, status.pruned, status.running, status.waiting)
        if counts == last_counts:
            return  # nothing started or committed since the last report: no need to read the cells again
        last_counts = counts
        left = status.cells - status.done - status.failed - status.pruned
        for result in read_cell_results(run_dir):
            if result.cell_id in printed and printed[result.cell_id] == result.trial:
                continue  # printed, or committed before this run (a retried cell is committed again by a new trial)
            printed[result.cell_id] = result.trial
            outcome = _cell_outcome(result)
            cost = ", ".join(f"{what} {seconds:.0f} s" for what, seconds in (("train", result.train_seconds),
                                                                             ("eval", result.eval_seconds)) if seconds)
            print(f"[{(time.monotonic() - started) / 60:.1f} min] {result.cell_id}: {outcome}"
                  + (f", {cost}" if cost else "") + f"; {left} {status.unit} left", flush=True)

    return update


def _cell_outcome(result) -> str:
    if result.status == "complete" and result.kind == "pretraining":
        return f"pre-trained, final loss {result.final_train_loss:.3f} ({result.checkpoint})"
    if result.status == "complete":
        return f"success {result.successes}/{result.episodes} ({result.success:.0%})"
    return f"{result.status}: {(result.error or '').splitlines()[0][:100]}"


def _run_sweep_command(file: Path, workers: int, storage: str | None, retry_failed: bool, mode: str) -> None:
    from robovlms.results import read_cell_results
    from robovlms.sweep import load_sweep, run_sweep

    run_dir = Path(load_sweep(file).run_dir)
    retried = {result.cell_id for result in read_cell_results(run_dir) if retry_failed and result.status == "failed"}
    stop, update = _progress_printer(run_dir, retried)
    try:
        status = run_sweep(file, workers=workers, storage=storage, retry_failed=retry_failed, mode=mode,
                           progress=update, notice=lambda line: console.print(line, highlight=False))
    finally:
        stop()
    if console.is_terminal:  # without a terminal, each retried cell's line was printed as it was committed
        for result in read_cell_results(run_dir):
            if result.cell_id in retried:
                console.print(f"retried {result.cell_id}: {_cell_outcome(result)}", highlight=False)
    pruned = f", {status.pruned} pruned" if status.unit == "trials" else ""
    console.print(f"{status.done} of {status.cells} {status.unit} done{pruned}, {status.failed} failed; results in "
                  f"the run directory's results/ (make a report with `robovlms report RUN_DIR`)")
    if status.failed and mode == "grid" and not retry_failed:
        console.print(f"the failed cells' errors are in {run_dir}/cells/CELL/error.txt; `robovlms sweep {file} "
                      f"--retry-failed` runs them again", highlight=False)
    if status.failed:
        sys.exit(1)


@app.command("sweep")
def sweep_command(
    file: Annotated[Path, typer.Argument(help="Sweep file (experiments/*.yaml).")],
    workers: Annotated[int, typer.Option(help="Cells run at once on this machine.")] = 1,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default: SQLite in the run directory; "
                                                     "postgresql://... for many machines).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the cells and an estimate of their cost; run nothing.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="Run again the cells that failed with an error.")] = False,
    gpu_memory: Annotated[float, typer.Option(help="With --dry-run: the memory of one GPU, in GiB, that each "
                                                   "cell's estimate is checked against.", min=1.0)] = 80.0,
) -> None:
    """Train, evaluate and record every cell of a sweep grid; re-running resumes where it stopped."""
    _check_range("--workers", workers, 1, MAX_WORKERS)
    if dry_run:
        _print_dry_run(file, workers, gpu_memory)
        return
    _run_sweep_command(file, workers, storage, retry_failed, "grid")


def _print_dry_run(file: Path, workers: int, gpu_memory: float) -> None:
    """`robovlms sweep FILE --dry-run`: per cell its parameters, memory per device, where it runs and, for cells
    that train on this machine's CPU, its time; then what was assumed (docs/sweeps.md, "The dry run")."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from robovlms.results import CELLS_DIR, read_cell_result
    from robovlms.sweep import dry_run, expand_cells, load_sweep
    from robovlms.training.memory import GIB, format_bytes

    sweep = load_sweep(file)
    cells = expand_cells(sweep)
    with Progress(TextColumn("dry run"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  console=console, transient=True) as bar:
        task = bar.add_task("", total=len(cells))
        estimate = dry_run(sweep, cells, workers, progress=lambda done, total, what: bar.update(
            task, completed=done, description=what[:40]))
    from rich import box

    rows = estimate.cells
    trained = [cost for cost in rows if cost.cell.kind == "trained"]
    varying = [column for column, attribute in (("data", "fraction"), ("seed", "seed"))
               if len({getattr(cost, attribute) for cost in trained}) > 1]

    def short_id(cost) -> str:  # a cell id ends with the digest of its settings, which the other columns spell out
        return cost.cell.cell_id.rsplit("-", 1)[-1] if cost.cell.kind == "trained" else cost.cell.cell_id

    cells_table = Table(title=f"sweep {sweep.name}: {len(rows)} cells", box=box.SIMPLE_HEAD, padding=(0, 1),
                        pad_edge=False, collapse_padding=True)
    for column in ("id", "backbone", "formulation", "H", "L", *varying, "params", "trainable"):
        cells_table.add_column(column, justify="right" if column in ("H", "L", "params", "trainable") else "left",
                               no_wrap=column not in ("backbone", "formulation"), overflow="fold",
                               min_width=19 if column == "formulation" else None)
    for cost in trained:
        name, size = cost.backbone.split(" ", 1)
        backbone = name if size == "(pretrained)" else f"{name} (tiny)"
        if cost.cell.needs is not None:
            backbone = f"{name} (tiny, pre-trained)"
        cells_table.add_row(short_id(cost), backbone, cost.formulation, str(cost.history),
                            str(cost.chunk), *(str(cost.fraction if column == "data" else cost.seed)
                                               for column in varying),
                            _count(cost.parameters), _count(cost.trainable))
    console.print(cells_table)
    costs_table = Table(title=f"per device: the memory of a training step, whether it fits one {gpu_memory:g} GiB "
                              f"GPU, the time on this machine", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False,
                        collapse_padding=True)
    for column in ("id", "runs on", "memory", "w/ ckpt", "fits", "train", "eval ≤"):
        costs_table.add_column(column, justify="left" if column in ("id", "runs on", "fits") else "right",
                               no_wrap=True)
    for cost in rows:
        memory = cost.memory
        on_gpu = not cost.runs_on.startswith("cpu")
        train = (f"{cost.train_s:.0f} s" if cost.train_s is not None else "" if cost.cell.kind == "baseline"
                 else "on GPU" if on_gpu else "no")
        evaluation = f"{cost.eval_max_s:.0f} s" if cost.timed or cost.cell.kind == "baseline" else ""
        costs_table.add_row(short_id(cost), cost.runs_on, format_bytes(memory.total()) if memory else "",
                            format_bytes(memory.total(True)) if memory else "",
                            _fits(memory, gpu_memory * GIB) if memory and on_gpu else "", train, evaluation)
    console.print(costs_table)
    _print_dry_run_notes(sweep, estimate, workers)
    results = [read_cell_result(Path(sweep.run_dir) / CELLS_DIR / cell.cell_id) for cell in cells]
    done = sum(result is not None and result.status == "complete" for result in results)
    if done:
        console.print(f"{done} of {len(cells)} cells are done in {sweep.run_dir}"
                      + (": the sweep is finished" if done == len(cells) else "; running it takes the rest"))


def _count(value: int | None) -> str:
    if value is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _fits(memory, capacity: float) -> str:
    """Whether a cell's estimate fits one device of `capacity` bytes, leaving 10% for the CUDA context and the
    allocator: as it is, with gradient checkpointing, or not."""
    if memory.total() is None:
        return "?"
    if memory.total() <= 0.9 * capacity:
        return "yes"
    if memory.total(True) <= 0.9 * capacity:
        return "ckpt"
    return "no"


def _print_dry_run_notes(sweep, estimate, workers: int) -> None:
    from collections import Counter

    rows = estimate.cells
    sources = {}
    for cost in rows:
        if cost.missing_path:
            sources[(cost.missing_path, cost.backbone)] = cost.source
    if sources:
        console.print("not on this machine, so sized as the published model (weights are never loaded):")
        for (path, backbone), source in sources.items():
            console.print(f"  {path} ({backbone.split()[0]}): {source}", highlight=False)
    notes = Counter(note for cost in rows for note in cost.notes)
    for note, count in notes.items():
        console.print(f"{count} cell(s): {note}", highlight=False)
    console.print("tiny: randomly initialised, sized by its options; memory: weights, gradients, AdamW state, the "
                  "activations of one micro-batch and the batch; "
                  "w/ ckpt: the same with gradient checkpointing; fits: with 10% left for the CUDA context, as it "
                  "is (yes), only with gradient checkpointing (ckpt) or not (no); docs/sweeps.md, 'The dry run'",
                  highlight=False)
    gpu_cells = [cost for cost in rows if cost.cell.kind == "trained" and not cost.timed]
    if gpu_cells:
        console.print(f"{len(gpu_cells)} cell(s) are meant for GPUs or pretrained weights and not timed here: "
                      f"measure their time where they run (`robovlms train` of one cell's settings with max_steps: "
                      f"20 on its machine)", highlight=False)
    total = estimate.total_seconds(workers)
    timed = sum(cost.timed for cost in rows)
    if total is not None and timed:
        startup = f"{estimate.startup_s:.0f} s" if estimate.startup_s is not None else "unknown"
        console.print(f"about {total / 60:.1f} min with {workers} worker(s) for the {timed} timed cell(s) and the "
                      f"baselines: steps timed on {estimate.threads} thread(s) per worker, a worker's start-up "
                      f"({startup}) once, evaluation at its upper bound", highlight=False)
    elif total is not None:
        console.print(f"the baselines: at most {total / 60:.1f} min of evaluation with {workers} worker(s)",
                      highlight=False)


@app.command("tune")
def tune_command(
    file: Annotated[Path, typer.Argument(help="Sweep file with a `search:` section.")],
    workers: Annotated[int, typer.Option(help="Trials run at once on this machine.")] = 1,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default: SQLite in the run directory).")] = None,
) -> None:
    """Search hyper-parameters with Optuna's TPE sampler, pruning on the validation loss; records the best trial.
    Trials are evaluated on the split's validation episodes, never its test episodes unless the sweep file names them
    (evaluation: {split: test})."""
    _check_range("--workers", workers, 1, MAX_WORKERS)
    _run_sweep_command(file, workers, storage, False, "search")


@app.command("worker")
def worker_command(
    storage: Annotated[str, typer.Option(help="The sweep's Optuna storage URL.")],
    study: Annotated[str, typer.Option(help="The sweep's name (its study).")],
    run_dir: Annotated[Path | None, typer.Option(help="Where this worker writes cells (default: the sweep's).")] = None,
    wait: Annotated[bool, typer.Option(help="Stay until no other worker holds a cell.")] = False,
    workers: Annotated[int, typer.Option(help="Worker processes on this machine, each with its own GPUs.")] = 1,
) -> None:
    """Join a running sweep from any machine: take waiting cells until none is left."""
    from robovlms.errors import ConfigError
    from robovlms.sweep import join_study, work
    from robovlms.sweep.study import ledger_errors
    from robovlms.sweep.gpus import assign_gpus, cell_devices, describe_worker_gpus
    from robovlms.training.launch import SWEEP_VARIABLE, die_with_launcher

    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if SWEEP_VARIABLE in os.environ:  # started by `robovlms sweep --workers`: dies with it, as its cells' ranks do
        die_with_launcher(SWEEP_VARIABLE)
    study_, sweep, cells, mode = join_study(storage, study)
    run_dir = run_dir or Path(sweep.run_dir)
    if workers > 1:
        from robovlms.sweep.run import run_worker_processes

        gpus = assign_gpus(cell_devices(sweep, mode), workers)
        run_worker_processes(study, storage, workers, run_dir, gpus, lambda: None, console.print)
        return
    console.print(describe_worker_gpus())
    with ledger_errors(storage):
        work(study_, sweep, cells, run_dir, mode, wait=wait)


CHECK_HELP = "Import each plugin and check it against its interface (seconds: imports the model libraries)."


def _print_listing(registry: Registry, rows: list[dict], table=None) -> None:
    """A listing's table; exits with 1 when a plugin failed."""
    console.print(table if table is not None else registry.table(rows))
    if any(row["failed"] for row in rows):
        sys.exit(1)


@app.command("backbones")
def backbones_command(
    parameters: Annotated[bool, typer.Option(help="Also build each tiny size to count its parameters (slower).")] = False,
    check: Annotated[bool, typer.Option(help=CHECK_HELP)] = False,
) -> None:
    """List the registered backbones (built-in and from plugins): description, entry point, package and version,
    read from package metadata and source. A plugin found broken gets a row naming its error, and the command
    exits with 1; --check finds every way a plugin can fail to load."""
    if parameters:
        from robovlms.backbone import backbones_table, list_backbones

        rows = list_backbones(parameters)
        _print_listing(BACKBONES, rows, backbones_table(rows))
    else:
        _print_listing(BACKBONES, BACKBONES.listing(check))


@app.command("formulations")
def formulations_command(check: Annotated[bool, typer.Option(help=CHECK_HELP)] = False) -> None:
    """List the registered formulations, like `robovlms backbones` (see docs/adding-a-formulation.md)."""
    _print_listing(FORMULATIONS, FORMULATIONS.listing(check))


@app.command("benchmarks")
def benchmarks_command(check: Annotated[bool, typer.Option(help=CHECK_HELP)] = False) -> None:
    """List the registered benchmarks, like `robovlms backbones`."""
    _print_listing(BENCHMARKS, BENCHMARKS.listing(check))


def _key_values(option: list[str] | None) -> dict:
    """--option KEY=VALUE items, each value read as YAML."""
    import yaml

    from robovlms.errors import ConfigError

    options = {}
    for item in option or []:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ConfigError(f"--option {item!r} is not KEY=VALUE, e.g. --option hidden_size=32")
        options[key] = yaml.safe_load(value)
    return options


@app.command("check-backbone")
def check_backbone_command(
    name: Annotated[str, typer.Argument(help="A registered backbone (see `robovlms backbones`).")],
    option: Annotated[list[str] | None, typer.Option(help="An option of its tiny size as KEY=VALUE (the value read "
                                                          "as YAML), e.g. --option hidden_size=32; repeatable.")] = None,
) -> None:
    """Run the backbone conformance kit (robovlms.testing) on a tiny NAME: causality of the suffix and of
    interleaved frames, batch independence, save / load, freeze modes and LoRA, action tokens, image settings and
    agreement with the wrapped model's own forward. One line per check; exits with 1 when one fails."""
    from robovlms.testing import check_backbone

    options = _key_values(option)
    results = check_backbone(name, **options)
    table = Table(title=f"conformance of backbone {name}" + "".join(f" {k}={v}" for k, v in options.items()))
    for column in ("check", "result", "reason"):
        table.add_column(column)
    colours = {"pass": "green", "fail": "red", "skip": "yellow"}
    for result in results:
        table.add_row(result.check, f"[{colours[result.status]}]{result.status}[/]", result.reason)
    console.print(table)
    if not all(result.passed for result in results):
        sys.exit(1)


@app.command("check-formulation")
def check_formulation_command(
    name: Annotated[str, typer.Argument(help="A registered formulation (see `robovlms formulations`).")],
    backbone: Annotated[list[str] | None, typer.Option(help="Check on this backbone only (repeatable; default: every "
                                                            "built-in one).")] = None,
    option: Annotated[list[str] | None, typer.Option(help="One of its options, or history, chunk, use_state, "
                                                          "state_input, as KEY=VALUE (the value read as YAML), e.g. "
                                                          "--option head_width=32; repeatable.")] = None,
) -> None:
    """Run the formulation conformance kit (robovlms.testing) on NAME over tiny built-in backbones: loss and its
    gradients, predict, act, encoding frames one at a time as rollouts do, batching, another device (meta tensors),
    seeding, and rebuilding from its state dict. A table of checks by backbone, then each failure's reason; exits
    with 1 when one fails."""
    from robovlms.testing import check_formulation

    options = _key_values(option)
    results = check_formulation(name, backbone, **options)
    table = Table(title=f"conformance of formulation {name}" + "".join(f" {k}={v}" for k, v in options.items()))
    table.add_column("check")
    for backbone_name in results:
        table.add_column(backbone_name)
    colours = {"pass": "green", "fail": "red", "skip": "yellow"}
    checks = [result.check for result in next(iter(results.values()))]
    for index, check in enumerate(checks):
        table.add_row(check, *(f"[{colours[rows[index].status]}]{rows[index].status}[/]" for rows in results.values()))
    console.print(table)
    failures = [(backbone_name, result) for backbone_name, rows in results.items() for result in rows
                if not result.passed]
    for backbone_name, result in failures:
        console.print(f"[red]{backbone_name} / {result.check}:[/red] {result.reason}", highlight=False)
    if failures:
        sys.exit(1)


@app.command("doctor")
def doctor_command(
    names: Annotated[list[str] | None, typer.Argument(help="Benchmarks to check (default: every registered one).")]
    = None,
    time_limit: Annotated[float, typer.Option(help="Seconds a simulator may take to start, reset and take one step "
                                                   "before it counts as hanging.")] = 600,
) -> None:
    """Per benchmark: where its simulator runs (this process, or the interpreter of its own environment named by
    the benchmark's python option or ROBOVLMS_<NAME>_PYTHON), which of the modules it needs are found there, and
    whether it runs: it is started, reset to an evaluation episode and stepped once, within the time limit. Says
    what to install or what failed; exits with 1 unless every benchmark checked is ready."""
    from robovlms.benchmark import BENCHMARKS
    from robovlms.doctor import diagnose

    for name in names or []:
        BENCHMARKS.get(name)  # an unknown name lists the valid ones
    table = Table(title="benchmarks")
    for column in ("benchmark", "status", "runs in", "modules", "reset and one step"):
        table.add_column(column)
    diagnoses = [diagnose(name, time_limit) for name in names or BENCHMARKS.names()]
    for found in diagnoses:
        status = "[green]ready[/green]" if found.ready else f"[red]{found.status}[/red]"
        modules = "\n".join(f"{module}: {path or '[red]missing[/red]'}" for module, path in found.modules.items())
        tried = (f"{found.seconds:.0f} s" if found.ready else
                 "not tried" if found.status == "missing" else "[red]failed[/red] (below)")
        table.add_row(found.benchmark, status, found.runs_in, modules or "installed with robovlms", tried)
    console.print(table)
    for found in diagnoses:
        if not found.ready:
            console.print(f"\n[bold]{found.benchmark}[/bold]: {escape(found.problem)}", highlight=False)
    if not all(found.ready for found in diagnoses):
        sys.exit(1)


@app.command("report")
def report_command(
    run_dirs: Annotated[list[Path], typer.Argument(help="Sweep run directories, all of one benchmark, split and "
                                                        "evaluation split.")],
    out: Annotated[Path, typer.Option(help="Report directory, e.g. reports/NAME.")],
    real_world: Annotated[Path | None, typer.Option(help="Real-world success rates (.yaml: "
                                                         "configuration -> task -> rate; .csv: a `configuration` "
                                                         "column and one column per task) for the sim-to-real "
                                                         "agreement.")] = None,
) -> None:
    """Compare the cells of sweeps: success with 95% Wilson intervals, paired comparisons (main effects, against
    the baselines) with Holm-adjusted verdicts, per task and scene, data efficiency, cost, training curves, failed
    cells, each table saying which episodes (validation or test) it comes from; writes index.md, a self-contained
    index.html, CSV tables and plots."""
    from robovlms.report import write_report

    index = write_report(run_dirs, out, real_world)
    console.print(f"report: {index} (and {index.with_suffix('.md')}, CSV tables and plots in {out})")


def main() -> None:
    try:
        app()
    except RobovlmsError as error:
        if show_traceback:
            import traceback

            traceback.print_exception(error)
        # one line however wide (a log is not a terminal); messages may hold [brackets]
        console.print(f"[red]error:[/red] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
