"""One evaluation split over machines (`robovlms evaluate --shard K/N`) and joined (`robovlms merge-evaluation`):
the merged records and scores are exactly those of one machine running every episode."""

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from robovlms.cli import app
from robovlms.errors import ConfigError
from robovlms.rollout import merge_shards

EVALUATION = ["evaluate", "--policy", "zero", "--tasks", "button-press-topdown,door-open", "--episodes", "3",
              "--workers", "1"]


def run(*args):
    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_shards_merge_into_exactly_the_single_machine_evaluation(tmp_path):
    run(*EVALUATION, "--out", tmp_path / "whole")
    for k in (1, 2, 3):
        run(*EVALUATION, "--shard", f"{k}/3", "--out", tmp_path / f"shard{k}")
    output = run("merge-evaluation", tmp_path / "shard2", tmp_path / "shard3", tmp_path / "shard1",
                 "--out", tmp_path / "merged")
    assert "6 episodes" in output
    whole, merged = (pd.read_parquet(tmp_path / name / "records.parquet").sort_values(["seed", "task"], ignore_index=True)
                     for name in ("whole", "merged"))
    columns = [column for column in whole.columns if column != "seconds"]
    pd.testing.assert_frame_equal(whole[columns], merged[columns])
    assert json.loads((tmp_path / "shard2" / "shard.json").read_text())["shard"] == [2, 3]

    with pytest.raises(ConfigError, match=r"shards \[1, 3\] of 3"):
        merge_shards([tmp_path / "shard1", tmp_path / "shard3"])
    with pytest.raises(ConfigError, match="exactly once"):
        merge_shards([tmp_path / "shard1", tmp_path / "shard1", tmp_path / "shard3"])
    other = json.loads((tmp_path / "shard3" / "shard.json").read_text())
    (tmp_path / "shard3" / "shard.json").write_text(json.dumps({**other, "split": "D->D"}))
    with pytest.raises(ConfigError, match="another evaluation"):
        merge_shards([tmp_path / "shard1", tmp_path / "shard2", tmp_path / "shard3"])


def test_a_malformed_shard_is_refused():
    from robovlms.rollout import parse_shard

    assert parse_shard("2/8") == (2, 8)
    for bad in ("0/3", "4/3", "two", "1/2/3"):
        with pytest.raises(ConfigError, match="shard"):
            parse_shard(bad)


@pytest.mark.slow
def test_a_trained_run_is_evaluated_from_its_directory_with_its_store(tmp_path, demo_store):
    from robovlms.training import train

    run_dir = train({"store": str(demo_store.path), "run_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4,
                     "chunk": 4, "execution": "chunk", "checkpoint_every": 2, "log_every": 1,
                     "backbone": {"options": {"hidden_size": 32, "layers": 1}}}, progress=False)
    output = run("evaluate", "--run", run_dir, "--episodes", "1", "--workers", "1", "--out", tmp_path / "eval")
    records = pd.read_parquet(tmp_path / "eval" / "records.parquet")
    assert sorted(records.task) == ["button-press-topdown", "door-open"] and "2 episodes" in output
    assert json.loads((tmp_path / "eval" / "shard.json").read_text())["policy_paths"] == [str(run_dir.resolve())]
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run_dir), "--policy", "zero"])
    assert isinstance(result.exception, ConfigError) and "either --policy" in str(result.exception)


def write_zero_shard(out, shard, policy="zero", policy_paths=()):
    from robovlms.benchmark import EpisodeRecord
    from robovlms.rollout import write_shard

    records = [EpisodeRecord(task="door-open", scene="D", instruction="open the door", seed=shard[0], success=False,
                             steps=10, seconds=0.1)]
    write_shard(out, records, {"benchmark": "metaworld", "benchmark_options": {}, "split": "ABC->D",
                               "evaluation_split": "test", "episodes": 2, "policy": policy,
                               "policy_paths": list(policy_paths), "shard": list(shard)})
    return out


