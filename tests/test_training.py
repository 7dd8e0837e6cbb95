"""Training through Lightning: run directories, resuming, divergence, bad input, and a short real training."""

import json
import os
import shutil
from contextlib import nullcontext

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from synthetic_store import write_synthetic_store

from robovlms.errors import ConfigError, StoreError, UnknownNameError, WindowError
from robovlms.policy import load_policy
from robovlms.training import (CheckpointError, FormulationModule, TrainingDivergedError, load_config,
                               load_formulation, train, training_seconds)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("synthetic") / "store")


def config(store, run_dir, **overrides):
    settings = {"store": str(store.path), "run_dir": str(run_dir), "formulation": {"name": "one-step-continuous"},
                "chunk": 2, "batch_size": 8, "max_steps": 6, "checkpoint_every": 3, "log_every": 1}
    return {**settings, **overrides}


def logged(run_dir):
    frames = [pd.read_csv(path) for path in sorted(run_dir.glob("logs/version_*/metrics.csv"))]
    return pd.concat(frames).dropna(subset=["train/loss"]).set_index("step")


@pytest.mark.parametrize("name, metric", [("one-step-discrete", "train/token_accuracy"),
                                          ("policy-head", "train/gripper_accuracy")])
def test_train_logs_metrics_and_saves_a_checkpoint_its_run_directory_rebuilds(store, tmp_path, name, metric):
    history = 2 if name == "policy-head" else 1
    run_dir = train(config(store, tmp_path / "run", formulation={"name": name}, history=history))
    assert {"train/loss", "train/arm_error", metric} <= set(logged(run_dir).columns)
    assert list(run_dir.glob("tensorboard/version_0/events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    formulation, saved = load_formulation(run_dir)
    assert saved.formulation.name == name and saved.cameras == ["rgb_static"]
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in formulation.state_dict().items():
        torch.testing.assert_close(value, trained[f"formulation.{key}"])


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("varied", [{"augment": False}, {"augment": True},
                                    {"formulation": {"name": "one-step-continuous",
                                                     "options": {"objective": "flow-matching"}}}],
                         ids=["plain", "augmented", "flow-matching"])
def test_a_resumed_run_continues_with_the_same_next_step_loss(store, tmp_path, monkeypatch, varied):
    """Augmentation and a sampling objective's noise are drawn by step, as the batches are."""
    settings = {"max_steps": 8, "checkpoint_every": 4, "warmup_steps": 2, **varied}
    uninterrupted = logged(train(config(store, tmp_path / "straight", **settings)))["train/loss"]

    original_step = FormulationModule.training_step

    def stop_at_step_six(self, batch, batch_idx):
        if self.global_step == 6:
            raise Interrupted
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(FormulationModule, "training_step", stop_at_step_six)
    with pytest.raises(Interrupted):
        train(config(store, tmp_path / "stopped", **settings))
    assert torch.load(tmp_path / "stopped/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    monkeypatch.setattr(FormulationModule, "training_step", original_step)
    resumed = logged(train(config(store, tmp_path / "stopped", **settings)))
    resumed = resumed[~resumed.index.duplicated(keep="last")]["train/loss"]
    assert list(resumed.index) == list(uninterrupted.index)
    np.testing.assert_allclose(resumed.to_numpy(), uninterrupted.to_numpy(), rtol=1e-5)


def test_a_nan_loss_stops_the_run_with_a_clear_message_and_keeps_the_last_good_checkpoint(store, tmp_path,
                                                                                          monkeypatch):
    original_step = FormulationModule.training_step

    def nan_from_step_four(self, batch, batch_idx):
        if self.global_step >= 4:
            batch = {**batch, "actions": torch.full_like(batch["actions"], float("nan"))}
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(FormulationModule, "training_step", nan_from_step_four)
    with pytest.raises(TrainingDivergedError, match="loss became nan at step 4.*last good checkpoint is .*last.ckpt"):
        train(config(store, tmp_path / "run", max_steps=10))
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values())


@pytest.mark.parametrize("setting", [{"history": 13, "formulation": {"name": "policy-head"}}, {"chunk": 13}])
def test_a_window_longer_than_the_shortest_episode_is_refused(store, tmp_path, setting):
    with pytest.raises(WindowError, match="shortest episode used for training \\(12 frames"):
        train(config(store, tmp_path / "run", **setting))


def test_a_store_without_action_statistics_is_refused(store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(store.path, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["statistics"]["actions"]["p99"] = None
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="no usable action statistics"):
        train({**config(store, tmp_path / "run"), "store": str(copy)})


def test_config_errors_name_the_bad_key_and_the_valid_ones(store, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'histroy'; valid keys: store, run_dir, .*history"):
        load_config(config(store, tmp_path, histroy=2))
    with pytest.raises(ConfigError, match="unknown key 'backbone.nme'; valid keys: name, size"):
        load_config(config(store, tmp_path, backbone={"nme": "kosmos2"}))
    with pytest.raises(ConfigError, match="precision: Input should be '32', 'bf16-mixed', 'bf16-true' or '16-mixed'"):
        load_config(config(store, tmp_path, precision="16"))
    with pytest.raises(UnknownNameError, match="unknown formulation 'one-step'; valid choices: interleaved, "
                                               "one-step-continuous, one-step-discrete, policy-head"):
        train(config(store, tmp_path / "run", formulation={"name": "one-step"}))


def test_robovlms_definitions_are_checked_with_the_valid_choices(store, tmp_path):
    with pytest.raises(ConfigError, match="state_input: Input should be 'add' or 'token'"):
        load_config(config(store, tmp_path, state_input="concat"))
    with pytest.raises(ConfigError, match="state_input token .* needs use_state true"):
        load_config(config(store, tmp_path, state_input="token", use_state=False))
    with pytest.raises(ConfigError, match="lora_targets: Input should be 'attention' or 'all-linear'"):
        load_config(config(store, tmp_path, backbone={"freeze": "lora", "lora_targets": "mlp"}))
    with pytest.raises(ConfigError, match="backbone.freeze: Input should be .*'frozen-vision-and-embeddings'"):
        load_config(config(store, tmp_path, backbone={"freeze": "robovlms"}))
    with pytest.raises(ConfigError, match="backbone.lora_dropout: Input should be less than 1 .*got 1.0"):
        load_config(config(store, tmp_path, backbone={"freeze": "lora", "lora_dropout": 1.0}))
    with pytest.raises(ConfigError, match="backbone.lora_alpha: Input should be greater than or equal to 1"):
        load_config(config(store, tmp_path, backbone={"freeze": "lora", "lora_alpha": 0}))


@pytest.mark.parametrize("settings", [
    {"state_input": "token", "formulation": {"name": "policy-head"}, "history": 2},
    {"backbone": {"name": "paligemma", "freeze": "lora", "lora_rank": 2, "lora_targets": "all-linear"}},
    {"backbone": {"freeze": "frozen-vision-and-embeddings"}, "formulation": {"name": "one-step-discrete"}}],
    ids=["state token", "all-linear LoRA", "frozen vision and embeddings"])
def test_robovlms_definitions_train_and_their_run_directory_rebuilds_them(store, tmp_path, settings):
    run_dir = train(config(store, tmp_path / "run", **settings))
    formulation, saved = load_formulation(run_dir)
    assert saved.model_dump(include=set(settings)) == load_config(config(store, tmp_path, **settings)).model_dump(
        include=set(settings))
    trained = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in formulation.state_dict().items():
        torch.testing.assert_close(value, trained[f"formulation.{key}"])
    backbone = formulation.backbone
    assert backbone.freeze_mode == saved.backbone.freeze
    if saved.backbone.freeze == "lora":
        assert backbone.lora_targets == "all-linear" and any("mlp" in name for name in trained if "lora_" in name)
    if saved.backbone.freeze == "frozen-vision-and-embeddings":
        assert backbone.partly_frozen_parameters() == [backbone.input_embeddings().weight]


def test_a_run_directory_written_before_the_robovlms_definitions_existed_resumes(store, tmp_path):
    run_dir = train(config(store, tmp_path / "run", max_steps=3))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["state_input"], saved["backbone"]["lora_targets"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    train(config(store, tmp_path / "run", max_steps=6))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_yaml_config_trains(store, tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config(store, tmp_path / "run", max_steps=2)))
    assert (train(path) / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("setting", [{"backbone": {"options": {"hidden_dim": 32}}},
                                     {"formulation": {"name": "one-step-continuous", "options": {"hiden": 2}}}])
def test_a_bad_backbone_or_formulation_option_leaves_no_run_directory(store, tmp_path, setting):
    with pytest.raises(ConfigError):
        train(config(store, tmp_path / "run", **setting))
    assert not (tmp_path / "run").exists()


def test_a_run_directory_without_a_checkpoint_trains_afresh_with_new_settings(store, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config(store, run_dir, chunk=3, max_steps=2)))
    (run_dir / "statistics.json").write_text("{}")
    assert (train(config(store, run_dir, max_steps=2)) / "checkpoints" / "last.ckpt").is_file()
    assert load_config(run_dir / "config.yaml").chunk == 2


def test_a_run_directory_with_a_checkpoint_refuses_other_settings(store, tmp_path):
    run_dir = train(config(store, tmp_path / "run", max_steps=2))
    with pytest.raises(ConfigError, match="holds a run trained with other settings \\(chunk\\)"):
        train(config(store, run_dir, chunk=3, max_steps=2))
def steps_trained(monkeypatch):
    """Record the global step of every training step from now on."""
    seen, original_step = [], FormulationModule.training_step

    def recording_step(self, batch, batch_idx):
        seen.append(self.global_step)
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(FormulationModule, "training_step", recording_step)
    return seen


def truncate(path):
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["truncated last.ckpt", "killed before last.ckpt was written"])
def test_resuming_continues_from_the_newest_checkpoint_that_loads(store, tmp_path, monkeypatch, damage):
    settings = {"max_steps": 4, "checkpoint_every": 2}
    checkpoints = train(config(store, tmp_path / "run", **settings)) / "checkpoints"
    (checkpoints / "step4.ckpt").unlink()
    if damage == "truncated last.ckpt":
        truncate(checkpoints / "last.ckpt")
    else:
        (checkpoints / "last.ckpt").unlink()
    seen = steps_trained(monkeypatch)
    truncated = damage == "truncated last.ckpt"
    with pytest.warns(UserWarning, match="last.ckpt is truncated") if truncated else nullcontext():
        train(config(store, tmp_path / "run", **{**settings, "max_steps": 6}))
    assert seen == [2, 3, 4, 5]
    assert sorted(path.name for path in checkpoints.iterdir()) == ["last.ckpt", "step2.ckpt", "step4.ckpt",
                                                                    "step6.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_finished_run_whose_last_checkpoint_is_truncated_gets_it_back_from_the_step_checkpoint(store, tmp_path):
    settings = {"max_steps": 4, "checkpoint_every": 2}
    run_dir = train(config(store, tmp_path / "run", **settings))
    truncate(run_dir / "checkpoints" / "last.ckpt")
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        train(config(store, run_dir, **settings))
    load_formulation(run_dir)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_code_is_refused_in_one_line_that_never_suggests_unsafe_loading(store, tmp_path):
    run_dir = train(config(store, tmp_path / "run", max_steps=2, checkpoint_every=2))
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {}, "global_step": 2, "payload": RunsCode(marker)}, run_dir / "checkpoints/last.ckpt")
    with pytest.raises(CheckpointError, match=r"last.ckpt is not a robovlms checkpoint") as error:
        load_policy(run_dir)
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_training_time_adds_every_attempt_including_an_interrupted_one(store, tmp_path, monkeypatch):
    original_step = FormulationModule.training_step

    def stop_at_step_three(self, batch, batch_idx):
        if self.global_step == 3:
            raise Interrupted
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(FormulationModule, "training_step", stop_at_step_three)
    with pytest.raises(Interrupted):
        train(config(store, tmp_path / "run", checkpoint_every=2))
    interrupted = training_seconds(tmp_path / "run")
    monkeypatch.setattr(FormulationModule, "training_step", original_step)
    train(config(store, tmp_path / "run", checkpoint_every=2))
    assert 0 < interrupted < training_seconds(tmp_path / "run")


def test_lightnings_repeated_notices_stay_out_of_the_output(store, tmp_path, capfd):
    """A sweep's log is for its cells: no cloud-logger tip, no skipped-validation or LeafSpec notice per cell."""
    train(config(store, tmp_path / "run"))
    output = "".join(capfd.readouterr())
    assert "Tip:" not in output and "LeafSpec" not in output and "val_dataloader" not in output
