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
    assert json.loads((tmp_path / "eval" / "shard.json").read_text())["policy"] == str(run_dir.resolve())
    result = CliRunner().invoke(app, ["evaluate", "--run", str(run_dir), "--policy", "zero"])
    assert isinstance(result.exception, ConfigError) and "either --policy" in str(result.exception)