def test_a_shard_and_a_whole_evaluation_are_refused_saying_which_is_which(tmp_path):
    part = write_zero_shard(tmp_path / "part", (1, 2))
    whole = write_zero_shard(tmp_path / "whole", (1, 1))
    with pytest.raises(ConfigError, match=f"{part} is 1 of 2, {whole} is 1 of 1"):
        merge_shards([part, whole])


def test_shards_of_one_policy_read_from_two_paths_merge_and_keep_both_paths(tmp_path):
    first = write_zero_shard(tmp_path / "first", (1, 2), "sha256:abc", ["/machine-a/runs/demo"])
    second = write_zero_shard(tmp_path / "second", (2, 2), "sha256:abc", ["/machine-b/demo"])
    evaluation, records = merge_shards([first, second])
    assert evaluation["policy_paths"] == ["/machine-a/runs/demo", "/machine-b/demo"] and len(records) == 2


@pytest.mark.slow
def test_shards_evaluated_from_copies_of_a_run_at_two_paths_merge(tmp_path, demo_store):
    import shutil

    from robovlms.policy import policy_digest
    from robovlms.training import train

    run_dir = train({"store": str(demo_store.path), "run_dir": str(tmp_path / "a" / "run"), "max_steps": 2,
                     "batch_size": 4, "chunk": 4, "execution": "chunk", "checkpoint_every": 2, "log_every": 1,
                     "backbone": {"options": {"hidden_size": 32, "layers": 1}}}, progress=False)
    copy = shutil.copytree(run_dir, tmp_path / "b" / "copied-run")
    for k, path in ((1, run_dir), (2, copy)):
        run("evaluate", "--run", path, "--episodes", "1", "--workers", "1", "--shard", f"{k}/2",
            "--out", tmp_path / f"shard{k}")
    output = run("merge-evaluation", tmp_path / "shard1", tmp_path / "shard2", "--out", tmp_path / "merged")
    assert "2 episodes" in output
    merged = json.loads((tmp_path / "merged" / "shard.json").read_text())
    assert merged["policy"].startswith("sha256:")
    assert merged["policy_paths"] == [str(run_dir.resolve()), str(copy.resolve())]
    (copy / "checkpoints" / "last.ckpt").write_bytes(b"other weights")
    assert policy_digest(copy) != policy_digest(run_dir)


@pytest.mark.slow
def test_evaluate_split_validation_runs_the_validation_episodes_and_says_so(tmp_path):
    output = run("evaluate", "--policy", "zero", "--tasks", "button-press-topdown", "--episodes", "2", "--workers", "1",
                 "--split", "validation", "--out", tmp_path / "validation")
    records = pd.read_parquet(tmp_path / "validation" / "records.parquet")
    assert set(records.scene) == {"E"} and records.seed.min() >= 2_000_000
    assert "ABC->D, validation episodes" in output
    shard = json.loads((tmp_path / "validation" / "shard.json").read_text())
    assert (shard["split"], shard["evaluation_split"]) == ("ABC->D", "validation")


def test_a_benchmark_split_given_as_split_is_refused_naming_the_option_it_belongs_to():
    result = CliRunner().invoke(app, [*EVALUATION, "--split", "ABC->D"])
    assert isinstance(result.exception, ConfigError)
    assert "--split takes validation or test" in str(result.exception)
    assert "--benchmark-split 'ABC->D'" in str(result.exception)


def test_an_unknown_evaluation_split_lists_validation_and_test():
    from robovlms.errors import UnknownNameError

    result = CliRunner().invoke(app, [*EVALUATION, "--split", "dev"])
    assert isinstance(result.exception, UnknownNameError)
    assert "valid choices: test, validation" in str(result.exception)


def test_shards_of_the_validation_and_the_test_episodes_are_not_merged(tmp_path):
    first = write_zero_shard(tmp_path / "first", (1, 2))
    second = write_zero_shard(tmp_path / "second", (2, 2))
    description = json.loads((second / "shard.json").read_text())
    (second / "shard.json").write_text(json.dumps({**description, "evaluation_split": "validation"}))
    with pytest.raises(ConfigError, match="another evaluation"):
        merge_shards([first, second])
